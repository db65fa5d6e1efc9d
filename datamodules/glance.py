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

Opening an image (EXIF orientation, 16-bit, alpha, animation) and the size rules (aspect bound, upscale and
degenerate-size findings) live in ``glance_lightning.datamodules.images``, shared with the validation, so the
``validate-data`` report and training agree; ``setup`` prints each warning once, naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from glance_lightning.datamodules.images import (
    ALPHA_MODES,
    ImageRules,
    longest_side_size,
    open_image,
    raise_or_warn,
    resize_cover,
    resize_longest_side,
    target_size,
    training_image,
    warn_once,
)
from glance_lightning.datamodules.validation import DatasetError, scan_dataset
from jsonargparse.typing import PositiveInt
from PIL import Image

from glance_lightning.draws import StepDraws, TrainSample, draws_dataloader
from glance_lightning.errors import ConfigError
from glance_lightning.settings import checked

__all__ = ["RESIZE_RULES", "GlanceDataModule", "TrainSample", "load_pixels", "load_pixels_longest_side",
           "longest_side_size", "target_size"]

ResizeRule = Literal["area", "longest-side"]
AlphaRule = Literal["white", "black", "error"]
RESIZE_RULES: tuple[str, ...] = ("area", "longest-side")
DEFAULT_RULES = ImageRules()  # the defaults validate-data checks against are the DataModule's


def data_rules(resolution: Any = DEFAULT_RULES.resolution, size_multiple: Any = DEFAULT_RULES.size_multiple,
               resize: Any = DEFAULT_RULES.resize, max_aspect_ratio: Any = DEFAULT_RULES.max_aspect_ratio,
               alpha: Any = DEFAULT_RULES.alpha, allow_empty_captions: Any = False) -> ImageRules:
    """The ``data.*`` settings that decide how samples are read, checked (one line naming the setting), as
    ``GlanceDataModule`` and ``validate-data`` take them."""
    resolution = checked(PositiveInt, resolution, "data.resolution")
    size_multiple = checked(PositiveInt, size_multiple, "data.size_multiple")
    if resize not in RESIZE_RULES:
        raise ConfigError(f"data.resize={resize!r}: use one of {', '.join(RESIZE_RULES)}")
    if resolution % size_multiple:
        raise ConfigError(f"data.resolution={resolution} must be a multiple of data.size_multiple={size_multiple}")
    if alpha not in ALPHA_MODES:
        raise ConfigError(f"data.alpha={alpha!r}: use one of {', '.join(ALPHA_MODES)}")
    number = isinstance(max_aspect_ratio, (int, float)) and not isinstance(max_aspect_ratio, bool)
    if not number or not max_aspect_ratio >= 1:
        raise ConfigError(f"data.max_aspect_ratio={max_aspect_ratio!r}: must be a number >= 1 (4 means 4:1)")
    if not isinstance(allow_empty_captions, bool):
        raise ConfigError(f"data.allow_empty_captions={allow_empty_captions!r}: true or false")
    return ImageRules(resolution, size_multiple, resize, float(max_aspect_ratio), alpha, allow_empty_captions)


def load_pixels(path: Path, size: tuple[int, int], alpha: str = "white") -> torch.Tensor:
    """Open ``path`` (``images.open_image``: upright 8-bit RGB), resize to cover ``size`` (width, height),
    centre-crop, return [3, H, W] in [-1, 1]. Warnings are shown once per file; an error raises ImageError."""
    opened = open_image(Path(path), alpha)
    raise_or_warn(Path(path), opened.notes)
    return _to_tensor(resize_cover(opened.image, size))


def load_pixels_longest_side(path: Path, resolution: int, multiple: int, alpha: str = "white") -> torch.Tensor:
    """The official Glance data path (``images.resize_longest_side``) on the opened image; [3, H, W] in [-1, 1]."""
    opened = open_image(Path(path), alpha)
    raise_or_warn(Path(path), opened.notes)
    return _to_tensor(resize_longest_side(opened.image, resolution, multiple))


def _to_tensor(img: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(img.height, img.width, 3)
    return data.permute(2, 0, 1).float().div(127.5).sub(1.0)


class GlanceDataModule(L.LightningDataModule):
    def __init__(
        self,
        path: str,
        layout: Literal["auto", "flat", "edit"] = "auto",
        resolution: PositiveInt = DEFAULT_RULES.resolution,
        size_multiple: PositiveInt = DEFAULT_RULES.size_multiple,
        batch_size: PositiveInt = 1,
        resize: ResizeRule = "area",
        max_aspect_ratio: float = DEFAULT_RULES.max_aspect_ratio,
        alpha: AlphaRule = DEFAULT_RULES.alpha,
        allow_empty_captions: bool = False,
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
            max_aspect_ratio: an image more elongated than this (long side / short side, at least 1) is
                centre-cropped to it, with a warning naming the file (default 4, i.e. 4:1).
            alpha: transparent pixels are composited over "white" (default) or "black", with a warning naming the
                file; "error" refuses such images. Images, controls included, are opened by
                ``glance_lightning.datamodules.images.open_image`` (EXIF orientation, 16-bit, first frame).
            allow_empty_captions: train images whose caption file is empty on the empty prompt (as caption dropout
                does) instead of refusing them.
        """
        super().__init__()
        self.rules = data_rules(resolution, size_multiple, resize, max_aspect_ratio, alpha, allow_empty_captions)
        resolution, size_multiple = self.rules.resolution, self.rules.size_multiple
        batch_size = checked(PositiveInt, batch_size, "data.batch_size")
        self.path, self.layout = Path(path), layout
        self.resolution, self.size_multiple = resolution, size_multiple
        self.batch_size = batch_size
        self.resize = resize
        self.train_samples: list[TrainSample] = []

    def setup(self, stage: str | None = None) -> None:
        if self.train_samples:
            return
        report = scan_dataset(self.path, self.layout, rules=self.rules)
        if not report.ok:
            raise DatasetError(report)
        for problem in report.warnings:
            warn_once(problem.path, problem.message)
        samples = report.samples
        loaded = []
        for s in samples:
            # each control keeps its own aspect ratio (as the edit pipelines resize it), at about the same area
            pixels, *controls = (self._load(p) for p in (s.image, *s.controls))
            loaded.append(TrainSample(s.image, s.caption, pixels, tuple(controls), tuple(s.controls)))
        shapes = {(tuple(s.pixels.shape), *(tuple(c.shape) for c in s.controls)) for s in loaded}
        if self.batch_size > 1 and len(shapes) > 1:
            raise ConfigError(
                f"data.batch_size={self.batch_size} needs all images of {self.path} at one size after resizing; "
                "use batch_size 1 or images of one aspect ratio"
            )
        self.train_samples = loaded

    def fingerprint_settings(self) -> dict[str, object]:
        """The settings that change what is trained on the same files (``glance_lightning.provenance``)."""
        rules = self.rules
        return {"data.resolution": rules.resolution, "data.size_multiple": rules.size_multiple,
                "data.resize": rules.resize, "data.max_aspect_ratio": rules.max_aspect_ratio,
                "data.alpha": rules.alpha, "data.batch_size": self.batch_size}

    def _load(self, path: Path) -> torch.Tensor:
        return _to_tensor(training_image(path, self.rules))

    def train_dataloader(self) -> StepDraws:
        return draws_dataloader(self.trainer, len(self.train_samples), self.batch_size)
