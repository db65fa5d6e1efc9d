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


# ------------------------------------------------------------------------------------------ Edit-2511


@pytest.fixture(scope="module")
def model_2511(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Edit-Plus model with Qwen-Image-Edit-2511's one transformer difference: ``zero_cond_t`` set in its
    transformer/config.json (the control images' tokens modulated at timestep 0)."""
    import json
    import shutil

    from glance_lightning.tiny import tiny_model_path

    folder = tmp_path_factory.mktemp("qwen-image-edit-2511") / "model"
    shutil.copytree(tiny_model_path("tiny:qwen-image-edit-plus"), folder)
    config_file = folder / "transformer" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "zero_cond_t": True}))
    return folder


def test_an_edit_2511_checkpoint_gives_the_stock_pipelines_velocity(model_2511: Path):
    """The 2511 config is honoured as the checkpoint says (no setting of ours): for the same latents, prompt and
    controls our module gets the stock QwenImageEditPlusPipeline's velocity, which zero_cond_t changes."""
    from diffusers import QwenImageEditPlusPipeline

    from glance_lightning.compat import allow_qwen2vl_processor_without_torchvision
    from glance_lightning.inference import use_exact_chain

    allow_qwen2vl_processor_without_torchvision()
    pipe = use_exact_chain(QwenImageEditPlusPipeline.from_pretrained(model_2511))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.zero_cond_t
    stock: list[dict] = []
    pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: stock.append({**kw, "out": out[0].clone()}), with_kwargs=True)
    pipe(prompt=PROMPT, image=[Image.open(EDIT / "control" / "ball.png").convert("RGB")], height=64, width=64,
         true_cfg_scale=1.0, sigmas=[0.6], num_inference_steps=1, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    (call,) = stock
    module = QwenImageEditPlusGlance(pretrained_model=str(model_2511), timesteps=TimestepSettings(slow=SLOW, fast=FAST))
    module.load_base_model()
    module.transformer.eval()
    cond = module.conditioning_for(PROMPT, (control_pixels(),))
    # the 64x64 target's 16 tokens (the control's follow), unpacked to the module's latents [1, C, 8, 8]
    target = pipe._unpack_latents(call["hidden_states"][:, :16], 64, 64, pipe.vae_scale_factor).reshape(1, -1, 8, 8)
    with torch.no_grad():
        velocity = module.predict_velocity(target, torch.tensor([0.6]), cond)
    expected = pipe._unpack_latents(call["out"][:, :16], 64, 64, pipe.vae_scale_factor).reshape(1, -1, 8, 8)
    torch.testing.assert_close(velocity, expected, rtol=1e-4, atol=1e-5)

    module.transformer.zero_cond_t = False  # what a loader that ignored the config would compute
    for block in module.transformer.transformer_blocks:
        block.zero_cond_t = False
    with torch.no_grad():
        assert (module.predict_velocity(target, torch.tensor([0.6]), cond) - expected).abs().max() > 1e-4


def test_plan_takes_the_2511_transformer_from_the_model_id():
    from glance_lightning.planner.plan import find_architecture
    from glance_lightning.registry import get_family

    spec = get_family("qwen-image-edit-plus")
    arch, source = find_architecture(spec, "Qwen/Qwen-Image-Edit-2511", None, None)
    assert arch["zero_cond_t"] is True and "2511" in source
    arch, _ = find_architecture(spec, "Qwen/Qwen-Image-Edit-2509", None, None)
    assert not arch.get("zero_cond_t")
