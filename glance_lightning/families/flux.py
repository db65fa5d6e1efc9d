"""FLUX.1 (FluxPipeline): CLIP pooled + T5 text, 2x2-packed latents, timestep t/1000, guidance embedding.

Everything reuses the pipeline's own helpers: ``encode_prompt``, ``_pack_latents``, ``_unpack_latents``
and ``_prepare_latent_image_ids``; latents are normalised with the VAE's shift and scaling factors.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline

from glance_lightning.families.base import Conditioning, GlanceModule
from glance_lightning.families.latents import ShiftScaleLatents


class FluxGlance(ShiftScaleLatents, GlanceModule):
    """Glance for FLUX.1-dev/schnell. Defaults follow the official FLUX.1-dev recipe."""

    family = "flux"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    size_multiple = 16
    timestep_scale = 1.0  # FluxPipeline calls the transformer with timestep / 1000

    def __init__(self, *args: Any, guidance: float = 1.0, max_sequence_length: int = 512, **kwargs: Any) -> None:
        """
        Args:
            guidance: value of FLUX.1-dev's guidance embedding, in training and sampling (ignored by schnell,
                which has no guidance embedding).
            max_sequence_length: T5 tokens per prompt.
        """
        super().__init__(*args, **kwargs)
        self.guidance = guidance
        self.max_sequence_length = max_sequence_length

    def family_options(self) -> dict[str, Any]:
        return {"guidance": self.guidance, "max_sequence_length": self.max_sequence_length}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def predict_velocity(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = noisy.shape
        dtype = self.transformer.dtype
        packed = FluxPipeline._pack_latents(noisy.to(dtype), b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        embeds = cond["prompt_embeds"].to(dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=packed,
            timestep=(sigma * self.timestep_scale).to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        factor = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * factor, w * factor, factor)
