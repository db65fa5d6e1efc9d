"""Qwen-Image-Edit (QwenImageEditPipeline) and Edit-2509/2511 (QwenImageEditPlusPipeline).

What differs from Qwen-Image, each step following the diffusers pipeline:

- the prompt is encoded TOGETHER with the control image(s) by Qwen2.5-VL (the pipeline's ``encode_prompt`` with
  ``image=``), so a conditioning belongs to a (prompt, control images) pair and is cached under both;
- each control image is also VAE-encoded, normalised like the target, packed 2x2 separately, and its tokens
  are concatenated after the noisy target tokens; ``img_shapes = [[target, control, ...]]`` gives every image
  its own RoPE grid, and the prediction is sliced back to the target tokens.

Control resizing follows the pipelines (diffusers 0.42): Qwen-Image-Edit resizes the control to an area of
1024 x 1024 (aspect kept, sides multiples of 32) and feeds that same image to the VAE and to the VL encoder;
the Plus pipeline resizes each control to 1024 x 1024 for the VAE and to 384 x 384 for the VL encoder.
``control_resolution`` / ``condition_resolution`` change those areas (null keeps the control at the training
size), e.g. to keep a tiny CPU run small; the defaults are what the stock pipeline does at inference.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as edit_plus_module
from PIL import Image

from glance_lightning.errors import ConfigError
from glance_lightning.families.base import Conditioning
from glance_lightning.families.qwen_image import QwenImageGlance

log = logging.getLogger(__name__)


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) of about ``area`` pixels at aspect ``ratio`` = w / h, each a multiple of 32: the edit
    pipelines' own ``calculate_dimensions``."""
    return edit_plus_module.calculate_dimensions(area, ratio)


def _host_rows(shapes: torch.Tensor) -> list[list[list[int]]]:
    """``control_shapes`` (a CPU tensor) as Python lists, read once per call; outside any fake-tensor mode, so
    that the planner's full-size step on fake tensors can pass the real grid."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily():
        return shapes.tolist()


class QwenImageEditGlance(QwenImageGlance):
    """Glance for Qwen-Image-Edit: one control image per sample (``image/`` + ``control/``)."""

    family = "qwen-image-edit"
    host_condition_keys = ("control_shapes",)  # img_shapes of the controls: read as a list on every call

    def __init__(
        self, *args: Any, control_resolution: int | None = 1024, condition_resolution: int | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            control_resolution: control images are resized to an area of about this squared (aspect kept, sides
                multiples of 32) before the VAE, as the pipeline does at inference (1024); null keeps them at
                the training size.
            condition_resolution: the same for the image the VL text encoder sees; null means the image given to
                the VAE (what QwenImageEditPipeline does).
        """
        super().__init__(*args, **kwargs)
        for name, value in (("control_resolution", control_resolution),
                            ("condition_resolution", condition_resolution)):
            if value is not None and value <= 0:
                raise ConfigError(f"model.{name}={value} must be positive (or null)")
        self.control_resolution = control_resolution
        self.condition_resolution = condition_resolution

    def family_options(self) -> dict[str, Any]:
        return {
            **super().family_options(),
            "control_resolution": self.control_resolution,
            "condition_resolution": self.condition_resolution,
        }

    # ------------------------------------------------------------------ conditioning
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        raise ValueError(f"{self.family} encodes a prompt together with its control image(s): use "
                         "encode_condition(prompt, controls)")

    def encode_condition(self, prompt: str, controls: Sequence[torch.Tensor]) -> Conditioning:
        """Text + control conditioning (the shared caches key it by prompt and control pixels)."""
        return self.encode_edit(prompt, controls)

    def control_images_for(self, controls: Sequence[torch.Tensor]) -> tuple[list[Image.Image], list[torch.Tensor]]:
        """(images for the VL encoder, VAE pixels [1, 3, H, W]) of the controls, resized as the pipeline does."""
        processor = self.pipe.image_processor
        vl_images, vae_pixels = [], []
        for control in controls:
            image = processor.postprocess(control.detach().float().cpu().unsqueeze(0), output_type="pil")[0]
            ratio = image.width / image.height
            vae_w, vae_h = self._resized(image, self.control_resolution, ratio)
            vae_image = processor.resize(image, vae_h, vae_w)
            vae_pixels.append(processor.preprocess(vae_image, vae_h, vae_w))
            if self.condition_resolution is None:
                vl_images.append(vae_image)
            else:
                cond_w, cond_h = self._resized(image, self.condition_resolution, ratio)
                vl_images.append(processor.resize(image, cond_h, cond_w))
        return vl_images, vae_pixels

    @staticmethod
    def _resized(image: Image.Image, resolution: int | None, ratio: float) -> tuple[int, int]:
        if resolution is None:
            return image.width, image.height
        return calculate_dimensions(resolution * resolution, ratio)

    def _vl_image_argument(self, images: list[Image.Image]) -> Image.Image | list[Image.Image]:
        """QwenImageEditPipeline passes its single control image as is."""
        return images[0]

    def encode_edit(self, prompt: str, controls: Sequence[torch.Tensor]) -> Conditioning:
        vl_images, vae_pixels = self.control_images_for(controls)
        embeds, mask = self.pipe.encode_prompt(
            prompt=[prompt], image=self._vl_image_argument(vl_images), device=self.device,
            max_sequence_length=self.max_sequence_length,
        )
        cond = self._text_conditioning(embeds, mask)
        vae = self.pipe.vae
        return {**cond, **self._control_inputs([p.to(self.device, vae.dtype) for p in vae_pixels])}

    def _control_inputs(self, vae_pixels: Sequence[torch.Tensor]) -> Conditioning:
        """VAE pixels [1, 3, H, W] of each control -> their packed latents, concatenated, and their img_shapes
        (kept on the host: it becomes a Python list for every call)."""
        packed, shapes = [], []
        for pixels in vae_pixels:
            latents = self.encode_images(pixels)
            packed.append(self._pack(latents))
            shapes.append((1, latents.shape[-2] // 2, latents.shape[-1] // 2))
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # a real tensor under the planner's fake mode too
            control_shapes = torch.tensor([shapes], dtype=torch.long)
        return {"control_latents": torch.cat(packed, dim=1), "control_shapes": control_shapes}

    def planned_condition(self, controls: Sequence[torch.Tensor], tokens: int,
                          architecture: Mapping[str, Any]) -> Conditioning:
        """For the planner: text of ``tokens`` tokens and the controls' latents at ``control_resolution`` (the
        pipeline's PIL resizing of the controls is host work that fake tensors cannot do)."""
        sizes = [(c.shape[-1], c.shape[-2]) if self.control_resolution is None else
                 calculate_dimensions(self.control_resolution ** 2, c.shape[-1] / c.shape[-2]) for c in controls]
        pixels = [torch.empty(1, 3, h, w) for w, h in sizes]
        return {**self.planned_prompt_embeds(tokens, architecture), **self._control_inputs(pixels)}

    # ------------------------------------------------------------------ transformer
    def _image_inputs(
        self, packed: torch.Tensor, cond: Conditioning, h: int, w: int
    ) -> tuple[torch.Tensor, list[list[tuple[int, int, int]]]]:
        """Noisy target tokens, then the control tokens; img_shapes = [[target, control, ...]] per sample."""
        controls = cond["control_latents"].to(packed.device, packed.dtype)
        if controls.shape[0] != packed.shape[0]:
            controls = controls.expand(packed.shape[0], -1, -1)
        rows = _host_rows(cond["control_shapes"])
        shapes = [tuple(s) for s in rows[0]]
        if any(row != rows[0] for row in rows[1:]):
            raise ConfigError("a batch of edit samples needs control images of one size; use data.batch_size 1")
        img_shapes = [[(1, h // 2, w // 2), *shapes]] * packed.shape[0]
        return torch.cat([packed, controls], dim=1), img_shapes


class QwenImageEditPlusGlance(QwenImageEditGlance):
    """Glance for Qwen-Image-Edit-2509/2511: one to three control images per sample (``control/``,
    ``control_2/``, ``control_3/``), each shown to the VL encoder as "Picture i:"."""

    family = "qwen-image-edit-plus"

    def __init__(
        self, *args: Any, control_resolution: int | None = 1024, condition_resolution: int | None = 384,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            control_resolution: area (squared) of the control images given to the VAE; the pipeline uses 1024.
            condition_resolution: area (squared) of the control images the VL encoder sees; the pipeline uses 384.
        """
        super().__init__(
            *args, control_resolution=control_resolution, condition_resolution=condition_resolution, **kwargs
        )

    def _vl_image_argument(self, images: list[Image.Image]) -> Image.Image | list[Image.Image]:
        """QwenImageEditPlusPipeline always passes a list ("Picture 1: ... Picture n:")."""
        return images

