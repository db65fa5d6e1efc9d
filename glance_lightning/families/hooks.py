"""The hooks a model family implements: what differs between families, and nothing else.

Four are required: ``encode_prompts``, ``encode_images``, ``decode_latents`` and ``predict_velocity``. The
others have defaults that fit most families: ``guided_velocity`` (classifier-free guidance when sampling),
``collate_conditions`` (variable-length text), ``encode_condition`` (control images; in ``encoding``),
``family_options``, ``latent_shape`` and ``default_negative_prompt``. ``self.pipe`` is the loaded diffusers
pipeline, ``self.transformer`` its transformer with the two adapters, ``self.device`` the device to encode on.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

Conditioning = dict[str, torch.Tensor]


class FamilyHooks:
    """What a family says about its pipeline; mixed into ``GlanceModule``."""

    # The negative prompt guided sampling uses when none is given (SD3's pipelines use ""); None: no default.
    default_negative_prompt: str | None = None

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Text conditioning for a batch of prompts (tensors with batch first)."""
        raise NotImplementedError

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in [-1, 1] -> normalised latents [B, C, h, w]."""
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, h, w] -> pixels [B, 3, H, W] in [-1, 1]."""
        raise NotImplementedError

    def predict_velocity(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity prediction [B, C, h, w] at noise levels ``sigma`` [B] in [0, 1]."""
        raise NotImplementedError

    def family_options(self) -> dict[str, Any]:
        """The family's own init options that sampling must repeat (written into the LoRA metadata)."""
        return {}

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """Latent (C, h, w) of an image of ``height`` x ``width`` pixels."""
        factor, config = self.pipe.vae_scale_factor, self.pipe.vae.config
        channels = getattr(config, "latent_channels", None) or config.z_dim
        return (channels, height // factor, width // factor)

    def guided_velocity(
        self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, negative: Conditioning | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Velocity used at sampling time; families with classifier-free guidance override this."""
        return self.predict_velocity(noisy, sigma, cond)

    def collate_conditions(self, conds: Sequence[Conditioning]) -> Conditioning:
        """Batch per-sample conditioning; families with variable-length text override this."""
        return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
