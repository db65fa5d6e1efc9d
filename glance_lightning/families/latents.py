"""Latent normalisations shared by several families."""

from __future__ import annotations

import torch


class ShiftScaleLatents:
    """Latents of an AutoencoderKL normalised with its shift and scaling factors (FLUX, SD3)."""

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        latents = vae.encode(pixels).latent_dist.mode()
        return (latents - vae.config.shift_factor) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor, return_dict=False)[0]
