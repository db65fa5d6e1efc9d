"""Opening one training image: the single place that turns an image file into upright 8-bit RGB pixels.

Training (``glance.GlanceDataModule``, ``load_pixels``) and validation (``validation.scan_dataset``, behind
``validate-data``) both call :func:`open_image` and :func:`size_notes`, so what validation reports is what
training does. This module owns:

* **decoding**: the first frame of an animated WebP/APNG (a warning with the frame count; peers such as kohya's
  sd-scripts and ai-toolkit also take the first frame, silently); EXIF orientation applied
  (``ImageOps.exif_transpose``, reported as info); 16-bit greyscale (``I;16``, ``I;16B``, ...) scaled by 1/257 and
  32-bit ``I``/``F`` scaled by their range (below), never clipped to white (Pillow already reduces 48-bit RGB and
  64-bit RGBA PNGs to 8 bits correctly); palette, CMYK and other modes converted to RGB;
* **transparency** (RGBA, LA, PA, palette or colour-key ``transparency``): composited over ``alpha`` = white
  (default) or black with a warning naming the file, or an error with ``alpha="error"``; a fully opaque alpha
  channel is dropped without a word;
* **size rules** (:class:`ImageRules`, from the DataModule's settings): the training size (area about
  ``resolution``^2 or the official longest-side rule), an error for a side under :data:`MIN_SIDE` pixels, a
  centre crop to ``max_aspect_ratio`` (warning) and a warning when an image is upscaled more than
  :data:`MAX_UPSCALE` times;
* **warnings once per file**: :func:`warn_once` prints ``glance_lightning: warning: FILE: ...`` (``console.info``)
  the first time a file shows a finding in this process.

``I``/``F`` scaling: values all in [0, 1] (``F`` only) are x255; all in [0, 255] are kept; otherwise they are read as
16-bit (0..65535, /257, clipped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from glance_lightning import console
from glance_lightning.errors import ConfigError

__all__ = ["ALPHA_MODES", "MAX_UPSCALE", "MIN_SIDE", "ImageError", "ImageRules", "Note", "OpenedImage",
           "aspect_crop_box", "longest_side_size", "open_image", "raise_or_warn", "resize_cover", "resize_longest_side",
           "size_notes", "target_size", "training_image", "upright_size", "warn_once"]

ALPHA_MODES: tuple[str, ...] = ("white", "black", "error")
MIN_SIDE = 8  # pixels: one latent pixel of the 8x VAEs; a smaller side holds nothing to learn
MAX_UPSCALE = 4.0  # a larger linear upscale factor is a warning (e.g. a side under resolution / 4)
_BACKGROUNDS = {"white": (255, 255, 255, 255), "black": (0, 0, 0, 255)}
_HIGH_DEPTH = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_TRANSPARENT_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_ORIENTATIONS = {2: "mirrored left-right", 3: "rotated 180°", 4: "mirrored top-bottom", 5: "transposed",
                 6: "rotated 90° clockwise", 7: "transversed", 8: "rotated 90° counter-clockwise"}


class ImageError(ConfigError):
    """An image file that cannot be used for training (a user error: a ``ValueError``); the message names the
    file."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path, self.reason = path, message

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.reason)


class _UnsupportedMode(Exception):
    """A colour mode Pillow decodes but cannot convert to RGB."""


@dataclass(frozen=True)
class Note:
    """One finding about one image: ``severity`` is "error", "warning" or "info"."""

    severity: str
    message: str


@dataclass(frozen=True)
class ImageRules:
    """The DataModule settings that decide how a sample is read (``data.*`` in the config)."""

    resolution: int = 1024
    size_multiple: int = 32
    resize: str = "area"
    max_aspect_ratio: float = 4.0
    alpha: str = "white"
    allow_empty_captions: bool = False


@dataclass
class OpenedImage:
    """An upright 8-bit RGB image and what was done to get it."""

    image: Image.Image
    notes: list[Note] = field(default_factory=list)

    @property
    def errors(self) -> list[Note]:
        return [n for n in self.notes if n.severity == "error"]


# ------------------------------------------------------------------------------------------------ decoding


def open_image(path: Path, alpha: str = "white") -> OpenedImage:
    """Decode ``path`` fully into upright 8-bit RGB (see the module docstring); raise :class:`ImageError` when
    the file cannot be decoded. An alpha refused by ``alpha="error"`` is an error note, not an exception."""
    if alpha not in ALPHA_MODES:
        raise ConfigError(f"data.alpha={alpha!r}: use one of {', '.join(ALPHA_MODES)}")
    notes: list[Note] = []
    try:
        with Image.open(path) as img:
            frame = _first_frame(img, notes)
            upright = _upright(frame, notes)
            rgb = _to_rgb(upright, alpha, notes)
    except UnidentifiedImageError:
        raise ImageError(path, "unreadable image: not a valid image file (PIL cannot identify its format)") from None
    except _UnsupportedMode as exc:
        raise ImageError(path, str(exc)) from None
    except Exception as exc:  # PIL raises many types on bad data (OSError, SyntaxError, ValueError, ...)
        raise ImageError(path, f"unreadable image: {type(exc).__name__}: {exc}") from None
    return OpenedImage(rgb, notes)


def upright_size(path: Path) -> tuple[int, int]:
    """(width, height) as the image will be used (EXIF orientation applied), from the header only."""
    with Image.open(path) as img:
        try:
            orientation = img.getexif().get(0x0112, 1)
        except Exception:  # unreadable EXIF: used as stored
            orientation = 1
        return (img.height, img.width) if orientation in (5, 6, 7, 8) else img.size


def _first_frame(img: Image.Image, notes: list[Note]) -> Image.Image:
    frames = getattr(img, "n_frames", 1)
    if frames <= 1:
        return img
    img.seek(0)
    if img.format == "MPO":  # a camera JPEG with extra pictures (depth map, preview): the first is the photo
        notes.append(Note("info", f"multi-picture JPEG (MPO, {frames} pictures): the first (main) picture is used"))
    else:
        notes.append(Note("warning", f"animated image ({frames} frames): only the first frame is used; "
                                     "save the frame you want as a still image to silence this"))
    return img


def _upright(img: Image.Image, notes: list[Note]) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF: the pixels are still fine, used as stored
        return img
    if orientation not in _ORIENTATIONS:
        return img
    turned = ImageOps.exif_transpose(img)
    notes.append(Note("info", f"EXIF orientation {orientation} applied ({_ORIENTATIONS[orientation]}): used as "
                              f"{turned.width}x{turned.height}, as image viewers show it"))
    return turned


def _to_rgb(img: Image.Image, alpha: str, notes: list[Note]) -> Image.Image:
    if img.mode in _HIGH_DEPTH:
        return _to_8bit(img).convert("RGB")
    if img.mode in _TRANSPARENT_MODES or "transparency" in img.info:
        return _flatten(img.convert("RGBA"), alpha, notes)
    if img.mode == "CMYK":
        notes.append(Note("info", "CMYK image converted to RGB (no colour profile applied)"))
    try:
        return img.convert("RGB")
    except ValueError as exc:
        raise _UnsupportedMode(f"unsupported colour mode {img.mode} ({exc}); re-save it as 8-bit RGB") from None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit greyscale to 8-bit ``L`` with the full range kept (Pillow's own convert clips)."""
    values = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        scaled = values / 257.0
    elif img.mode == "F" and values.size and values.min() >= 0.0 and values.max() <= 1.0:
        scaled = values * 255.0
    elif not values.size or (values.min() >= 0.0 and values.max() <= 255.0):
        scaled = values
    else:
        scaled = np.clip(values, 0.0, 65535.0) / 257.0
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def _flatten(rgba: Image.Image, alpha: str, notes: list[Note]) -> Image.Image:
    lowest = rgba.getchannel("A").getextrema()[0]
    if lowest == 255:  # an alpha channel with nothing transparent: nothing to say
        return rgba.convert("RGB")
    if alpha == "error":
        notes.append(Note("error", "has transparent pixels (alpha) and data.alpha=error; flatten it onto a "
                                   "background yourself, or set data.alpha to white or black"))
        alpha = "white"
    else:
        notes.append(Note("warning", f"transparent pixels (alpha) flattened onto {alpha} (data.alpha={alpha}); "
                                     "set data.alpha to white, black or error, or flatten the image yourself"))
    background = Image.new("RGBA", rgba.size, _BACKGROUNDS[alpha])
    return Image.alpha_composite(background, rgba).convert("RGB")


# ------------------------------------------------------------------------------------------------ sizes


def target_size(width: int, height: int, resolution: int, multiple: int) -> tuple[int, int]:
    """The ``area`` rule's training size: an area of about resolution^2 whatever the aspect ratio, each side a
    multiple of ``multiple`` (at least one). The short side is rounded first and the long side gets the rest of
    the area, so a side clamped up to ``multiple`` does not inflate the area (8x4000 at 64/32 gives 32x128,
    not the 32x1440 of rounding each side alone)."""
    area = resolution * resolution
    short, long = sorted((width, height))
    short_side = max(multiple, round(math.sqrt(area * short / long) / multiple) * multiple)
    long_side = max(multiple, round(area / short_side / multiple) * multiple)
    return (long_side, short_side) if width >= height else (short_side, long_side)


def longest_side_size(
    width: int, height: int, resolution: int, multiple: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The official rule's first resize (longest side = resolution, the other ``int``-truncated) and its floored
    final size: ((w1, h1), (w2, h2))."""
    if width >= height:
        first = (resolution, max(1, int(resolution / width * height)))
    else:
        first = (max(1, int(resolution / height * width)), resolution)
    w, h = (max(multiple, side // multiple * multiple) for side in first)
    return first, (w, h)


def aspect_crop_box(size: tuple[int, int], max_aspect_ratio: float) -> tuple[int, int, int, int] | None:
    """The centred box of aspect ``max_aspect_ratio`` to crop a more elongated image to, or None."""
    w, h = size
    if max(w, h) <= max_aspect_ratio * min(w, h):
        return None
    if w > h:
        keep = max(1, round(h * max_aspect_ratio))
        left = (w - keep) // 2
        return left, 0, left + keep, h
    keep = max(1, round(w * max_aspect_ratio))
    top = (h - keep) // 2
    return 0, top, w, top + keep


def _plan(size: tuple[int, int], rules: ImageRules) -> tuple[tuple[int, int, int, int] | None, tuple[int, int]]:
    """(aspect crop box or None, training size) for an upright image of ``size``."""
    box = aspect_crop_box(size, rules.max_aspect_ratio)
    w, h = (box[2] - box[0], box[3] - box[1]) if box else size
    if rules.resize == "longest-side":
        return box, longest_side_size(w, h, rules.resolution, rules.size_multiple)[1]
    return box, target_size(w, h, rules.resolution, rules.size_multiple)


def size_notes(size: tuple[int, int], rules: ImageRules) -> list[Note]:
    """What the size rules say about an upright image of ``size``: a degenerate side (error), an aspect ratio
    beyond ``max_aspect_ratio`` (warning: centre-cropped), an upscale beyond :data:`MAX_UPSCALE` (warning)."""
    w, h = size
    if min(w, h) < MIN_SIDE:
        return [Note("error", f"degenerate size {w}x{h}: a side under {MIN_SIDE} px (one latent pixel) holds "
                              "nothing to train on; remove the file or use the full-size image")]
    notes = []
    box, (out_w, out_h) = _plan(size, rules)
    if box is not None:
        crop_w, crop_h = box[2] - box[0], box[3] - box[1]
        notes.append(Note("warning", f"aspect ratio {max(w, h) / min(w, h):.1f}:1 ({w}x{h}) is beyond "
                                     f"data.max_aspect_ratio={rules.max_aspect_ratio:g}; the centre {crop_w}x{crop_h} "
                                     "is used; crop it yourself to keep another part, or raise data.max_aspect_ratio"))
        w, h = crop_w, crop_h
    factor = max(out_w / w, out_h / h)
    if factor > MAX_UPSCALE:
        notes.append(Note("warning", f"small image {w}x{h}: upscaled {factor:.1f}x to {out_w}x{out_h} for "
                                     f"data.resolution={rules.resolution} (blurry training target); use a larger "
                                     "source image or a lower data.resolution"))
    return notes


# --------------------------------------------------------------------------------------------- loading


def resize_cover(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """LANCZOS resize to cover ``size`` (width, height), then a centre crop to it."""
    w, h = size
    scale = max(w / img.width, h / img.height)
    resized = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                         Image.Resampling.LANCZOS)
    left, top = (resized.width - w) // 2, (resized.height - h) // 2
    return resized.crop((left, top, left + w, top + h))


def resize_longest_side(img: Image.Image, resolution: int, multiple: int) -> Image.Image:
    """The official Glance data path: ``image_resize(img, resolution)`` (longest side), then both sides floored
    to ``multiple`` and resized again, PIL's default filter, no crop."""
    first, final = longest_side_size(img.width, img.height, resolution, multiple)
    img = img.resize(first)
    return img.resize(final) if final != first else img


def training_image(path: Path, rules: ImageRules) -> Image.Image:
    """``path`` as training sees it: opened, cropped to the aspect bound, resized by ``rules.resize``; every
    finding is shown once (:func:`warn_once`) and an error raises :class:`ImageError`."""
    opened = open_image(path, rules.alpha)
    notes = opened.notes + size_notes(opened.image.size, rules)
    raise_or_warn(path, notes)
    box, size = _plan(opened.image.size, rules)
    img = opened.image.crop(box) if box else opened.image
    if rules.resize == "longest-side":
        return resize_longest_side(img, rules.resolution, rules.size_multiple)
    return resize_cover(img, size)


def raise_or_warn(path: Path, notes: list[Note]) -> None:
    """Raise :class:`ImageError` for the first error note; show each warning once."""
    for note in notes:
        if note.severity == "error":
            raise ImageError(path, note.message)
    for note in notes:
        if note.severity == "warning":
            warn_once(path, note.message)


_shown: set[tuple[str, str]] = set()


def warn_once(path: Path, message: str) -> None:
    """``glance_lightning: warning: FILE: message`` on stderr (rank 0), once per file and message."""
    key = (str(path), message)
    if key not in _shown:
        _shown.add(key)
        console.info(f"warning: {path}: {message}")
