"""The hooks a model family implements: what differs between families, and nothing else.

Four are required: ``encode_prompts``, ``encode_images``, ``decode_latents`` and ``predict_velocity``. The
others have defaults that fit most families: ``guided_velocity`` (classifier-free guidance when sampling),
``collate_conditions`` (variable-length text), ``encode_condition`` (control images; in ``encoding``),
``family_options``, ``latent_shape`` and ``default_negative_prompt``; ``plan`` needs ``planned_prompt_embeds``
(and ``planned_condition`` where ``encode_condition`` does host-side work). ``self.pipe`` is the loaded diffusers
pipeline, ``self.transformer`` its transformer with the two adapters, ``self.device`` the device to encode on.
docs/new-family.md lists them with their tensor formats.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

Conditioning = dict[str, torch.Tensor]


def expand_condition(cond: Conditioning, batch: int) -> Conditioning:
    """Broadcast a one-prompt conditioning to ``batch`` samples (batched conditioning is left as it is)."""
    return {k: v.expand(batch, *v.shape[1:]) if v.shape[0] == 1 and batch > 1 else v for k, v in cond.items()}


class FamilyHooks:
    """What a family says about its pipeline; mixed into ``GlanceModule``."""

    # The negative prompt guided sampling uses when none is given (SD3's pipelines use ""); None: no default.
    default_negative_prompt: str | None = None
    # Conditioning entries that stay on the host (e.g. a grid the transformer call reads as a Python list).
    host_condition_keys: tuple[str, ...] = ()

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

    # ------------------------------------------------------------------ planning (`plan`, on fake tensors)
    def planned_prompt_embeds(self, tokens: int, architecture: Mapping[str, Any]) -> Conditioning:
        """What ``encode_prompts`` returns for one prompt of ``tokens`` text tokens at full size, for the planner:
        tensors of the right shapes and dtypes (it calls this under a fake-tensor mode, where they cost nothing).
        ``architecture`` is the full-size transformer config (e.g. its ``joint_attention_dim``)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot be planned: define planned_prompt_embeds(tokens, architecture) (the "
            "shapes encode_prompts returns; see docs/new-family.md), or subclass a family that has it"
        )

    def planned_condition(self, controls: Sequence[torch.Tensor], tokens: int,
                          architecture: Mapping[str, Any]) -> Conditioning:
        """The conditioning of one training sample at full size, for the planner: the family's own
        ``encode_condition`` with its text encoders stood in by ``planned_prompt_embeds`` (``encode_images``
        answers latents of ``latent_shape`` there). Override only where ``encode_condition`` does host-side work
        on the control pixels (PIL resizing), which fake tensors cannot do."""
        self.encode_prompts = lambda prompts: self.planned_prompt_embeds(tokens, architecture)  # type: ignore
        try:
            return self.encode_condition("", controls)
        finally:
            del self.encode_prompts
