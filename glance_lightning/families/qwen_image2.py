"""Qwen-Image 2.x (QwenImage21Pipeline): a Qwen3-VL text encoder, a 16x VAE with 64 latent channels, and one
single-stream block-causal transformer over text and image tokens.

What differs from Qwen-Image, step for step as the pipeline (diffusers 0.42):

- latents: the VAE reads and writes RGBA (training images are opaque: alpha 1), compresses 16x, and the
  transformer reads its latents unpatched, one token per latent position
  (``_pack_latents`` is a plain flatten); normalised with the VAE's ``latents_mean``/``latents_std`` as Qwen-Image's;
  image sides are multiples of 32 (each text-sequence image slot stands for a 2x2 group of latent tokens);
- text: the pipeline's ``encode_prompt`` returns the embeddings, their mask and an ``image_pad_mask`` (True at the
  encoder's image slots); the transformer's ``img_mask`` is that mask with one slot per 2x2 group of target tokens
  appended, and its output covers the whole joint sequence, of which the target tokens are the tail;
- timestep t/1000 = sigma; no guidance embedding; true CFG (neg + s * (pos - neg)) only with a negative prompt;
- the schedule: a checkpoint may declare ``sample_sigmas`` in ``model_index.json`` (its fixed grid); the Slow/Fast
  lists are then read off that grid (``model_schedule``), else off the 50-step table as for Qwen-Image.

Training is text-to-image (the pipeline's condition images are not used; editing with Qwen-Image 2.x stays with
its stock pipeline). ``plan`` simulates the step on fake tensors with the image-slot mask as a real host tensor:
the transformer derives its sequence layout from it (``repeat_interleave``, ``nonzero``), which
``planner.host_layout`` runs for real.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily

from glance_lightning.families.base import Conditioning
from glance_lightning.families.hooks import expand_condition
from glance_lightning.families.qwen_image import QwenLatents, no_padding
from glance_lightning.lora_layouts import rule
from glance_lightning.planner.host_layout import host_layout

VAE_FACTOR = 16  # the pipeline's vae_scale_factor: the VAE's 16x, no patching
TOKENS_PER_SLOT = 4  # one text-sequence image slot = a 2x2 group of latent tokens

# ComfyUI's Qwen-Image 2.x module names are diffusers' own, except that it fuses each block's SwiGLU gate and up
# projections into one ``img_mlp.gate_up`` (gate rows first): diffusers' convert_qwen_image21_transformer_checkpoint.
_BLOCK = "transformer_blocks.{i}"
COMFYUI_NAMES = (
    *(rule(f"{_BLOCK}.attn.{name}", f"{_BLOCK}.attn.{name}") for name in ("to_q", "to_k", "to_v", "to_out.0")),
    rule(f"{_BLOCK}.img_mlp.gate_up", f"{_BLOCK}.img_mlp.gate_layer", f"{_BLOCK}.img_mlp.proj", slots=(3, 3)),
    rule(f"{_BLOCK}.img_mlp.out", f"{_BLOCK}.img_mlp.out"),
    *(rule(name, name) for name in ("img_in", "txt_in.in_layer", "txt_in.out_layer", "modulation.1", "proj_out",
                                    "time_text_embed.timestep_embedder.linear_1",
                                    "time_text_embed.timestep_embedder.linear_2")),
)


class QwenImage2Glance(QwenLatents):
    """Glance for Qwen-Image 2.x (text to image)."""

    family = "qwen-image-2"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # every block's attention
    size_multiple = 2 * VAE_FACTOR  # the pipeline rounds sides to multiples of 32
    timestep_scale = 1.0  # the pipeline calls the transformer with timestep / 1000 = sigma
    token_keys = ("prompt_embeds", "prompt_embeds_mask", "image_pad_mask")  # padded with 0 / False
    host_condition_keys = ("image_pad_mask",)  # the sequence layout: on the host until the call (a real one in plan)

    # ------------------------------------------------------------------ text
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, mask, image_pad_mask = self.pipe.encode_prompt(prompt=prompts, device=self.device)
        return {**self._text_conditioning(embeds, mask), "image_pad_mask": image_pad_mask.to(embeds.device)}

    def planned_prompt_embeds(self, tokens: int, architecture: Mapping[str, Any]) -> Conditioning:
        """Fake embeddings; the image-slot mask a real host tensor (see ``host_layout``)."""

        with unset_fake_temporarily():
            slots = torch.zeros(1, tokens, dtype=torch.bool)
        return {"prompt_embeds": torch.randn(1, tokens, architecture["context_in_dim"]),
                "prompt_embeds_mask": torch.ones(1, tokens, dtype=torch.long), "image_pad_mask": slots}

    # ------------------------------------------------------------------ latents
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """RGB pixels -> latents. The VAE reads RGBA: the pipeline converts every image to RGBA, so an opaque
        alpha channel (+1 in [-1, 1]) is added, as its preprocessing gives."""
        if self.pipe.vae.config.in_channels == 4:
            pixels = torch.cat([pixels, torch.ones_like(pixels[:, :1])], dim=1)
        return super().encode_images(pixels)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> RGB pixels (the VAE's alpha channel dropped)."""
        return super().decode_latents(latents)[:, :3]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.pipe.vae.config.z_dim, height // VAE_FACTOR, width // VAE_FACTOR)

    # ------------------------------------------------------------------ transformer
    def predict_velocity(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        with host_layout() if is_fake(noisy) else nullcontext():
            return self._velocity(noisy, sigma, cond)

    def _velocity(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = noisy.shape
        dtype = self.transformer.dtype
        cond = expand_condition(cond, b)
        slots = cond["image_pad_mask"].to(noisy.device, torch.bool)
        img_mask = torch.cat([slots, slots.new_ones(b, h * w // TOKENS_PER_SLOT)], dim=1)
        mask = cond["prompt_embeds_mask"]
        out = self.transformer(
            hidden_states=noisy.to(dtype).reshape(b, c, h * w).transpose(1, 2),  # _pack_latents
            timestep=(sigma * self.timestep_scale).to(dtype),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            encoder_hidden_states_mask=None if no_padding(mask) else mask,  # as the pipeline: none when unpadded
            img_shapes=[[(1, h, w)]] * b,
            img_mask=img_mask,
            return_dict=False,
        )[0]
        return out[:, -h * w:].transpose(1, 2).reshape(b, c, h, w)  # the target tokens, back on their grid

    def guided_velocity(
        self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, negative: Conditioning | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """True CFG as QwenImage21Pipeline: neg + s * (pos - neg), only with a negative prompt and s > 1."""
        if negative is None or guidance_scale <= 1.0:
            return self.predict_velocity(noisy, sigma, cond)
        pos = self.predict_velocity(noisy, sigma, cond)
        neg = self.predict_velocity(noisy, sigma, negative)
        return neg + guidance_scale * (pos - neg)
