"""Qwen-Image-Edit and Edit-2509/2511 (Plus) on the tiny models: the control-image conditioning against the stock
pipelines, training steps, the CLI quick start, stock-pipeline LoRAs, and learning."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline, QwenImageEditPlusPipeline
from glance_lightning.datamodules.glance import GlanceDataModule, TrainSample, load_pixels
from PIL import Image

from glance_lightning.evaluation import chain_fidelity, phase_losses
from glance_lightning.families.qwen_image_edit import QwenImageEditGlance, QwenImageEditPlusGlance
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings
from glance_lightning.tiny import tiny_model_path

CONFIG = "configs/quickstart-qwen-image-edit.yaml"
SLOW = [1000.0, 979.1915, 957.5157, 934.9171, 911.3354]
FAST = [886.7053, 745.0728, 562.9505, 320.0802, 20.0]
EDIT = Path(__file__).resolve().parents[1] / "glance_lightning/assets/samples/edit"
OTHER = Path(__file__).resolve().parents[1] / "glance_lightning/assets/samples/t2i/red_ball.png"
PROMPT = "Make the ball red"



@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, fit_config) -> Path:
    return fit_config(CONFIG, tmp_path_factory.mktemp("quickstart_qwen_edit"))


@pytest.fixture(scope="module")
def edit_module(tmp_path_factory: pytest.TempPathFactory) -> QwenImageEditGlance:
    """Untrained module with the pipeline's own control resizing (1024x1024 for the VAE and the VL encoder)."""
    module = QwenImageEditGlance(pretrained_model="tiny:qwen-image-edit",
                                 timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                                 output_dir=str(tmp_path_factory.mktemp("edit_module") / "o"))
    module.load_base_model()
    module.transformer.eval()
    return module


@pytest.fixture(scope="module")
def plus_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundled edit sample with a second control image (control_2/), the Edit-2509/2511 layout."""
    root = tmp_path_factory.mktemp("plus_data")
    shutil.copytree(EDIT / "image", root / "image")
    shutil.copytree(EDIT / "control", root / "control")
    (root / "control_2").mkdir()
    shutil.copy(OTHER, root / "control_2" / "ball.png")
    return root


def control_pixels(path: Path = EDIT / "control" / "ball.png") -> torch.Tensor:
    """A control image as the DataModule gives it (it is 128x128 already, so these are its exact pixels)."""
    return load_pixels(path, Image.open(path).size)


def exact_scheduler(pipe) -> None:
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None
    )


def record_first_call(pipe, **kwargs) -> dict:
    """Run the stock pipeline for one step at sigma 0.7 and record what its transformer was given."""
    calls = []

    def record(module, args, kw, output):
        calls.append({**{k: kw[k] for k in ("timestep", "hidden_states", "encoder_hidden_states", "img_shapes")},
                      "out": output[0].clone()})

    exact_scheduler(pipe)
    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    try:
        pipe(prompt=PROMPT, height=64, width=64, sigmas=[0.7], num_inference_steps=1, true_cfg_scale=1.0,
             generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs)
    finally:
        handle.remove()
    return calls[0]


def one_step_trainer(tmp_path: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path)


# ------------------------------------------------------------------------------------------ Qwen-Image-Edit


def test_conditioning_timestep_and_velocity_match_the_stock_edit_pipeline(edit_module: QwenImageEditGlance):
    """Same prompt + control image: the stock pipeline's prompt embeddings (encoded with the control resized to
    1024x1024), control tokens after the target tokens, img_shapes [[target, control]], timestep t/1000 = sigma and
    the same velocity on the target tokens."""
    pipe = QwenImageEditPipeline.from_pretrained(tiny_model_path("tiny:qwen-image-edit"))
    pipe.set_progress_bar_config(disable=True)
    stock = record_first_call(pipe, image=Image.open(EDIT / "control" / "ball.png").convert("RGB"))
    assert stock["img_shapes"] == [[(1, 4, 4), (1, 64, 64)]]
    assert stock["timestep"].tolist() == pytest.approx([0.7])

    cond = edit_module.conditioning_for(PROMPT, (control_pixels(),))
    torch.testing.assert_close(cond["prompt_embeds"], stock["encoder_hidden_states"])
    torch.testing.assert_close(cond["control_latents"], stock["hidden_states"][:, 16:])
    seen = []
    handle = edit_module.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw["timestep"].clone(), kw["img_shapes"])), with_kwargs=True
    )
    noisy = edit_module._unpack(stock["hidden_states"][:, :16], 8, 8)
    with torch.no_grad():
        pred = edit_module.predict_velocity(noisy, torch.tensor([0.7]), cond)
    handle.remove()
    assert seen[0][0].tolist() == pytest.approx(stock["timestep"].tolist())
    assert seen[0][0].tolist() == pytest.approx([0.7])
    assert seen[0][1] == stock["img_shapes"]
    assert pred.shape == noisy.shape == (1, 4, 8, 8)  # sliced back to the target tokens
    torch.testing.assert_close(pred, edit_module._unpack(stock["out"][:, :16], 8, 8), rtol=1e-4, atol=1e-5)


def test_conditioning_depends_on_the_control_image(edit_module: QwenImageEditGlance):
    control, other = control_pixels(), control_pixels(OTHER)
    first = edit_module.conditioning_for(PROMPT, (control,))
    assert edit_module.conditioning_for(PROMPT, (control.clone(),)) is first  # cached by content
    second = edit_module.conditioning_for(PROMPT, (other,))
    assert second is not first
    same_len = min(first["prompt_embeds"].shape[1], second["prompt_embeds"].shape[1])
    assert (first["prompt_embeds"][:, :same_len] - second["prompt_embeds"][:, :same_len]).abs().max() > 1e-4
    assert (first["control_latents"] - second["control_latents"]).abs().max() > 1e-4
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.9])
    with torch.no_grad():
        a, b = (edit_module.predict_velocity(noisy, sigma, c) for c in (first, second))
        guided = edit_module.guided_velocity(noisy, sigma, first, edit_module.conditioning_for(" ", (control,)), 4.0)
    assert a.shape == b.shape == guided.shape == noisy.shape
    assert (a - b).abs().max() > 1e-4 and (guided - a).abs().max() > 1e-4
    with pytest.raises(ValueError, match="control"):
        edit_module.conditioning_for(PROMPT, ())


def test_a_sample_without_its_control_image_is_refused(edit_module: QwenImageEditGlance):
    pixels = torch.zeros(3, 64, 64)
    edit_module.check_samples([TrainSample(Path("image/a.png"), "c", pixels, (pixels,))])
    with pytest.raises(ValueError, match="control"):
        edit_module.check_samples([TrainSample(Path("image/a.png"), "c", pixels, ())])
    with pytest.raises(ValueError, match="control"):
        edit_module.check_samples([TrainSample(Path("image/a.png"), "c", pixels, (pixels, pixels))])
    # Edit-2509/2511 takes one to three (checked before any model is loaded)
    plus = QwenImageEditPlusGlance(pretrained_model="tiny:qwen-image-edit-plus",
                                   timesteps=TimestepSettings(slow=SLOW, fast=FAST))
    plus.check_samples([TrainSample(Path("a.png"), "c", pixels, (pixels,) * 3)])
    for controls in ((), (pixels,) * 4):
        with pytest.raises(ValueError, match="control"):
            plus.check_samples([TrainSample(Path("a.png"), "c", pixels, controls)])


def test_one_training_step_moves_only_the_active_lora(tmp_path: Path):
    module = QwenImageEditGlance(
        pretrained_model="tiny:qwen-image-edit", timesteps=TimestepSettings(slow=SLOW, fast=FAST), slow_steps=1,
        fast_steps=0, lora=LoraSettings(rank=4, alpha=16), optimizer=OptimizerSettings(lr=1e-2),
        control_resolution=64, output_dir=str(tmp_path / "out"),
    )
    module.load_base_model()
    tracked = {f"{name}.{n}": p for name in ("transformer", "text_encoder", "vae")
               for n, p in getattr(module.pipe, name).named_parameters()}
    before = {k: p.detach().clone() for k, p in tracked.items()}
    trainer = one_step_trainer(tmp_path)
    trainer.fit(module, GlanceDataModule(path=str(EDIT), resolution=64))
    assert trainer.global_step == 1
    changed = {k for k, p in tracked.items() if not torch.equal(p.detach(), before[k])}
    assert changed and all(".slow." in k and "lora_" in k for k in changed), sorted(changed)
    assert any("lora_B.slow" in k for k in changed)


def test_quickstart_trains_both_loras_and_renders_a_chained_edit(quickstart_run: Path):
    for phase in ("slow", "fast"):
        meta = read_glance_metadata(quickstart_run / phase)
        assert meta["family"] == "qwen-image-edit" and meta["phase"] == phase
        assert meta["rank"] == 8 and meta["alpha"] == 32 and meta["resolution"] == 64
        assert meta["trained_steps"] == 150
        assert meta["timesteps"] == pytest.approx(SLOW if phase == "slow" else FAST)
        options = meta.get("family_options")
        assert options is None or options["control_resolution"] == 64
    samples = sorted((quickstart_run / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step000150_p0_s0.png", "step000300_p0_s0.png"]


def test_saved_loras_load_into_stock_edit_pipeline_and_change_its_output(quickstart_run: Path):
    pipe = QwenImageEditPipeline.from_pretrained(tiny_model_path("tiny:qwen-image-edit"))
    pipe.set_progress_bar_config(disable=True)
    control = Image.open(EDIT / "control" / "ball.png").convert("RGB")

    def run():
        return pipe(image=control, prompt=PROMPT, height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = run()
    pipe.load_lora_weights(str(quickstart_run / "slow"), adapter_name="slow")
    pipe.load_lora_weights(str(quickstart_run / "fast"), adapter_name="fast")
    pipe.set_adapters("slow")
    with_slow = run()
    pipe.set_adapters("fast")
    with_fast = run()
    assert base.shape == (1, 3, 64, 64)
    assert (with_slow - base).abs().max() > 1e-4
    assert (with_fast - with_slow).abs().max() > 1e-4


def test_training_lowers_loss_and_pulls_the_chained_edit_to_the_sample(repo: Path, quickstart_run: Path,
                                                                       tmp_path: Path):
    """Learning, measured on the quick start's checkpoint: the same module before and after loading it."""
    args = yaml.safe_load((repo / CONFIG).read_text())["model"]["init_args"]
    module = QwenImageEditGlance(
        pretrained_model=args["pretrained_model"], timesteps=TimestepSettings(**args["timesteps"]),
        lora=LoraSettings(**args["lora"]), control_resolution=args["control_resolution"],
        output_dir=str(tmp_path / "unused"),
    )
    data = GlanceDataModule(path=str(EDIT), resolution=64)
    data.setup()
    module.load_base_model()
    module.build_cache(data.train_samples)
    before_loss, before = phase_losses(module), chain_fidelity(module, data.train_samples[0])
    (ckpt,) = (quickstart_run / "checkpoints").glob("*.ckpt")
    result = module.load_state_dict(torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"],
                                    strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    after_loss, after = phase_losses(module), chain_fidelity(module, data.train_samples[0])
    for phase in ("slow", "fast"):
        assert after_loss[phase] < 0.6 * before_loss[phase], (phase, before_loss, after_loss)
    # the exact Slow->Fast chained edit lands near the training latents and, decoded, near the target image
    assert after["latent_mse"] < 0.3 * before["latent_mse"], (before, after)  # measured 0.06-0.07 (seeds 0-3)
    assert after["psnr"] > before["psnr"] + 4.0, (before, after)  # 9.1 dB before, +9.4 to +10.3 dB


# -------------------------------------------------------------------------------- Qwen-Image-Edit-2509/2511


def test_plus_defaults_follow_the_plus_pipeline():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_pipeline

    module = QwenImageEditPlusGlance(pretrained_model="tiny:qwen-image-edit-plus")
    assert module.family_spec.control_images == (1, 3) and module.family == "qwen-image-edit-plus"
    assert module.control_resolution ** 2 == plus_pipeline.VAE_IMAGE_SIZE
    assert module.condition_resolution ** 2 == plus_pipeline.CONDITION_IMAGE_SIZE
    # no lists given: derived from the (shared) Qwen-Image-Edit schedule, the official lists at 1024x1024
    assert module.glance_timesteps.as_timesteps()["slow"] == pytest.approx(SLOW, abs=1e-3)
    assert module.glance_timesteps.as_timesteps()["fast"] == pytest.approx(FAST, abs=1e-3)


def test_plus_conditioning_matches_the_stock_plus_pipeline_with_two_controls(tmp_path: Path):
    """Edit-Plus: "Picture i:" per control, the VL encoder sees 384x384 versions, the VAE 1024x1024 ones, every
    control packed separately after the target: the stock pipeline's transformer inputs and velocity."""
    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_path("tiny:qwen-image-edit-plus"))
    pipe.set_progress_bar_config(disable=True)
    paths = (EDIT / "control" / "ball.png", OTHER)
    stock = record_first_call(pipe, image=[Image.open(p).convert("RGB") for p in paths])
    assert stock["img_shapes"] == [[(1, 4, 4), (1, 64, 64), (1, 64, 64)]]

    module = QwenImageEditPlusGlance(pretrained_model="tiny:qwen-image-edit-plus",
                                     timesteps=TimestepSettings(slow=SLOW, fast=FAST), output_dir=str(tmp_path / "o"))
    module.load_base_model()
    module.transformer.eval()
    cond = module.conditioning_for(PROMPT, tuple(control_pixels(p) for p in paths))
    torch.testing.assert_close(cond["prompt_embeds"], stock["encoder_hidden_states"])
    torch.testing.assert_close(cond["control_latents"], stock["hidden_states"][:, 16:])
    noisy = module._unpack(stock["hidden_states"][:, :16], 8, 8)
    with torch.no_grad():
        pred = module.predict_velocity(noisy, torch.tensor([0.7]), cond)
    torch.testing.assert_close(pred, module._unpack(stock["out"][:, :16], 8, 8), rtol=1e-4, atol=1e-5)


def test_plus_trains_a_step_with_two_controls_and_its_lora_loads_in_the_stock_pipeline(plus_data: Path,
                                                                                        tmp_path: Path):
    module = QwenImageEditPlusGlance(
        pretrained_model="tiny:qwen-image-edit-plus", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
        slow_steps=1, fast_steps=0, lora=LoraSettings(rank=4, alpha=16),
        optimizer=OptimizerSettings(lr=0.05, warmup_steps=1), control_resolution=64, condition_resolution=64,
        output_dir=str(tmp_path / "out"),
    )
    shapes = []
    data = GlanceDataModule(path=str(plus_data), resolution=64)
    trainer = one_step_trainer(tmp_path)
    module.load_base_model()
    handle = module.transformer.register_forward_pre_hook(
        lambda m, a, kw: shapes.append(kw["img_shapes"]), with_kwargs=True
    )
    trainer.fit(module, data)
    handle.remove()
    assert trainer.global_step == 1
    assert shapes[0] == [[(1, 4, 4), (1, 4, 4), (1, 4, 4)]]  # target + two controls at 64x64
    meta = read_glance_metadata(tmp_path / "out" / "slow")
    assert meta["family"] == "qwen-image-edit-plus" and meta["trained_steps"] == 1

    pipe = QwenImageEditPlusPipeline.from_pretrained(tiny_model_path("tiny:qwen-image-edit-plus"))
    pipe.set_progress_bar_config(disable=True)
    images = [Image.open(plus_data / d / "ball.png").convert("RGB") for d in ("control", "control_2")]

    def run():
        return pipe(image=images, prompt=PROMPT, height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = run()
    pipe.load_lora_weights(str(tmp_path / "out" / "slow"), adapter_name="slow")
    assert (run() - base).abs().max() > 1e-5
