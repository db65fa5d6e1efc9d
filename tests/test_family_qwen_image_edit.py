"""What only Qwen-Image-Edit and Edit-2509/2511 (Plus) do, on the tiny models: conditioning that depends on (and
is cached by) the control image, the control-count checks, and the Plus pipeline's defaults. Training with
control images, the quick start, stock-pipeline LoRAs, the stock pipelines' conditioning (prompt encoded with
the controls, control tokens after the target's, img_shapes) and learning are the family contract's
(test_family_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from glance_lightning.datamodules.glance import TrainSample, load_pixels
from PIL import Image

from glance_lightning.families.qwen_image_edit import QwenImageEditGlance, QwenImageEditPlusGlance
from glance_lightning.settings import TimestepSettings

SLOW = [1000.0, 979.1915, 957.5157, 934.9171, 911.3354]
FAST = [886.7053, 745.0728, 562.9505, 320.0802, 20.0]
EDIT = Path(__file__).resolve().parents[1] / "glance_lightning/assets/samples/edit"
OTHER = Path(__file__).resolve().parents[1] / "glance_lightning/assets/samples/t2i/red_ball.png"
PROMPT = "Make the ball red"


@pytest.fixture(scope="module")
def edit_module() -> QwenImageEditGlance:
    """Untrained module with the pipeline's own control resizing (1024x1024 for the VAE and the VL encoder)."""
    module = QwenImageEditGlance(pretrained_model="tiny:qwen-image-edit",
                                 timesteps=TimestepSettings(slow=SLOW, fast=FAST))
    module.load_base_model()
    module.transformer.eval()
    return module


def control_pixels(path: Path = EDIT / "control" / "ball.png") -> torch.Tensor:
    """A control image as the DataModule gives it (it is 128x128 already, so these are its exact pixels)."""
    return load_pixels(path, Image.open(path).size)


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


def test_plus_defaults_follow_the_plus_pipeline():
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_pipeline

    module = QwenImageEditPlusGlance(pretrained_model="tiny:qwen-image-edit-plus")
    assert module.family_spec.control_images == (1, 3) and module.family == "qwen-image-edit-plus"
    assert module.control_resolution ** 2 == plus_pipeline.VAE_IMAGE_SIZE
    assert module.condition_resolution ** 2 == plus_pipeline.CONDITION_IMAGE_SIZE
    # no lists given: derived from the (shared) Qwen-Image-Edit schedule, the official lists at 1024x1024
    assert module.glance_timesteps.as_timesteps()["slow"] == pytest.approx(SLOW, abs=1e-3)
    assert module.glance_timesteps.as_timesteps()["fast"] == pytest.approx(FAST, abs=1e-3)
