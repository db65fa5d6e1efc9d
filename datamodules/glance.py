"""The Glance DataModule: a validated folder of image/caption pairs (optionally with control images).

It validates the whole dataset in one pass before any model is loaded, loads every image once at the
training resolution and meets the ``glance_lightning.draws.GlanceData`` protocol: typed ``train_samples`` (the
module encodes each once and reuses its latents every step) and batches holding each step's draws.

Two resize rules (``resize``):

- ``area`` (the default): an area of about ``resolution``^2, aspect kept, each side rounded to a multiple of
  ``size_multiple``, then a LANCZOS resize to cover that size and a centre crop of the few pixels left over. A
  1024 setting then gives about the 4096 image tokens the official timestep lists were derived at, whatever
  the aspect ratio.
- ``longest-side``: the official Glance rule (flymyai-lora-trainer's ``image_resize``, which the official
  training scripts use): the longest side set to ``resolution``, the other scaled by the same factor and
  truncated (``int``), both floored to a multiple of ``size_multiple``, plain PIL resizes (bicubic), no crop: a
  slight stretch, and fewer tokens for non-square images.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning as L
import torch
from glance_lightning.datamodules.validation import validate_dataset
from jsonargparse.typing import PositiveInt
from PIL import Image

from glance_lightning.draws import StepDraws, TrainSample, draws_dataloader
from glance_lightning.settings import checked

__all__ = ["RESIZE_RULES", "GlanceDataModule", "TrainSample", "load_pixels", "load_pixels_longest_side",
           "longest_side_size", "target_size"]

ResizeRule = Literal["area", "longest-side"]
RESIZE_RULES: tuple[str, ...] = ("area", "longest-side")


def target_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """Scale to an area of about resolution^2 keeping the aspect ratio; round each side to ``multiple``."""
    scale = math.sqrt(resolution * resolution / (width * height))
    new_w = max(multiple, round(width * scale / multiple) * multiple)
    new_h = max(multiple, round(height * scale / multiple) * multiple)
    return new_w, new_h


def load_pixels(path: Path, size: tuple[int, int]) -> torch.Tensor:
    """Resize to cover ``size`` (width, height), centre-crop, return [3, H, W] in [-1, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = size
        scale = max(w / img.width, h / img.height)
        resized = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
        left, top = (resized.width - w) // 2, (resized.height - h) // 2
        cropped = resized.crop((left, top, left + w, top + h))
    return _to_tensor(cropped)


def _to_tensor(img: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


def longest_side_size(
    width: int, height: int, resolution: int, multiple: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The official rule's first resize (longest side = resolution, the other ``int``-truncated) and its floored
    final size: ((w1, h1), (w2, h2))."""
    if width >= height:
        first = (resolution, int(resolution / width * height))
    else:
        first = (int(resolution / height * width), resolution)
    w, h = (max(multiple, side // multiple * multiple) for side in first)
    return first, (w, h)


def load_pixels_longest_side(path: Path, resolution: int, multiple: int) -> torch.Tensor:
    """The official Glance data path: ``image_resize(img, resolution)`` (longest side), then both sides floored to
    ``multiple`` and resized again, PIL's default filter, no crop; [3, H, W] in [-1, 1]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        first, final = longest_side_size(img.width, img.height, resolution, multiple)
        img = img.resize(first)
        if final != first:
            img = img.resize(final)
        return _to_tensor(img)


class GlanceDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str,
        layout: Literal["auto", "flat", "edit"] = "auto",
        resolution: PositiveInt = 1024,
        size_multiple: PositiveInt = 32,
        batch_size: PositiveInt = 1,
        resize: ResizeRule = "area",
    ) -> None:
        """
        Args:
            path: dataset folder: flat image + same-basename .txt pairs, or the edit layout image/ + control/.
            layout: "auto", "flat" or "edit".
            resolution: the training resolution (see ``resize``).
            size_multiple: each side is rounded to a multiple of this (the official code uses 32).
            batch_size: samples per step (a single image is repeated with independent noise and timesteps).
            resize: "area": about resolution x resolution pixels, aspect kept, centre-cropped to the multiple;
                "longest-side": the official Glance rule, the longest side = resolution, the other floored to the
                multiple, stretched, no crop. Control images follow the same rule, each at its own aspect.
        """
        super().__init__()
        resolution = checked(PositiveInt, resolution, "data.resolution")
        size_multiple = checked(PositiveInt, size_multiple, "data.size_multiple")
        batch_size = checked(PositiveInt, batch_size, "data.batch_size")
        if resize not in RESIZE_RULES:
            raise ValueError(f"data.resize={resize!r}: use one of {', '.join(RESIZE_RULES)}")
        if resolution % size_multiple:
            raise ValueError(
                f"data.resolution={resolution} must be a multiple of data.size_multiple={size_multiple}"
            )
        self.path, self.layout = Path(path), layout
        self.resolution, self.size_multiple = resolution, size_multiple
        self.batch_size = batch_size
        self.resize = resize
        self.train_samples: list[TrainSample] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples:
            return
        samples = validate_dataset(self.path, self.layout)
        loaded = []
        for s in samples:
            # each control keeps its own aspect ratio (as the edit pipelines resize it), at about the same area
            pixels, *controls = (self._load(p) for p in (s.image, *s.controls))
            loaded.append(TrainSample(s.image, s.caption, pixels, tuple(controls)))
        shapes = {(tuple(s.pixels.shape), *(tuple(c.shape) for c in s.controls)) for s in loaded}
        if self.batch_size > 1 and len(shapes) > 1:
            raise ValueError(
                f"data.batch_size={self.batch_size} needs all images of {self.path} at one size after resizing; "
                "use batch_size 1 or images of one aspect ratio"
            )
        self.train_samples = loaded

    def _load(self, path: Path) -> torch.Tensor:
        if self.resize == "longest-side":
            return load_pixels_longest_side(path, self.resolution, self.size_multiple)
        with Image.open(path) as img:
            size = target_size(img.width, img.height, self.resolution, self.size_multiple)
        return load_pixels(path, size)

    def train_dataloader(self) -> StepDraws:
        return draws_dataloader(self.trainer, len(self.train_samples), self.batch_size)
