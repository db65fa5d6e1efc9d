"""Qwen generation: the official-Qwen compatibility mode's arithmetic, and edit sampling using the control image."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
from glance_lightning.datamodules.glance import GlanceDataModule
from PIL import Image

from glance_lightning.commands.sample import run_sample_command
from glance_lightning.families.qwen_image import QwenImageGlance
from glance_lightning.families.qwen_image_edit import QwenImageEditGlance
from glance_lightning.sampling import official_qwen_plan
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings

SLOW = [1000.0, 979.1915, 957.5157, 934.9171, 911.3354]
FAST = [886.7053, 745.0728, 562.9505, 320.0802, 20.0]


def record_timesteps(module) -> list[float]:
    seen: list[float] = []
    module.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(float(kwargs["timestep"][0])), with_kwargs=True
    )
    return seen


def test_official_qwen_mode_steps_through_the_official_arithmetic():
    module = QwenImageGlance(pretrained_model="tiny:qwen-image", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                             max_sequence_length=32)
    module.load_base_model()
    seen, ends = record_timesteps(module), []
    module.generate_latents("a red ball", 0, 64, 64, mode="official-qwen",
                            on_step=lambda i, step, x: ends.append(step.sigma_next))
    plan = official_qwen_plan([t / 1000 for t in SLOW], [t / 1000 for t in FAST], "qwen-image", resolution=(64, 64))
    # conditioned on the trained timesteps, rounded as the official pipelines hold them (bfloat16: 980, not 979.19)
    assert seen == pytest.approx([t / 1000 for t in (1000, 980, 956, 936, 912, 888, 744, 564, 320, 20)], abs=1e-6)
    # ... while stepping through the shifted 50-step table's first intervals, then the shifted 5-step table
    assert ends == pytest.approx([s.sigma_next for s in plan], abs=1e-6)
    assert plan[5].sigma == 1.0 and ends[4] > FAST[0] / 1000
    # the exact chain instead ends the Slow phase at f1 and is conditioned the same way
    seen.clear()
    exact_ends: list[float] = []
    module.generate_latents("a red ball", 0, 64, 64, on_step=lambda i, step, x: exact_ends.append(step.sigma_next))
    assert exact_ends == pytest.approx([t / 1000 for t in SLOW[1:] + FAST] + [0.0], abs=1e-6)
    assert seen == pytest.approx([t / 1000 for t in SLOW + FAST], abs=1e-6)


@pytest.fixture(scope="module")
def edit_loras(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("edit")
    module = QwenImageEditGlance(
        pretrained_model="tiny:qwen-image-edit", timesteps=TimestepSettings(slow=SLOW, fast=FAST), slow_steps=2,
        fast_steps=2, lora=LoraSettings(rank=4, alpha=8), optimizer=OptimizerSettings(lr=5e-2, warmup_steps=1),
        max_sequence_length=32, control_resolution=64, output_dir=str(out),
    )
    data = GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/edit"), resolution=64)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=out).fit(module, data)
    return out


def test_edit_sampling_uses_the_control_image(edit_loras: Path, repo: Path, tmp_path: Path):
    import argparse
    import json

    from glance_lightning.datamodules.glance import load_pixels

    from glance_lightning.commands.sample import load_sampler

    blue = repo / "glance_lightning/assets/samples/edit/control/ball.png"
    black = tmp_path / "k.png"
    Image.new("RGB", (128, 128), (0, 0, 0)).save(black)
    args = argparse.Namespace(model="tiny:qwen-image-edit", slow=str(edit_loras / "slow"),
                              fast=str(edit_loras / "fast"), family=None, guidance=None, dtype="float32", device="cpu",
                              control=[str(blue)])
    module, info = load_sampler(args)
    assert info["family"] == "qwen-image-edit"
    latents = [module.generate_latents("make the ball red", 0, 64, 64, 4.0, " ", (load_pixels(c, (64, 64)),))
               for c in (blue, black)]
    assert (latents[0] - latents[1]).abs().mean() > 1e-2 * latents[0].abs().mean()

    argv = ["--model", "tiny:qwen-image-edit", "--slow", str(edit_loras / "slow"), "--fast", str(edit_loras / "fast"),
            "--prompt", "make the ball red", "--height", "64", "--width", "64", "--control", str(blue),
            "--guidance-scale", "4.0", "--negative-prompt", " ", "--output", str(tmp_path / "out")]
    assert run_sample_command(argv) == 0
    text = json.loads(Image.open(tmp_path / "out" / "p0_s0.png").text["glance"])
    assert text["controls"] == [str(blue)] and text["family"] == "qwen-image-edit"


def test_edit_sampling_without_a_control_image_is_refused(edit_loras: Path, tmp_path: Path, capsys):
    argv = ["--model", "tiny:qwen-image-edit", "--slow", str(edit_loras / "slow"), "--fast", str(edit_loras / "fast"),
            "--prompt", "x", "--height", "64", "--width", "64", "--output", str(tmp_path / "o")]
    assert run_sample_command(argv) == 2
    assert "--control" in capsys.readouterr().err
    assert not list(tmp_path.rglob("*.png"))
