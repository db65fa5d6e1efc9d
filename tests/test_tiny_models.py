"""Tiny models: each family loads through its stock diffusers pipeline and generates; its VAE reconstructs a
real image into well-scaled latents; builds are deterministic; 'tiny:<family>' names resolve to a cached build
made once, atomically."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from glance_lightning import tiny
from glance_lightning.compat import allow_qwen2vl_processor_without_torchvision
from glance_lightning.registry import family_names, get_family
from glance_lightning.tiny import TINY_VERSION, build_tiny_model, is_tiny, tiny_model_path
from glance_lightning.tiny import vae as tiny_vae

TINY_FAMILIES = [n for n in family_names() if get_family(n).tiny_builder]

PIPELINES = {
    "flux": diffusers.FluxPipeline,
    "flux-kontext": diffusers.FluxKontextPipeline,
    "flux2": diffusers.Flux2Pipeline,
    "flux2-klein": diffusers.Flux2KleinPipeline,
    "sd3": diffusers.StableDiffusion3Pipeline,
    "qwen-image": diffusers.QwenImagePipeline,
    "qwen-image-2": diffusers.QwenImage21Pipeline,
    "qwen-image-edit": diffusers.QwenImageEditPipeline,
    "qwen-image-edit-plus": diffusers.QwenImageEditPlusPipeline,
}
CONTROL_IMAGES = {"flux-kontext": 1, "qwen-image-edit": 1, "qwen-image-edit-plus": 2}
RED_BALL = Path(__file__).resolve().parents[1] / "glance_lightning/assets/samples/t2i/red_ball.png"
# The tiny VAEs reach about 22 dB on red_ball at 64x64. A random VAE gives 10-12 dB, and the hand-set linear
# skeleton they train from 18-19.5 dB (repeating each 8x8 patch's mean colour: 19.3 dB): above 20 dB, training
# made a real autoencoder, with margin left for numerical differences between machines.
MIN_PSNR = 20.0


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _generation_kwargs(family: str) -> dict:
    kwargs = {
        "prompt": "a red ball on green grass",
        "height": 64,
        "width": 64,
        "num_inference_steps": 2,
        "max_sequence_length": 16,
        "output_type": "pt",
        "generator": torch.Generator().manual_seed(0),
    }
    if family.startswith("qwen"):
        kwargs["true_cfg_scale"] = 1.0
    if family == "qwen-image-2":  # no text-length setting: the Qwen3-VL encoding is as long as the prompt
        del kwargs["max_sequence_length"]
    if family == "flux-kontext":  # the output area and the control at their sizes (the pipeline: ~1 megapixel)
        kwargs.update(max_area=64 * 64, _auto_resize=False)
    if family in CONTROL_IMAGES:
        images = [Image.new("RGB", (48, 40), color) for color in ((200, 40, 40), (40, 40, 200))]
        count = CONTROL_IMAGES[family]
        kwargs["image"] = images[0] if count == 1 else images[:count]
    return kwargs


def test_families_match_pipelines() -> None:
    assert set(TINY_FAMILIES) == set(PIPELINES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_stock_pipeline_loads_and_generates(family: str, tmp_path: Path) -> None:
    path = build_tiny_model(family, tmp_path / family)
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == PIPELINES[family].__name__

    allow_qwen2vl_processor_without_torchvision()  # the edit pipelines' processors load without torchvision
    pipe = PIPELINES[family].from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe) is PIPELINES[family]
    assert pipe.vae_scale_factor == (16 if family == "qwen-image-2" else 8)
    if hasattr(pipe, "prompt_template_encode"):  # Qwen-Image: the system prompt is exactly the tokens it drops
        user_turn = "<|im_start|>user\n"
        system_prompt = pipe.prompt_template_encode.split(user_turn)[0] + user_turn
        assert len(pipe.tokenizer(system_prompt).input_ids) == pipe.prompt_template_encode_start_idx

    images = pipe(**_generation_kwargs(family)).images
    assert images.shape == (1, 4 if family == "qwen-image-2" else 3, 64, 64)  # Qwen-Image 2.x's VAE is RGBA
    assert torch.isfinite(images).all()


def _red_ball() -> torch.Tensor:
    """The bundled sample at 64x64 (resized as the data module does), as a (1, 3, 64, 64) batch in [-1, 1]."""
    image = Image.open(RED_BALL).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 127.5 - 1


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen-image", "flux2"])
def test_vae_reconstructs_an_image_into_normalised_latents(family: str) -> None:
    pipe = PIPELINES[family].from_pretrained(tiny_model_path(f"tiny:{family}"))
    vae = pipe.vae
    pixels = _red_ball()
    with torch.no_grad():
        if family == "flux2":  # patchified 2x2, then normalised by the VAE's batch-norm statistics, as the pipeline
            normalised = pipe._encode_vae_image(pixels, None)
            mean = vae.bn.running_mean.view(1, -1, 1, 1)
            std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            decoded = vae.decode(pipe._unpatchify_latents(normalised * std + mean)).sample
        elif family.startswith("qwen"):  # a one-frame video; latents normalised per channel, as the pipelines do
            latents = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
            decoded = vae.decode(latents).sample[:, :, 0]
            shape = (1, -1, 1, 1, 1)
            mean, std = (
                torch.tensor(vae.config.latents_mean).view(shape),
                torch.tensor(vae.config.latents_std).view(shape),
            )
            normalised = (latents - mean) / std
        else:
            latents = vae.encode(pixels).latent_dist.mode()
            decoded = vae.decode(latents).sample
            normalised = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    assert decoded.shape == pixels.shape
    mse = ((decoded.clamp(-1, 1) - pixels) / 2).pow(2).mean()  # on the [0, 1] scale
    assert 10 * torch.log10(1 / mse) > MIN_PSNR
    assert abs(normalised.mean()) < 0.5  # roughly zero mean, unit std: what flow matching assumes
    assert 0.5 < normalised.std() < 2


def test_qwen_image_2_vae_is_rgba_and_gives_normalised_latents() -> None:
    """Qwen-Image 2.x's 16x VAE reads and writes RGBA (the pipeline converts every image to RGBA): an opaque image
    comes back opaque, and its latents are about zero mean, unit std per channel. At 16x its tiny VAE is cruder
    than the 8x ones (red_ball at 64x64: 16.6 dB measured; a random VAE gives 10-12 dB)."""
    pipe = PIPELINES["qwen-image-2"].from_pretrained(tiny_model_path("tiny:qwen-image-2"))
    vae, pixels = pipe.vae, _red_ball()
    opaque = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
    with torch.no_grad():
        latents = vae.encode(opaque.unsqueeze(2)).latent_dist.mode()
        decoded = vae.decode(latents).sample[:, :, 0]
    assert latents.shape == (1, vae.config.z_dim, 1, 4, 4) and decoded.shape == (1, 4, 64, 64)
    assert decoded[:, 3].mean() > 0.9  # opaque
    mse = ((decoded[:, :3].clamp(-1, 1) - pixels) / 2).pow(2).mean()
    assert 10 * torch.log10(1 / mse) > 15.0
    shape = (1, -1, 1, 1, 1)
    normalised = (latents - torch.tensor(vae.config.latents_mean).view(shape)) / torch.tensor(
        vae.config.latents_std).view(shape)
    assert abs(normalised.mean()) < 0.5 and 0.5 < normalised.std() < 2


def test_vae_training_is_deterministic() -> None:
    """Same seed, same bytes, whatever the caller's thread count (training runs on one thread, then restores it)."""
    train = tiny_vae._trained_vae.__wrapped__  # not the per-process memo
    threads = torch.get_num_threads()
    try:
        for kind in ("kl", "qwen"):
            torch.set_num_threads(2)
            config, state = train(kind, 0, 3)
            assert torch.get_num_threads() == 2
            torch.set_num_threads(1)
            again, state_again = train(kind, 0, 3)
            assert config == again
            assert state.keys() == state_again.keys()
            assert all(torch.equal(tensor, state_again[name]) for name, tensor in state.items())
    finally:
        torch.set_num_threads(threads)


def test_build_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tiny_vae, "VAE_TRAINING_STEPS", {"kl": 3, "qwen": 3})  # VAE training: test above
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = build_tiny_model("flux", tmp_path / "a", seed=0)
    assert torch.equal(torch.rand(3), expected_draw)  # the caller's RNG is untouched
    second = build_tiny_model("flux", tmp_path / "b", seed=0)
    other = build_tiny_model("flux", tmp_path / "c", seed=1)

    files = sorted(f.relative_to(first) for f in first.rglob("*") if f.is_file())
    assert Path("transformer/diffusion_pytorch_model.safetensors") in files
    assert files == sorted(f.relative_to(second) for f in second.rglob("*") if f.is_file())
    assert all((first / f).read_bytes() == (second / f).read_bytes() for f in files)  # byte-identical

    for weights in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        seed0, seed1 = load_file(first / weights), load_file(other / weights)
        assert seed0.keys() == seed1.keys()
        assert not all(torch.equal(tensor, seed1[key]) for key, tensor in seed0.items())


def test_build_refuses_non_empty_dir(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        build_tiny_model("flux", tmp_path)


def test_unknown_family_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="qwen-image-edit-plus"):
        build_tiny_model("sdxl", tmp_path / "m")
    with pytest.raises(ValueError, match="flux"):
        tiny_model_path("tiny:sdxl")


@pytest.mark.parametrize("name", ["black-forest-labs/FLUX.1-dev", "/models/qwen-image", "tiny", "flux"])
def test_other_names_are_not_tiny(name: str) -> None:
    assert not is_tiny(name)
    with pytest.raises(ValueError, match="not a tiny model name"):
        tiny_model_path(name)


def test_resolve_builds_once_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLANCE_LIGHTNING_CACHE", str(tmp_path))
    path = tiny_model_path("tiny:flux")
    assert Path(path) == tmp_path / "tiny" / f"flux-{TINY_VERSION}"
    assert (Path(path) / "model_index.json").is_file()
    assert sorted(p.name for p in (tmp_path / "tiny").iterdir()) == [f"flux-{TINY_VERSION}"]  # no staging left

    def must_not_build(*args: object, **kwargs: object) -> Path:
        raise AssertionError("rebuilt a cached tiny model")

    monkeypatch.setattr(tiny, "build_tiny_model", must_not_build)
    assert tiny_model_path("tiny:flux") == path


def test_resolve_keeps_a_concurrent_builders_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLANCE_LIGHTNING_CACHE", str(tmp_path))
    target = tmp_path / "tiny" / f"sd3-{TINY_VERSION}"
    real_build = tiny.build_tiny_model

    def racing_build(family: str, path: Path, seed: int = 0) -> Path:
        built = real_build(family, path, seed)
        shutil.copytree(built, target)  # another process finishes first
        (target / "winner").write_text("other process")
        return built

    monkeypatch.setattr(tiny, "build_tiny_model", racing_build)
    assert tiny_model_path("tiny:sd3") == str(target)
    assert (target / "winner").is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [f"sd3-{TINY_VERSION}"]


def test_a_non_zero_rank_never_builds_an_incomplete_tiny_model(tmp_path, monkeypatch):
    """transformers writes weights on rank 0 only once torch.distributed is up: other ranks must not build."""
    monkeypatch.setenv("GLANCE_LIGHTNING_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 1)
    with pytest.raises(RuntimeError, match="rank 1 cannot build it"):
        tiny_model_path("tiny:flux")
    assert not (tmp_path / "tiny").exists() or not any((tmp_path / "tiny").iterdir())


def test_a_family_without_a_tiny_builder_is_rejected(tmp_path: Path) -> None:
    from glance_lightning.registry import FamilySpec, register_family, unregister_family

    flux = get_family("flux")
    register_family(FamilySpec(name="no-tiny", module=flux.module, pipeline=flux.pipeline,
                               scheduler_config=flux.scheduler_config))
    try:
        for call in (lambda: build_tiny_model("no-tiny", tmp_path / "m"), lambda: tiny_model_path("tiny:no-tiny")):
            with pytest.raises(ValueError, match="'no-tiny'.*has no tiny builder.*qwen-image-edit-plus"):
                call()
    finally:
        unregister_family("no-tiny")
