"""FLUX.1 Kontext [dev] (FluxKontextPipeline): FLUX.1 with one control image as reference tokens.

Everything but the control comes from the FLUX.1 family (text encoding, latents, guidance embedding, timestep
t/1000, the 2x2 packing). What Kontext adds, step for step as the pipeline (diffusers 0.42):

- the control image is resized as ``FluxKontextPipeline.__call__`` does: by default (``auto_resize``, the
  pipeline's ``_auto_resize=True``) to the preferred Kontext resolution nearest its aspect ratio (about one
  megapixel, whatever the output size), else kept at its size; either way floored to multiples of 16;
- it is VAE-encoded and normalised like the target, packed 2x2 with position ids whose first axis is 1, and its
  tokens follow the noisy target's (``prepare_latents``); the prediction is sliced back to the target's tokens;
- the schedule's ``mu`` is the target's sequence length alone, so the Slow/Fast lists are FLUX.1's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.pipelines.flux import pipeline_flux_kontext

from glance_lightning.errors import ConfigError
from glance_lightning.families.flux import FluxGlance
from glance_lightning.families.hooks import Conditioning

MULTIPLE = 16  # the pipeline's vae_scale_factor * 2: control sides are floored to multiples of it


def control_size(width: int, height: int, auto_resize: bool) -> tuple[int, int]:
    """(width, height) FluxKontextPipeline resizes a ``width`` x ``height`` control image to."""
    if auto_resize:
        ratio = width / height
        preferred = pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS
        _, width, height = min((abs(ratio - w / h), w, h) for w, h in preferred)
    return width // MULTIPLE * MULTIPLE, height // MULTIPLE * MULTIPLE


class FluxKontextGlance(FluxGlance):
    """Glance for FLUX.1 Kontext [dev]: ``image/`` + ``control/`` pairs, one control image per sample."""

    family = "flux-kontext"

    def __init__(self, *args: Any, auto_resize: bool = True, **kwargs: Any) -> None:
        """
        Args:
            auto_resize: resize each control image to the preferred Kontext resolution nearest its aspect ratio, as
                the pipeline does at inference (its ``_auto_resize``); false keeps it at the training data's size
                (pass ``_auto_resize=False`` to the stock pipeline to sample the same way).
        """
        super().__init__(*args, **kwargs)
        self.auto_resize = bool(auto_resize)

    def family_options(self) -> dict[str, Any]:
        return {**super().family_options(), "auto_resize": self.auto_resize}

    # ------------------------------------------------------------------ conditioning
    def encode_condition(self, prompt: str, controls: Sequence[torch.Tensor]) -> Conditioning:
        """FLUX's text conditioning, plus the control image ([3, H, W] in [-1, 1]) as normalised latents."""
        processor = self.pipe.image_processor
        image = processor.postprocess(controls[0].detach().float().cpu().unsqueeze(0), output_type="pil")[0]
        width, height = control_size(image.width, image.height, self.auto_resize)
        pixels = processor.preprocess(processor.resize(image, height, width), height, width)
        return self._with_control(self.encode_prompts([prompt]), pixels)

    def _with_control(self, cond: Conditioning, pixels: torch.Tensor) -> Conditioning:
        vae = self.pipe.vae
        return {**cond, "control_latents": self.encode_images(pixels.to(self.device, vae.dtype))}

    def planned_condition(self, controls: Sequence[torch.Tensor], tokens: int,
                          architecture: Mapping[str, Any]) -> Conditioning:
        """For the planner: the control's latents at the size the pipeline resizes it to (the PIL resizing is
        host work that fake tensors cannot do)."""
        width, height = control_size(controls[0].shape[-1], controls[0].shape[-2], self.auto_resize)
        return self._with_control(self.planned_prompt_embeds(tokens, architecture), torch.empty(1, 3, height, width))

    def collate_conditions(self, conds: Sequence[Conditioning]) -> Conditioning:
        if len({tuple(c["control_latents"].shape) for c in conds}) > 1:
            raise ConfigError(f"{self.family}: a batch needs control images of one size; use data.batch_size 1 "
                              "or control images of one size")
        return super().collate_conditions(conds)

    # ------------------------------------------------------------------ transformer
    def image_tokens(self, tokens: torch.Tensor, ids: torch.Tensor, cond: Conditioning
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """The noisy target's tokens, then the control's (ids' first axis 1); one control for the whole batch
        where the conditioning holds one."""
        control, control_ids = self.pack(cond["control_latents"].to(tokens.device), index=1, dtype=tokens.dtype)
        if control.shape[0] != tokens.shape[0]:
            control = control.expand(tokens.shape[0], -1, -1)
        return torch.cat([tokens, control], dim=1), torch.cat([ids, control_ids.to(ids.dtype)], dim=0)
