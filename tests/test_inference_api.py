"""The library API on every family's stock diffusers pipeline: one call over the exact chain."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers import QwenImageEditPipeline, QwenImagePipeline, StableDiffusion3Pipeline
from glance_lightning.datamodules.glance import GlanceDataModule
from PIL import Image

from glance_lightning.families import family_class
from glance_lightning.inference import chained_call, load_glance_loras
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings
from glance_lightning.tiny import tiny_model_path

SLOW = [1000.0, 979.1915, 957.5157, 934.9171, 911.3354]
FAST = [886.7053, 745.0728, 562.9505, 320.0802, 20.0]
CASES = {  # family: (stock pipeline, dataset, timestep scale the transformer takes, extra family options)
    "sd3": (StableDiffusion3Pipeline, "t2i", 1000.0, {"max_sequence_length": 32}),
    "qwen-image": (QwenImagePipeline, "t2i", 1.0, {"max_sequence_length": 32}),
    "qwen-image-edit": (QwenImageEditPipeline, "edit", 1.0, {"max_sequence_length": 32, "control_resolution": 64}),
}


@pytest.mark.parametrize("family", list(CASES))
def test_stock_pipeline_on_the_chain_steps_through_the_trained_timesteps(family: str, repo: Path, tmp_path: Path):
    pipeline_class, dataset, scale, options = CASES[family]
    module = family_class(family)(
        pretrained_model=f"tiny:{family}", timesteps=TimestepSettings(slow=SLOW, fast=FAST), slow_steps=1,
        fast_steps=1, lora=LoraSettings(rank=4, alpha=8), optimizer=OptimizerSettings(lr=1e-2, warmup_steps=1),
        output_dir=str(tmp_path / "out"), **options,
    )
    data = GlanceDataModule(path=str(repo / f"glance_lightning/assets/samples/{dataset}"), resolution=64)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=tmp_path).fit(module, data)

    pipe = pipeline_class.from_pretrained(tiny_model_path(f"tiny:{family}"))
    pipe.set_progress_bar_config(disable=True)
    loras = load_glance_loras(pipe, tmp_path / "out" / "slow", tmp_path / "out" / "fast")
    seen: list[tuple[float, list[str]]] = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((float(kwargs["timestep"][0]), list(pipe.get_active_adapters()))),
        with_kwargs=True,
    )
    kwargs = dict(prompt="a red ball", height=64, width=64, max_sequence_length=32, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    if family == "qwen-image-edit":
        kwargs["image"] = Image.open(repo / "glance_lightning/assets/samples/edit/control/ball.png").convert("RGB")
    chained_call(pipe, loras, **kwargs)
    sigmas = [t / 1000 for t in SLOW + FAST]
    calls_per_step = len(seen) // len(sigmas)  # SD3 batches CFG into one call; true CFG makes two
    stepped = [t for t, _ in seen][::calls_per_step]
    assert stepped == pytest.approx([s * scale for s in sigmas], rel=1e-5, abs=1e-5)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(sigmas + [0.0], abs=1e-6)
    adapters = [a for _, a in seen][::calls_per_step]
    assert adapters == [["slow"]] * 5 + [["fast"]] * 5
