"""The DataModule: resizing to the training area, control images at their own aspect, batching rules, and how
every kind of image file is opened (16-bit, EXIF orientation, alpha, animation, CMYK, tiny and elongated)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from glance_lightning.datamodules.glance import GlanceDataModule, target_size
from glance_lightning.datamodules.validation import DatasetError
from PIL import Image


def test_target_size_keeps_area_and_aspect_and_rounds_to_the_multiple():
    assert target_size(1024, 1024, 1024, 32) == (1024, 1024)
    w, h = target_size(1600, 900, 1024, 32)
    assert w % 32 == 0 and h % 32 == 0 and abs(w * h / 1024**2 - 1) < 0.05 and abs(w / h - 16 / 9) < 0.05


def edit_dataset(root: Path, target=(96, 64), control=(64, 96)) -> Path:
    for sub in ("image", "control"):
        (root / sub).mkdir(parents=True)
    Image.new("RGB", target, (200, 0, 0)).save(root / "image" / "a.png")
    (root / "image" / "a.txt").write_text("make it red")
    Image.new("RGB", control, (0, 0, 200)).save(root / "control" / "a.jpg")
    return root


def test_control_images_keep_their_own_aspect(tmp_path: Path):
    data = GlanceDataModule(path=str(edit_dataset(tmp_path / "d")), resolution=64, size_multiple=16)
    data.setup()
    (sample,) = data.train_samples
    assert sample.pixels.shape[-2] < sample.pixels.shape[-1]  # landscape target
    assert sample.controls[0].shape[-2] > sample.controls[0].shape[-1]  # portrait control, not cropped
    assert sample.pixels.min() >= -1 and sample.pixels.max() <= 1


def test_bad_settings_are_refused_before_reading_data(tmp_path: Path):
    with pytest.raises(ValueError, match="data.resolution"):
        GlanceDataModule(path=str(tmp_path), resolution=100, size_multiple=32)
    with pytest.raises(ValueError, match="data.batch_size"):
        GlanceDataModule(path=str(tmp_path), batch_size=0)


# ------------------------------------------------------------------------------------ image kinds (training)
# Each case loads through the DataModule (the training path) and checks the pixels, not only that it ran.

MID_GREY = 128 / 127.5 - 1.0  # 8-bit 128 in the [-1, 1] pixels


def flat_dataset(root: Path, name: str, image: Image.Image | None = None, **save: object) -> Path:
    """``root/name`` (saved from ``image``, default a 64x64 grey square) with its caption; returns the path."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    (image or Image.new("RGB", (64, 64), (128, 128, 128))).save(path, **save)
    (root / (Path(name).stem + ".txt")).write_text("a test image")
    return path


def load_one(root: Path, **settings: object) -> torch.Tensor:
    data = GlanceDataModule(path=str(root), **{"resolution": 64, "size_multiple": 16, **settings})
    data.setup()
    (sample,) = data.train_samples
    return sample.pixels


def png_16bit(path: Path, values: np.ndarray, color_type: int) -> Path:
    """A 16-bit-per-channel PNG written by hand (Pillow cannot write 48/64-bit PNGs)."""
    height, width = values.shape[:2]
    rows = b"".join(b"\x00" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def test_16bit_greyscale_png_loads_as_mid_grey_not_white(tmp_path: Path):
    grey = Image.fromarray(np.full((64, 64), 128 * 257, dtype=np.uint16))  # 16-bit mid-grey
    path = flat_dataset(tmp_path, "grey16.png", grey)
    assert Image.open(path).mode == "I;16"  # what Pillow opens it as (its own convert("RGB") gives white)
    pixels = load_one(tmp_path)
    assert torch.allclose(pixels, torch.full_like(pixels, MID_GREY), atol=1 / 127.5)


def test_48bit_rgb_png_keeps_its_colour(tmp_path: Path):
    rgb = np.zeros((64, 64, 3), np.uint16)
    rgb[..., 0], rgb[..., 1] = 65535, 128 * 257
    png_16bit(tmp_path / "deep.png", rgb, color_type=2)
    (tmp_path / "deep.txt").write_text("orange")
    pixels = load_one(tmp_path)
    assert pixels[0].mean() > 0.99 and abs(pixels[1].mean() - MID_GREY) < 0.01 and pixels[2].mean() < -0.99


@pytest.mark.parametrize("suffix", [".tif", ".png"])
def test_32bit_and_big_endian_modes_are_scaled_not_clipped(tmp_path: Path, suffix: str):
    from glance_lightning.datamodules.images import open_image

    arrays = {".tif": [np.full((8, 8), 128 * 257, ">u2"), np.full((8, 8), 128 * 257, np.int32),
                       np.full((8, 8), 128 / 255, np.float32)],
              ".png": [np.full((8, 8), 128 * 257, np.uint16)]}[suffix]
    for index, values in enumerate(arrays):
        path = tmp_path / f"m{index}{suffix}"
        Image.fromarray(values).save(path)
        assert open_image(path).image.getpixel((0, 0)) == (128, 128, 128), Image.open(path).mode


def test_exif_orientation_is_applied(tmp_path: Path, capsys):
    image = Image.new("RGB", (64, 32), (220, 0, 0))
    image.paste((0, 0, 220), (32, 0, 64, 32))  # stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display", as phones write it
    flat_dataset(tmp_path, "phone.jpg", image, exif=exif, quality=95)
    pixels = load_one(tmp_path)
    assert pixels.shape[-2] > pixels.shape[-1]  # portrait, as viewers show it
    top, bottom = pixels[:, : pixels.shape[-2] // 4], pixels[:, -pixels.shape[-2] // 4:]
    assert top[0].mean() > 0.5 and top[2].mean() < -0.5  # the left (red) half is now on top
    assert bottom[2].mean() > 0.5 and bottom[0].mean() < -0.5
    assert "warning" not in capsys.readouterr().err  # a rotation is expected, not a problem


@pytest.mark.parametrize("alpha, value", [("white", 1.0), ("black", -1.0)])
def test_rgba_is_flattened_with_one_warning_naming_the_file(tmp_path: Path, capsys, alpha: str, value: float):
    image = Image.new("RGBA", (64, 64), (0, 200, 0, 0))  # fully transparent green
    image.paste((0, 200, 0, 255), (0, 0, 32, 64))  # opaque left half
    path = flat_dataset(tmp_path, "cutout.png", image)
    pixels = load_one(tmp_path, alpha=alpha)
    assert pixels[:, :, -8:].sub(value).abs().max() < 0.02  # the transparent half is the background
    assert pixels[1, :, :8].mean() > 0.5 and pixels[0, :, :8].mean() < -0.9  # the opaque half keeps its green
    err = capsys.readouterr().err
    assert f"glance_lightning: warning: {path}: transparent pixels (alpha) flattened onto {alpha}" in err
    assert err.count(str(path)) == 1  # once, though validation and loading both open the file


def test_palette_transparency_is_flattened_and_opaque_alpha_is_silent(tmp_path: Path, capsys):
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 32, 64))
    flat_dataset(tmp_path / "p", "pal.png", palette, transparency=0)
    assert load_one(tmp_path / "p")[:, :, -8:].min() > 0.98  # transparent index -> white, not black
    flat_dataset(tmp_path / "o", "opaque.png", Image.new("RGBA", (64, 64), (10, 20, 30, 255)))
    load_one(tmp_path / "o")
    err = capsys.readouterr().err
    assert "pal.png: transparent pixels" in err and "opaque.png" not in err


def test_alpha_error_refuses_transparent_images_naming_the_file(tmp_path: Path):
    path = flat_dataset(tmp_path, "cutout.png", Image.new("RGBA", (64, 64), (0, 0, 0, 0)))
    with pytest.raises(DatasetError, match="data.alpha=error") as info:
        load_one(tmp_path, alpha="error")
    assert str(path) in str(info.value)
    with pytest.raises(ValueError, match="data.alpha"):
        GlanceDataModule(path=str(tmp_path), alpha="grey")  # type: ignore[arg-type]


@pytest.mark.parametrize("name, save", [("anim.png", {}), ("anim.webp", {"lossless": True})])
def test_animated_image_uses_the_first_frame_with_a_warning(tmp_path: Path, capsys, name: str, save: dict):
    frames = [Image.new("RGB", (64, 64), color) for color in ((220, 0, 0), (0, 0, 220), (0, 220, 0))]
    path = flat_dataset(tmp_path, name, frames[0], save_all=True, append_images=frames[1:], **save)
    pixels = load_one(tmp_path)
    assert pixels[0].mean() > 0.6 and pixels[2].mean() < -0.9  # red: the first frame
    assert f"warning: {path}: animated image (3 frames): only the first frame is used" in capsys.readouterr().err


def test_cmyk_jpeg_is_converted(tmp_path: Path):
    flat_dataset(tmp_path, "print.jpg", Image.new("CMYK", (64, 64), (0, 255, 255, 0)), quality=95)  # red ink
    pixels = load_one(tmp_path)
    assert pixels[0].mean() > 0.9 and pixels[1].mean() < -0.8 and pixels[2].mean() < -0.8


def test_a_1x1_image_is_an_error_naming_the_file(tmp_path: Path):
    path = flat_dataset(tmp_path, "dot.png", Image.new("RGB", (1, 1), (9, 9, 9)))
    with pytest.raises(DatasetError, match="degenerate size 1x1") as info:
        load_one(tmp_path)
    assert f"{path}: error: degenerate size 1x1" in str(info.value)


def test_a_small_image_warns_with_its_size_and_upscale_factor(tmp_path: Path, capsys):
    path = flat_dataset(tmp_path, "thumb.png", Image.new("RGB", (16, 16), (9, 9, 9)))
    assert load_one(tmp_path, resolution=256).shape == (3, 256, 256)
    err = capsys.readouterr().err
    assert f"warning: {path}: small image 16x16: upscaled 16.0x to 256x256 for data.resolution=256" in err


@pytest.mark.parametrize("resolution, multiple", [(64, 32), (64, 16), (256, 16), (1024, 32)])
def test_8x4000_trains_at_the_target_area_cropped_to_the_aspect_bound(tmp_path: Path, capsys, resolution: int,
                                                                      multiple: int):
    path = flat_dataset(tmp_path, "strip.png", Image.new("RGB", (8, 4000), (9, 9, 9)))
    pixels = load_one(tmp_path, resolution=resolution, size_multiple=multiple)
    height, width = pixels.shape[-2:]
    assert abs(height * width / resolution**2 - 1) < 0.1, (width, height)  # was 11x at 64 / 32
    assert height == 4 * width and width % multiple == 0  # centre-cropped to data.max_aspect_ratio 4:1
    err = capsys.readouterr().err
    assert f"warning: {path}: aspect ratio 500.0:1 (8x4000) is beyond data.max_aspect_ratio=4" in err


def test_max_aspect_ratio_can_be_raised_and_the_area_still_holds(tmp_path: Path, capsys):
    flat_dataset(tmp_path, "strip.png", Image.new("RGB", (8, 4000), (9, 9, 9)))
    pixels = load_one(tmp_path, resolution=64, size_multiple=32, max_aspect_ratio=1000)
    assert tuple(pixels.shape) == (3, 128, 32)  # area 4096 = 64^2: the long side gets what the short one lacks
    assert "aspect ratio" not in capsys.readouterr().err
    with pytest.raises(ValueError, match="data.max_aspect_ratio"):
        GlanceDataModule(path=str(tmp_path), max_aspect_ratio=0.5)


@pytest.mark.parametrize("size", [(1, 1000), (8, 4000), (37, 3001), (300, 7), (1000, 999), (4000, 8), (640, 480)])
@pytest.mark.parametrize("resolution, multiple", [(64, 16), (512, 16), (1024, 32), (1024, 64)])
def test_target_size_area_is_resolution_squared_for_any_aspect(size, resolution: int, multiple: int):
    w, h = target_size(*size, resolution, multiple)
    assert w % multiple == 0 and h % multiple == 0
    tolerance = multiple / (2 * resolution - multiple) + 1e-9  # one rounding of the long side
    assert abs(w * h / resolution**2 - 1) <= tolerance, (w, h)
    assert (w >= h) == (size[0] >= size[1])


def test_edit_control_images_follow_the_same_rules(tmp_path: Path, capsys):
    root = edit_dataset(tmp_path / "d")
    control = root / "control" / "a.jpg"
    control.unlink()
    cutout = root / "control" / "a.png"
    Image.new("RGBA", (64, 96), (0, 0, 0, 0)).save(cutout)
    data = GlanceDataModule(path=str(root), resolution=64, size_multiple=16)
    data.setup()
    (sample,) = data.train_samples
    assert sample.controls[0].min() > 0.98  # flattened onto white
    assert f"warning: {cutout}: transparent pixels" in capsys.readouterr().err
    Image.new("RGB", (1, 1)).save(cutout)
    with pytest.raises(DatasetError, match="degenerate"):
        GlanceDataModule(path=str(root), resolution=64, size_multiple=16).setup()
