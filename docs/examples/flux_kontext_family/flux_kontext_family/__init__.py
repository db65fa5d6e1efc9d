"""FLUX.1 Kontext [dev] as a Glance family, from outside glance_lightning: an edit family with one control image.

Everything but what Kontext adds comes from the FLUX.1 family: ``like="flux"`` gives the spec FLUX's scheduler
config, full-size architecture and encoder sizes (``plan``), ComfyUI key layout (``export``), guidance kind
(``sample --guidance``) and tiny builder (``tiny:kontext-example``, built as a FluxKontextPipeline), and
subclassing ``FluxGlance`` gives its text encoding, latents and transformer call. Kontext adds one thing: the
control image's latents, packed 2x2 like the target's with position ids whose first axis is 1, follow the noisy
target's tokens (FluxKontextPipeline.prepare_latents); the prediction is sliced back to the target's tokens.

Importing this module registers the family; its package metadata names it under the ``glance_lightning.families``
entry-point group, so the command line knows it too (see docs/new-family.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glance_lightning.families.flux import FluxGlance
from glance_lightning.families.hooks import Conditioning
from glance_lightning.registry import FamilySpec, register_family

NAME = "kontext-example"


class KontextGlance(FluxGlance):
    """Glance for FLUX.1 Kontext [dev]: ``image/`` + ``control/`` pairs, one control image per sample."""

    family = NAME

    def encode_condition(self, prompt: str, controls: Sequence[torch.Tensor]) -> Conditioning:
        """FLUX's text conditioning plus the control image ([3, H, W] in [-1, 1]) as reference tokens."""
        cond = self.encode_prompts([prompt])
        pixels = controls[0].unsqueeze(0).to(self.device, self.pipe.vae.dtype)
        tokens, ids = self.pack(self.encode_images(pixels), index=1)
        return {**cond, "control_tokens": tokens, "control_ids": ids.unsqueeze(0)}  # batch first, as cached

    def image_tokens(self, tokens: torch.Tensor, ids: torch.Tensor, cond: Conditioning
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy target's tokens, then the control's (one control for every sample of the batch)."""
        control = cond["control_tokens"].to(tokens.device, tokens.dtype).expand(tokens.shape[0], -1, -1)
        control_ids = cond["control_ids"][0].to(ids.device, ids.dtype)
        return torch.cat([tokens, control], dim=1), torch.cat([ids, control_ids], dim=0)


SPEC = register_family(FamilySpec(
    name=NAME, like="flux", module=KontextGlance, pipeline="diffusers:FluxKontextPipeline",
    control_images=(1, 1), guidance="guidance embedding (`guidance`); the control image as reference tokens",
))
