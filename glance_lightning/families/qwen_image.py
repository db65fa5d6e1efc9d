"""Qwen-Image (QwenImagePipeline): Qwen2.5-VL text embeddings + mask, 2x2-packed latents, timestep t/1000, true CFG.

Everything reuses the pipeline's own helpers: ``encode_prompt``, ``_pack_latents`` and ``_unpack_latents``; latents
are normalised with the VAE's per-channel ``latents_mean``/``latents_std`` exactly as the pipelines do. The Qwen VAE
is a causal video VAE with a frame axis ([B, C, 1, h, w]); that axis is added and dropped inside
``encode_images``/``decode_latents``, so the shared latent representation stays [B, C, h, w].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from glance_lightning.families.base import Conditioning, GlanceModule
from glance_lightning.settings import checked_text_tokens

# The LoRA targets of the official Glance Qwen-Image runs.
QWEN_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
    "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1",
)


def no_padding(mask: torch.Tensor) -> bool:
    """Whether no text token is padding. A mask without values (the planner's fake tensors) counts as none: every
    single-prompt encoding is unpadded, and the planner plans one prompt's tokens."""
    from torch._subclasses.fake_tensor import is_fake

    return True if is_fake(mask) else bool(mask.all())


def pad_tokens(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad a token-wise tensor ([B, L] or [B, L, D]) with zeros to ``length`` tokens."""
    missing = length - tensor.shape[1]
    if missing == 0:
        return tensor
    pad = (0, 0, 0, missing) if tensor.dim() == 3 else (0, missing)
    return F.pad(tensor, pad)


class QwenLatents(GlanceModule):
    """What the Qwen-Image generations share: the VAE latents normalised with ``latents_mean``/``latents_std`` (a
    frame axis added and dropped around the causal video VAE) and an explicit text mask. Not a family by itself."""

    token_keys: tuple[str, ...] = ("prompt_embeds", "prompt_embeds_mask")  # conditioning padded token-wise

    def collate_conditions(self, conds: Sequence[Conditioning]) -> Conditioning:
        """Prompts have different token counts: right-pad the token-wise entries (embeddings with zeros, masks
        with 0), as the pipelines' own batched ``encode_prompt`` does."""
        length = max(c["prompt_embeds"].shape[1] for c in conds)
        return {key: torch.cat([pad_tokens(c[key], length) if key in self.token_keys else c[key] for c in conds])
                for key in conds[0]}

    @staticmethod
    def _text_conditioning(embeds: torch.Tensor, mask: torch.Tensor | None) -> Conditioning:
        """The pipelines return ``mask=None`` when no token is padding; the cache always keeps an explicit mask."""
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask.to(embeds.device, torch.long)}

    # ------------------------------------------------------------------ latents
    def _latent_stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.pipe.vae.config
        shape = (1, config.z_dim, 1, 1, 1)
        mean = torch.tensor(config.latents_mean).view(shape).to(like.device, like.dtype)
        std = torch.tensor(config.latents_std).view(shape).to(like.device, like.dtype)
        return mean, std

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """As QwenImageEditPipeline._encode_vae_image: the distribution's mode ("argmax"), then (z - mean) / std."""
        latents = self.pipe.vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
        mean, std = self._latent_stats(latents)
        return ((latents - mean) / std).squeeze(2)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """As the end of QwenImagePipeline.__call__: z * std + mean, decode, first frame."""
        latents = latents.unsqueeze(2)
        mean, std = self._latent_stats(latents)
        return self.pipe.vae.decode(latents * std + mean, return_dict=False)[0][:, :, 0]


class QwenImageGlance(QwenLatents):
    """Glance for Qwen-Image. Defaults follow the official Glance Qwen recipe (see configs/qwen-image.yaml)."""

    family = "qwen-image"
    default_lora_targets = QWEN_LORA_TARGETS
    size_multiple = 16  # 8x VAE, then 2x2 packing (the pipeline's image_processor uses vae_scale_factor * 2)
    timestep_scale = 1.0  # QwenImagePipeline calls the transformer with timestep / 1000 = sigma

    def __init__(self, *args: Any, max_sequence_length: int = 512, **kwargs: Any) -> None:
        """
        Args:
            max_sequence_length: text tokens kept per prompt (after the system prompt is dropped), as the
                pipeline's ``max_sequence_length`` (at most 1024).
        """
        super().__init__(*args, **kwargs)
        self.max_sequence_length = checked_text_tokens(max_sequence_length, 1024)

    def family_options(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    # ------------------------------------------------------------------ text
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, mask = self.pipe.encode_prompt(
            prompt=prompts, device=self.device, max_sequence_length=self.max_sequence_length
        )
        return self._text_conditioning(embeds, mask)

    def planned_prompt_embeds(self, tokens: int, architecture: Mapping[str, Any]) -> Conditioning:
        return {"prompt_embeds": torch.randn(1, tokens, architecture["joint_attention_dim"]),
                "prompt_embeds_mask": torch.ones(1, tokens, dtype=torch.long)}

    # ------------------------------------------------------------------ transformer
    def _pack(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, h, w = latents.shape
        return self.pipe._pack_latents(latents, b, c, h, w)

    def _unpack(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        factor = self.pipe.vae_scale_factor
        return self.pipe._unpack_latents(tokens, h * factor, w * factor, factor).squeeze(2)

    def _image_inputs(
        self, packed: torch.Tensor, cond: Conditioning, h: int, w: int
    ) -> tuple[torch.Tensor, list[list[tuple[int, int, int]]]]:
        """Image tokens given to the transformer and their ``img_shapes`` (the edit families append controls)."""
        return packed, [[(1, h // 2, w // 2)]] * packed.shape[0]

    def predict_tokens(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The transformer's packed prediction [B, h*w/4, 4C] of the target tokens only."""
        _, _, h, w = noisy.shape
        dtype = self.transformer.dtype
        packed = self._pack(noisy.to(dtype))
        hidden, img_shapes = self._image_inputs(packed, cond, h, w)
        mask = cond["prompt_embeds_mask"]
        out = self.transformer(
            hidden_states=hidden,
            timestep=(sigma * self.timestep_scale).to(dtype),
            guidance=None,  # Qwen-Image has no guidance embedding (true CFG instead)
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            # no mask when nothing is padding, as the pipeline does (same result, cheaper attention)
            encoder_hidden_states_mask=None if no_padding(mask) else mask,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        return out[:, : packed.shape[1]]

    def predict_velocity(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        _, _, h, w = noisy.shape
        return self._unpack(self.predict_tokens(noisy, sigma, cond), h, w)

    def guided_velocity(
        self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, negative: Conditioning | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """True CFG exactly as the Qwen pipelines (``true_cfg_scale``): two model calls, the combination
        neg + s * (pos - neg), then rescaled per token to the norm of the conditional prediction."""
        if negative is None or guidance_scale <= 1.0:
            return self.predict_velocity(noisy, sigma, cond)
        _, _, h, w = noisy.shape
        pos = self.predict_tokens(noisy, sigma, cond)
        neg = self.predict_tokens(noisy, sigma, negative)
        combined = neg + guidance_scale * (pos - neg)
        cond_norm = torch.norm(pos, dim=-1, keepdim=True)
        combined_norm = torch.norm(combined, dim=-1, keepdim=True)
        return self._unpack(combined * (cond_norm / combined_norm), h, w)
