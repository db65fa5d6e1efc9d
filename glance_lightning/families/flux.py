"""FLUX.1 (FluxPipeline): CLIP pooled + T5 text, 2x2-packed latents, timestep t/1000, guidance embedding.

Everything reuses the pipeline's own helpers: ``encode_prompt``, ``_pack_latents``, ``_unpack_latents``
and ``_prepare_latent_image_ids``; latents are normalised with the VAE's shift and scaling factors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from diffusers import FluxPipeline

from glance_lightning.errors import ConfigError
from glance_lightning.families.base import Conditioning, GlanceModule
from glance_lightning.families.latents import ShiftScaleLatents
from glance_lightning.lora_layouts import rule
from glance_lightning.settings import checked_text_tokens

# ComfyUI's (BFL) module names of the diffusers modules, for `export --format comfyui/kohya` (the spec's
# lora_layout; a fused qkv/linear1 LoRA holds the q/k/v/proj_mlp ones exactly)
_DOUBLE, _SINGLE = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
# comfy/utils.py flux_to_diffusers
COMFYUI_NAMES = (
    rule("double_blocks.{i}.img_attn.qkv", *(f"{_DOUBLE}.attn.to_{c}" for c in "qkv"), slots=(1, 1, 1)),
    rule("double_blocks.{i}.txt_attn.qkv", *(f"{_DOUBLE}.attn.add_{c}_proj" for c in "qkv"), slots=(1, 1, 1)),
    rule("double_blocks.{i}.img_attn.proj", f"{_DOUBLE}.attn.to_out.0"),
    rule("double_blocks.{i}.txt_attn.proj", f"{_DOUBLE}.attn.to_add_out"),
    rule("double_blocks.{i}.img_mod.lin", f"{_DOUBLE}.norm1.linear"),
    rule("double_blocks.{i}.txt_mod.lin", f"{_DOUBLE}.norm1_context.linear"),
    rule("double_blocks.{i}.img_mlp.0", f"{_DOUBLE}.ff.net.0.proj"),
    rule("double_blocks.{i}.img_mlp.2", f"{_DOUBLE}.ff.net.2"),
    rule("double_blocks.{i}.txt_mlp.0", f"{_DOUBLE}.ff_context.net.0.proj"),
    rule("double_blocks.{i}.txt_mlp.2", f"{_DOUBLE}.ff_context.net.2"),
    rule("single_blocks.{i}.linear1", *(f"{_SINGLE}.attn.to_{c}" for c in "qkv"), f"{_SINGLE}.proj_mlp",
          slots=(1, 1, 1, 4)),
    rule("single_blocks.{i}.linear2", f"{_SINGLE}.proj_out"),
    rule("single_blocks.{i}.modulation.lin", f"{_SINGLE}.norm.linear"),
    rule("img_in", "x_embedder"),
    rule("txt_in", "context_embedder"),
    rule("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    rule("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    rule("vector_in.in_layer", "time_text_embed.text_embedder.linear_1"),
    rule("vector_in.out_layer", "time_text_embed.text_embedder.linear_2"),
    rule("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    rule("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    rule("final_layer.linear", "proj_out"),
    rule("final_layer.adaLN_modulation.1", "norm_out.linear", swap="always"),
)


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
        if not math.isfinite(guidance):
            raise ConfigError(f"model.guidance={guidance}: give a finite number (FLUX.1-dev samples at 3.5)")
        self.guidance = guidance
        self.max_sequence_length = checked_text_tokens(max_sequence_length, 512)

    def family_options(self) -> dict[str, Any]:
        return {"guidance": self.guidance, "max_sequence_length": self.max_sequence_length}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def pack(self, latents: torch.Tensor, index: int = 0, dtype: torch.dtype | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents [B, C, h, w] -> (2x2-packed tokens [B, h*w/4, 4C], their position ids [h*w/4, 3]) in ``dtype``
        (default: the latents'); ``index`` is the ids' first axis: 0 for the image being denoised, 1 for a
        reference image (FLUX.1 Kontext; usable in ``encode_condition``, before the transformer is loaded)."""
        b, c, h, w = latents.shape
        dtype = dtype or latents.dtype
        tokens = FluxPipeline._pack_latents(latents.to(dtype), b, c, h, w)
        ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, dtype)
        if index:
            ids[..., 0] = index
        return tokens, ids

    def image_tokens(self, tokens: torch.Tensor, ids: torch.Tensor, cond: Conditioning
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hook: the image tokens and ids the transformer sees; a family with reference images (FLUX.1 Kontext)
        appends theirs (e.g. ``cond["control_tokens"]`` made with ``pack(latents, index=1)``) after the noisy
        target's. The prediction is sliced back to the target's tokens."""
        return tokens, ids

    def predict_velocity(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, _, h, w = noisy.shape
        dtype = self.transformer.dtype
        packed, img_ids = self.pack(noisy, dtype=dtype)
        tokens, ids = self.image_tokens(packed, img_ids, cond)
        embeds = cond["prompt_embeds"].to(dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.guidance, device=noisy.device, dtype=torch.float32)
        out = self.transformer(
            hidden_states=tokens,
            timestep=(sigma * self.timestep_scale).to(dtype),
            guidance=guidance,
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        if tokens.shape[1] != packed.shape[1]:
            out = out[:, : packed.shape[1]]
        factor = self.pipe.vae_scale_factor
        return FluxPipeline._unpack_latents(out, h * factor, w * factor, factor)

    def planned_prompt_embeds(self, tokens: int, architecture: Mapping[str, Any]) -> Conditioning:
        return {"prompt_embeds": torch.randn(1, tokens, architecture["joint_attention_dim"]),
                "pooled_prompt_embeds": torch.randn(1, architecture["pooled_projection_dim"])}
