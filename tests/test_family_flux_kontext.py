"""FLUX.1 Kontext beyond the contract suite: the control image resized exactly as FluxKontextPipeline resizes it
(its preferred resolutions, the default), the planner's conditioning shaped like the real one, and a batch of
controls of different sizes refused with one line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import FluxKontextPipeline
from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS
from PIL import Image

from glance_lightning.errors import ConfigError
from glance_lightning.families.flux_kontext import FluxKontextGlance, control_size
from glance_lightning.inference import use_exact_chain
from glance_lightning.tiny import tiny_model_path

REPO = Path(__file__).resolve().parents[1]
CONTROL = REPO / "glance_lightning/assets/samples/edit/control/ball.png"
PROMPT = "Make the ball red"


def test_control_size_is_the_pipelines_preferred_resolution_nearest_the_aspect():
    assert control_size(128, 128, auto_resize=True) == (1024, 1024)
    assert control_size(1920, 1080, auto_resize=True) == (1392, 752)  # 16:9 -> the nearest listed aspect
    assert control_size(100, 300, auto_resize=True) == (672, 1568)  # beyond the list: its tallest entry
    assert control_size(1000, 1000, auto_resize=False) == (992, 992)  # kept, floored to multiples of 16
    for width, height in PREFERRED_KONTEXT_RESOLUTIONS:
        assert control_size(width, height, auto_resize=True) == (width, height)


def _module(**options: Any) -> FluxKontextGlance:
    module = FluxKontextGlance(pretrained_model="tiny:flux-kontext", timesteps={"slow": [1.0], "fast": [0.5]},
                               max_sequence_length=32, **options)
    module.load_base_model()
    module.transformer.eval()
    return module


def _control() -> torch.Tensor:
    data = torch.frombuffer(bytearray(Image.open(CONTROL).convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(128, 128, 3).permute(2, 0, 1).float().div(127.5).sub(1.0)


@pytest.fixture(scope="module")
def auto_resized() -> FluxKontextGlance:
    return _module()  # auto_resize: true, the default


def test_default_resizing_gives_the_stock_pipelines_transformer_inputs(auto_resized: FluxKontextGlance):
    """The stock call with its default control resizing (128x128 -> 1024x1024: 4096 control tokens) at a 64x64
    output: our module, given the same latents and sigma, calls the transformer with the same tensors."""
    pipe = use_exact_chain(FluxKontextPipeline.from_pretrained(tiny_model_path("tiny:flux-kontext")))
    pipe.set_progress_bar_config(disable=True)
    stock: list[dict[str, Any]] = []
    pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: stock.append({**kw, "out": out[0].clone()}), with_kwargs=True)
    pipe(prompt=PROMPT, image=Image.open(CONTROL).convert("RGB"), height=64, width=64, max_area=64 * 64,
         guidance_scale=1.0, max_sequence_length=32, sigmas=[0.6], num_inference_steps=1, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    (call,) = stock
    assert call["hidden_states"].shape[1] == 16 + 64 * 64

    ours: list[dict[str, Any]] = []
    auto_resized.transformer.register_forward_pre_hook(lambda m, a, kw: ours.append(kw), with_kwargs=True)
    cond = auto_resized.conditioning_for(PROMPT, (_control(),))
    target = pipe._unpack_latents(call["hidden_states"][:, :16], 64, 64, pipe.vae_scale_factor)
    with torch.no_grad():
        velocity = auto_resized.predict_velocity(target, torch.tensor([0.6]), cond)
    (given,) = ours
    for key in ("hidden_states", "img_ids", "txt_ids", "encoder_hidden_states", "pooled_projections", "timestep",
                "guidance"):
        torch.testing.assert_close(given[key], call[key], rtol=1e-4, atol=1e-5, msg=key)
    expected = pipe._unpack_latents(call["out"][:, :16], 64, 64, pipe.vae_scale_factor)
    torch.testing.assert_close(velocity, expected, rtol=1e-4, atol=1e-5)


def test_planned_condition_has_the_real_conditionings_shapes(auto_resized: FluxKontextGlance):
    """`plan` cannot run PIL on fake tensors: its conditioning is sized by arithmetic, equal to the real one."""
    real = auto_resized.encode_condition(PROMPT, (_control(),))
    architecture = {"joint_attention_dim": 32, "pooled_projection_dim": 32}
    planned = auto_resized.planned_condition((torch.empty(3, 128, 128),), 32, architecture)
    assert real.keys() == planned.keys()
    assert {k: planned[k].shape for k in planned} == {k: real[k].shape for k in real}
    assert planned["control_latents"].shape[-2:] == (128, 128)  # 1024x1024 through the 8x VAE


def test_a_batch_of_controls_of_different_sizes_is_refused_in_one_line(auto_resized: FluxKontextGlance):
    small = {"prompt_embeds": torch.zeros(1, 4, 32), "control_latents": torch.zeros(1, 16, 8, 8)}
    large = {**small, "control_latents": torch.zeros(1, 16, 16, 16)}
    assert auto_resized.collate_conditions([small, small])["control_latents"].shape == (2, 16, 8, 8)
    with pytest.raises(ConfigError, match="batch_size 1"):
        auto_resized.collate_conditions([small, large])
