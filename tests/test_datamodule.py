"""The DataModule: resizing to the training area, control images at their own aspect, batching rules."""

from __future__ import annotations

from pathlib import Path

import pytest
from glance_lightning.datamodules.glance import GlanceDataModule, target_size
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
