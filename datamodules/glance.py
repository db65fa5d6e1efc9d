"""The Glance DataModule: a validated folder of image/caption pairs (optionally with control images).

It validates the whole dataset in one pass before any model is loaded, loads every image once at the
training resolution (area about ``resolution``^2, aspect kept, sides a multiple of ``size_multiple``) and meets
the ``glance_lightning.draws.GlanceData`` protocol: typed ``train_samples`` (the module encodes each once and
reuses its latents every step) and batches holding each step's draws.
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

__all__ = ["GlanceDataModule", "TrainSample", "load_pixels", "target_size"]


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
    data = torch.frombuffer(bytearray(cropped.tobytes()), dtype=torch.uint8).view(h, w, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


class GlanceDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str,
        layout: Literal["auto", "flat", "edit"] = "auto",
        resolution: PositiveInt = 1024,
        size_multiple: PositiveInt = 32,
        batch_size: PositiveInt = 1,
    ) -> None:
        """
        Args:
            path: dataset folder: flat image + same-basename .txt pairs, or the edit layout image/ + control/.
            layout: "auto", "flat" or "edit".
            resolution: images are scaled to an area of about resolution x resolution, aspect kept.
            size_multiple: each side is rounded to a multiple of this (the official code uses 32).
            batch_size: samples per step (a single image is repeated with independent noise and timesteps).
        """
        super().__init__()
        resolution = checked(PositiveInt, resolution, "data.resolution")
        size_multiple = checked(PositiveInt, size_multiple, "data.size_multiple")
        batch_size = checked(PositiveInt, batch_size, "data.batch_size")
        if resolution % size_multiple:
            raise ValueError(
                f"data.resolution={resolution} must be a multiple of data.size_multiple={size_multiple}"
            )
        self.path, self.layout = Path(path), layout
        self.resolution, self.size_multiple = resolution, size_multiple
        self.batch_size = batch_size
        self.train_samples: list[TrainSample] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples:
            return
        samples = validate_dataset(self.path, self.layout)
        loaded = []
        for s in samples:
            # each control keeps its own aspect ratio (as the edit pipelines resize it), at about the same area
            size, *control_sizes = (self._size_of(p) for p in (s.image, *s.controls))
            controls = tuple(load_pixels(c, c_size) for c, c_size in zip(s.controls, control_sizes))
            loaded.append(TrainSample(s.image, s.caption, load_pixels(s.image, size), controls))
        shapes = {(tuple(s.pixels.shape), *(tuple(c.shape) for c in s.controls)) for s in loaded}
        if self.batch_size > 1 and len(shapes) > 1:
            raise ValueError(
                f"data.batch_size={self.batch_size} needs all images of {self.path} at one size after resizing; "
                "use batch_size 1 or images of one aspect ratio"
            )
        self.train_samples = loaded

    def _size_of(self, path: Path) -> tuple[int, int]:
        with Image.open(path) as img:
            return target_size(img.width, img.height, self.resolution, self.size_multiple)

    def train_dataloader(self) -> StepDraws:
        return draws_dataloader(self.trainer, len(self.train_samples), self.batch_size)
