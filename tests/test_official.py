"""The official Glance pipelines and recipe reproduced: ``--mode official-qwen`` bit for bit, the official presets,
and the official released LoRA files (no alpha) in ``sample`` with ``--lora-scale``.

The reference for ``--mode official-qwen`` is ``official_glance_qwen`` below: an independent re-implementation of
what the official repository's ``GlanceQwenSlowPipeline`` and ``GlanceQwenFastPipeline`` compute (its Qwen pipeline
file, read line by line), on a stock diffusers ``QwenImagePipeline``:

- Slow call: ``retrieve_timesteps(scheduler, 50, sigmas=np.linspace(1, 1/50, 50), mu=calculate_shift(image_seq_len,
  <the scheduler config's base/max seq len and shifts>))``, then ``timesteps = torch.tensor([1000.0, 979.1915,
  957.5157, 934.9171, 911.3354], dtype=torch.bfloat16)`` replaces the table's timesteps, ``set_begin_index(0)``, and
  for each of the 5: ``timestep = t.expand(batch).to(latents.dtype)``, the transformer called with
  ``timestep / 1000``, true CFG ``neg + s * (pos - neg)`` rescaled per token to the norm of ``pos``, and
  ``scheduler.step(noise_pred, t, latents)`` (so the 5 steps walk the first 5 intervals of the 50-step table).
- Fast call: the same with ``num_inference_steps = 5`` (the shifted 5-step table and its terminal 0) and the Fast
  list ``[886.7053, 745.0728, 562.9505, 320.0802, 20.0]``, starting from the Slow call's latents.
- Latents are held in the transformer's dtype (``prepared_latents.to(dtype=self.transformer.dtype)``; the
  scheduler casts each step back to the model output's dtype).
The official code unrolls the transformer's forward (img_in, txt_norm/txt_in, time_text_embed, pos_embed, the
blocks, norm_out, proj_out) to spread blocks over GPUs; on one device that is ``transformer(...)``, called here.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps
from glance_lightning.datamodules.glance import GlanceDataModule
from PIL import Image

from glance_lightning.commands.sample import load_sampler, run_sample_command
from glance_lightning.families.qwen_image import QWEN_LORA_TARGETS, QwenImageGlance
from glance_lightning.lora_layouts import read_lora
from glance_lightning.sampling import NOISE, PLANS, noise_draw
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings
from glance_lightning.tiny import tiny_model_path

OFFICIAL_SLOW = [1000.0000, 979.1915, 957.5157, 934.9171, 911.3354]
OFFICIAL_FAST = [886.7053, 745.0728, 562.9505, 320.0802, 20.0000]
PROMPT = "a red ball on green grass under a blue sky with a yellow sun"


def official_glance_qwen(pipe: QwenImagePipeline, scheduler_config: dict, prompt: str, negative_prompt: str | None,
                         true_cfg_scale: float, latents: torch.Tensor, height: int, width: int,
                         max_sequence_length: int, round_to_bf16: bool = True) -> torch.Tensor:
    """GlanceQwenSlowPipeline then GlanceQwenFastPipeline (see the module docstring); packed latents out.
    ``round_to_bf16=False`` holds the lists in float32 instead: what the exact values would give."""
    device = pipe._execution_device
    embeds, mask = pipe.encode_prompt(prompt=prompt, device=device, num_images_per_prompt=1,
                                      max_sequence_length=max_sequence_length)
    do_true_cfg = true_cfg_scale > 1 and negative_prompt is not None
    if do_true_cfg:
        neg_embeds, neg_mask = pipe.encode_prompt(prompt=negative_prompt, device=device, num_images_per_prompt=1,
                                                  max_sequence_length=max_sequence_length)
    img_shapes = [(1, height // pipe.vae_scale_factor // 2, width // pipe.vae_scale_factor // 2)]
    latents = latents.to(device, dtype=pipe.transformer.dtype)
    list_dtype = torch.bfloat16 if round_to_bf16 else torch.float32
    for adapter, num_inference_steps, listed in (("slow", 50, OFFICIAL_SLOW), ("fast", 5, OFFICIAL_FAST)):
        pipe.set_adapters(adapter)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)  # the model's own scheduler
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096),
                             scheduler.config.get("base_shift", 0.5), scheduler.config.get("max_shift", 1.15))
        retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        timesteps = torch.tensor(listed, dtype=list_dtype).to(device)
        scheduler.set_begin_index(0)
        for t in timesteps:
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            noise_pred = pipe.transformer(hidden_states=latents, timestep=timestep / 1000, guidance=None,
                                          encoder_hidden_states=embeds, encoder_hidden_states_mask=mask,
                                          img_shapes=img_shapes, return_dict=False)[0]
            if do_true_cfg:
                neg_pred = pipe.transformer(hidden_states=latents, timestep=timestep / 1000, guidance=None,
                                            encoder_hidden_states=neg_embeds, encoder_hidden_states_mask=neg_mask,
                                            img_shapes=img_shapes, return_dict=False)[0]
                comb_pred = neg_pred + true_cfg_scale * (noise_pred - neg_pred)
                cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
                noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
                noise_pred = comb_pred * (cond_norm / noise_norm)
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    return latents


@pytest.fixture(scope="module")
def qwen_loras(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Trained Qwen-Image LoRAs on the official lists (non-trivial adapters: the comparison covers LoRA layers)."""
    out = tmp_path_factory.mktemp("qwen_official")
    module = QwenImageGlance(
        pretrained_model="tiny:qwen-image", timesteps=TimestepSettings(slow=OFFICIAL_SLOW, fast=OFFICIAL_FAST),
        slow_steps=3, fast_steps=3, lora=LoraSettings(rank=4, alpha=16), optimizer=OptimizerSettings(lr=5e-2),
        max_sequence_length=32, output_dir=str(out),
    )
    data = GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=64)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=out).fit(module, data)
    return out


def _sampler(loras: Path, dtype: str, device: str = "cpu"):
    import argparse

    args = argparse.Namespace(model="tiny:qwen-image", slow=str(loras / "slow"), fast=str(loras / "fast"),
                              family=None, guidance=None, dtype=dtype, device=device, control=[])
    module, _ = load_sampler(args)
    return module


def official_noise(pipe: QwenImagePipeline, seed: int, size: int) -> torch.Tensor:
    """The official scripts' starting latents: their README passes ``torch.Generator(device=<the pipeline's
    device>).manual_seed(seed)`` and the pipeline's own ``prepare_latents`` draws (packed) in the prompt's dtype."""
    device = pipe._execution_device
    generator = torch.Generator(device=device).manual_seed(seed)
    channels = pipe.transformer.config.in_channels // 4
    return pipe.prepare_latents(1, channels, size, size, pipe.transformer.dtype, device, generator)


def _compare_with_official(module, dtype: str, size: int = 64, seed: int = 3) -> tuple[dict, torch.Tensor]:
    ours = module.generate_latents(PROMPT, seed, size, size, 4.0, " ", mode="official-qwen")
    packed = official_noise(module.pipe, seed, size)
    factor = module.pipe.vae_scale_factor
    unpacked = module.pipe._unpack_latents(packed, size, size, factor).squeeze(2)
    assert torch.equal(module.initial_noise(size, size, seed, mode="official-qwen"), unpacked.float())
    config = json.loads((Path(tiny_model_path("tiny:qwen-image")) / "scheduler" / "scheduler_config.json").read_text())
    common = dict(pipe=module.pipe, scheduler_config=config, prompt=PROMPT, negative_prompt=" ", true_cfg_scale=4.0,
                  latents=packed, height=size, width=size, max_sequence_length=32)
    official = module.pipe._unpack_latents(official_glance_qwen(**common), size, size, factor).squeeze(2)
    assert official.dtype == getattr(torch, dtype)
    assert torch.equal(ours, official.float().to(ours.device)), (ours - official.float().to(ours.device)).abs().max()
    return common, official


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_official_qwen_mode_reproduces_the_official_pipelines_bit_for_bit(qwen_loras: Path, dtype: str):
    module = _sampler(qwen_loras, dtype)
    size = 64
    factor = module.pipe.vae_scale_factor
    common, official = _compare_with_official(module, dtype, size)
    # In float32 the exact (unrounded) lists give other latents: the bf16 rounding is what makes the match. (A
    # bfloat16 model rounds t / 1000 to bfloat16 anyway, which for these lists gives the same values.)
    unrounded = module.pipe._unpack_latents(official_glance_qwen(**common, round_to_bf16=False), size, size,
                                            factor).squeeze(2).float()
    relative = ((unrounded - official.float()).norm() / official.float().norm()).item()
    print(f"official-qwen {dtype}: unrounded lists differ by {relative:.2e} relative L2")
    assert relative > 1e-4 if dtype == "float32" else relative >= 0


def test_the_noise_rule_of_each_mode():
    """official-qwen draws where the pipeline runs, in its dtype (the official scripts' CUDA generator on a GPU);
    every other mode draws float32 on the CPU, so a seed gives the same image on any device."""
    assert noise_draw("official-qwen", "cuda:0", torch.bfloat16) == (torch.device("cuda:0"), torch.bfloat16)
    assert noise_draw("official-qwen", "cpu", torch.float32) == (torch.device("cpu"), torch.float32)
    assert noise_draw("exact", "cuda:0", torch.bfloat16) == (torch.device("cpu"), torch.float32)
    assert set(NOISE) == set(PLANS)


def test_the_noise_comes_from_the_generator_the_rule_names(qwen_loras: Path, monkeypatch):
    import diffusers.utils.torch_utils as torch_utils

    module = _sampler(qwen_loras, "bfloat16")
    draws, real = [], torch_utils.randn_tensor

    def spy(shape, generator=None, device=None, dtype=None, **kwargs):
        draws.append((tuple(shape), generator.device, torch.device(device), dtype))
        return real(shape, generator=generator, device=device, dtype=dtype, **kwargs)

    monkeypatch.setattr(torch_utils, "randn_tensor", spy)
    module.generate_latents(PROMPT, 0, 64, 64, mode="official-qwen")
    module.generate_latents(PROMPT, 0, 64, 64)
    (shape, generator, device, dtype), exact = draws
    assert shape[1] == 1 and generator == device == module.device and dtype == torch.bfloat16
    assert exact[1:] == (torch.device("cpu"), torch.device("cpu"), torch.float32)


@pytest.mark.cuda  # the CPU tests cover the noise rule
def test_official_qwen_mode_matches_the_official_pipelines_on_a_gpu_seed_for_seed(qwen_loras: Path):
    """On a GPU the official scripts draw their noise with a CUDA generator: the same seed gives the same latents."""
    module = _sampler(qwen_loras, "bfloat16", device="cuda")
    noise = module.initial_noise(64, 64, 3, mode="official-qwen")
    assert noise.is_cuda and not torch.equal(noise.cpu(), module.initial_noise(64, 64, 3).cpu())
    _compare_with_official(module, "bfloat16")


def test_the_exact_chain_is_still_the_default_and_differs_from_the_official_arithmetic(qwen_loras: Path):
    module = _sampler(qwen_loras, "float32")
    exact = module.generate_latents(PROMPT, 0, 64, 64, 4.0, " ")
    official = module.generate_latents(PROMPT, 0, 64, 64, 4.0, " ", mode="official-qwen")
    assert not torch.allclose(exact, official)


# ------------------------------------------------------------------------------------------ released files


def _official_release_files(loras: Path, out: Path) -> tuple[Path, Path]:
    """Files like the official releases: "transformer.*" lora_A/lora_B as trained (alpha/rank = 4 NOT folded in),
    no metadata at all (the official scripts save without alpha)."""
    from safetensors.torch import save_file

    paths = []
    for phase in ("slow", "fast"):
        lora = read_lora(loras / phase)
        scale = json.loads(lora.metadata["glance"])["scale_folded"]
        tensors = {k: (v / scale if ".lora_B." in k else v) for k, v in lora.tensors.items()}  # unfold
        path = out / f"glance_qwen_{phase}.safetensors"
        save_file(tensors, str(path))
        paths.append(path)
    return paths[0], paths[1]


def _delta(pipe, adapter: str = "slow") -> dict[str, torch.Tensor]:
    from peft.tuners.lora import LoraLayer

    return {name: m.get_delta_weight(adapter).detach() for name, m in pipe.transformer.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def test_official_release_files_load_at_1_with_a_notice_and_lora_scale_multiplies(qwen_loras: Path, tmp_path: Path,
                                                                                    capsys):
    slow, fast = _official_release_files(qwen_loras, tmp_path)
    argv = ["--model", "tiny:qwen-image", "--slow", str(slow), "--fast", str(fast), "--prompt", "x", "--height",
            "64", "--width", "64", "--output", str(tmp_path / "out")]
    assert run_sample_command(argv) == 2
    assert "--family" in capsys.readouterr().err  # no metadata: the family must be given
    assert run_sample_command([*argv, "--family", "qwen-image"]) == 0
    err = capsys.readouterr().err
    assert "carry no alpha" in err and "alpha/rank = 4" in err and "--lora-scale 4" in err
    assert len(list((tmp_path / "out").glob("*.png"))) == 1

    import argparse

    def loaded(scale: float):
        args = argparse.Namespace(model="tiny:qwen-image", slow=str(slow), fast=str(fast), family="qwen-image",
                                  guidance=None, dtype="float32", device="cpu", control=[], lora_scale=scale)
        return _delta(load_sampler(args)[0].pipe)

    trained = _delta(_sampler(qwen_loras, "float32").pipe)  # our own files: the trained strength
    at_one, at_four = loaded(1.0), loaded(4.0)
    for name, delta in trained.items():
        torch.testing.assert_close(at_one[name] * 4, delta, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(at_four[name], delta, rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------ presets

REPO = Path(__file__).resolve().parents[1]
# The official runs (GLANCE.md section 2, train_Glance_qwen.py / train_Glance_flux.py and their train_configs).
OFFICIAL = {
    "official/qwen-image.yaml": {
        "class_path": "glance_lightning.families.qwen_image.QwenImageGlance",
        "lora": {"rank": 32, "alpha": 128, "targets": list(QWEN_LORA_TARGETS), "init": "gaussian"},
        "optimizer": {"name": "adamw8bit", "lr": 3e-4, "betas": [0.9, 0.999], "weight_decay": 0.0, "warmup_steps": 0},
        "caption_dropout": 0.1, "dropout_prompt": " ", "max_sequence_length": 1024,
        "base_quantization": "float8-weight-only",
        "timesteps": (OFFICIAL_SLOW, OFFICIAL_FAST),
    },
    "official/flux-dev.yaml": {
        "class_path": "glance_lightning.families.flux.FluxGlance",
        "lora": {"rank": 16, "alpha": 64, "targets": ["to_q", "to_k", "to_v", "to_out.0"], "init": "gaussian"},
        "optimizer": {"name": "adamw", "lr": 5e-4, "betas": [0.9, 0.999], "weight_decay": 0.01, "warmup_steps": 0},
        "caption_dropout": 0.0, "guidance": 1.0, "base_quantization": "float8-weight-only",
        "timesteps": ([1000.0, 986.9786, 973.2042, 958.6094, 943.1188],
                      [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]),
    },
}


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_presets_hold_the_official_values(name: str, monkeypatch, capsys):
    from glance_lightning.cli import main

    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit):
        main(["fit", "--config", f"configs/{name}", "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    want = OFFICIAL[name]
    model = config["model"]["init_args"]
    assert config["model"]["class_path"] == want["class_path"]
    assert {k: model["lora"][k] for k in want["lora"]} == want["lora"]
    assert {k: model["optimizer"][k] for k in want["optimizer"]} == want["optimizer"]
    assert model["slow_steps"] == model["fast_steps"] == 60
    assert model["torch_dtype"] == "bfloat16" and model["performance"]["gradient_checkpointing"] is True
    assert model["performance"]["base_quantization"] == want["base_quantization"]
    assert model["caption_dropout"] == want["caption_dropout"]
    for key in ("dropout_prompt", "max_sequence_length", "guidance"):
        if key in want:
            assert model[key] == want[key]
    assert (model["timesteps"]["slow"], model["timesteps"]["fast"]) == want["timesteps"]
    trainer = config["trainer"]
    assert trainer["precision"] == "bf16-mixed" and trainer["gradient_clip_val"] == 1.0
    data = config["data"]["init_args"]
    assert data["batch_size"] == 1 and data["resolution"] == 1024 and data["size_multiple"] == 32
    assert data["resize"] == "longest-side"


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_official_presets_instantiate(name: str):
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    from glance_lightning.families.base import GlanceModule

    raw = yaml.safe_load((REPO / "configs" / name).read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(GlanceModule, "model")
    parser.add_subclass_arguments(LightningDataModule, "data")
    objects = parser.instantiate_classes(parser.parse_object({"model": raw["model"], "data": raw["data"]}))
    assert objects.model.optim_settings.warmup_steps == 0 and objects.data.resize == "longest-side"
    assert objects.model.perf.base_quantization == "float8-weight-only"


def test_no_warm_up_means_the_full_learning_rate_from_the_first_step():
    """`get_scheduler("constant", num_warmup_steps=10)` ignores the warm-up; warmup_steps 0 is that schedule."""
    module = QwenImageGlance(pretrained_model="tiny:qwen-image", slow_steps=3, fast_steps=2,
                             optimizer=OptimizerSettings(warmup_steps=0))
    for phase, steps in (("slow", range(0, 3)), ("fast", range(3, 5))):
        factor = module._phase_lr_lambda(phase)
        assert [factor(s) for s in steps] == [1.0] * len(steps)


def test_longest_side_resize_is_the_official_rule(tmp_path: Path):
    """flymyai-lora-trainer's image_resize (the official data path): longest side to the resolution, the other
    scaled with int(), both floored to a multiple of 32, a plain resize (stretch, no crop)."""
    Image.new("RGB", (1500, 1000), (10, 200, 30)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a green field")
    data = GlanceDataModule(path=str(tmp_path), resolution=1024, size_multiple=32, resize="longest-side")
    data.setup()
    assert tuple(data.train_samples[0].pixels.shape) == (3, 672, 1024)  # int(1024 / 1500 * 1000) = 682 -> 672
    area = GlanceDataModule(path=str(tmp_path), resolution=1024, size_multiple=32)
    area.setup()
    assert tuple(area.train_samples[0].pixels.shape) == (3, 832, 1248)  # about 1024^2, centre-cropped
    with pytest.raises(ValueError, match="data.resize"):
        GlanceDataModule(path=str(tmp_path), resize="cover")
