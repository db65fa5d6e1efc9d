"""Tests for the pre-flight dataset validation (glance_lightning.datamodules.validation)."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from glance_lightning.datamodules.images import ImageRules
from glance_lightning.datamodules.validation import (
    IMAGE_EXTENSIONS,
    DatasetError,
    DatasetReport,
    Problem,
    Sample,
    scan_dataset,
    validate_dataset,
)
from PIL import Image

from glance_lightning.commands.validate_data import run_validate_data_command

from reaping import run_reaped

FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def make_image(path: Path, color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    """A 256x256 image: no upscale warning at the default resolution 1024 (4x is the limit)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (256, 256), color).save(path, format=FORMATS.get(path.suffix.lower(), "PNG"))
    return path


def make_caption(path: Path, text: str = "a red square") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def make_pair(folder: Path, name: str, text: str | None = None) -> Path:
    image = make_image(folder / name)
    make_caption(folder / (Path(name).stem + ".txt"), text if text is not None else f"caption {image.stem}")
    return image


def make_edit(root: Path, stems: list[str], controls: int = 1) -> None:
    for stem in stems:
        make_pair(root / "image", f"{stem}.jpg")
        for index in range(controls):
            folder = "control" if index == 0 else f"control_{index + 1}"
            make_image(root / folder / f"{stem}.png", (10, 10 * index, 200))


def errors_for(report: DatasetReport, path: Path) -> list[str]:
    return [p.message for p in report.problems if p.path == path and p.severity == "error"]


def single_error(report: DatasetReport, path: Path, *needles: str) -> str:
    messages = errors_for(report, path)
    assert len(messages) == 1, report.format()
    for needle in needles:
        assert needle in messages[0], messages[0]
    return messages[0]


# ------------------------------------------------------------------------------------------------ flat


def test_good_flat_dataset_sorted_samples(tmp_path: Path) -> None:
    make_pair(tmp_path, "b.jpg", "second")
    make_pair(tmp_path, "a.png", "  first caption\n")
    make_pair(tmp_path, "c.webp", "third")
    report = scan_dataset(tmp_path)
    assert report.ok, report.format()
    assert report.layout == "flat"
    assert report.problems == []
    assert report.samples == [
        Sample(tmp_path / "a.png", "first caption"),
        Sample(tmp_path / "b.jpg", "second"),
        Sample(tmp_path / "c.webp", "third"),
    ]
    assert validate_dataset(tmp_path) == report.samples
    assert report.format() == "3 samples, 0 errors, 0 warnings"


def test_upper_case_extensions_accepted(tmp_path: Path) -> None:
    make_pair(tmp_path, "IMG.PNG")
    make_pair(tmp_path, "photo.JPEG")
    make_pair(tmp_path, "pic.WebP")
    make_pair(tmp_path, "snap.Jpg")
    report = scan_dataset(tmp_path)
    assert report.ok, report.format()
    assert [s.image.name for s in report.samples] == ["IMG.PNG", "photo.JPEG", "pic.WebP", "snap.Jpg"]


def test_hidden_files_and_folders_ignored(tmp_path: Path) -> None:
    make_pair(tmp_path, "a.png")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tmp_path / ".hidden.png").write_text("not an image")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.txt").write_text("")
    report = scan_dataset(tmp_path)
    assert report.ok and report.problems == [], report.format()
    assert [s.image.name for s in report.samples] == ["a.png"]


def test_missing_caption(tmp_path: Path) -> None:
    make_pair(tmp_path, "a.png")
    make_image(tmp_path / "b.png")
    report = scan_dataset(tmp_path)
    assert not report.ok
    single_error(report, tmp_path / "b.png", "missing caption", "b.txt")
    assert [s.image.name for s in report.samples] == ["a.png"]


def test_missing_caption_hints_at_letter_case(tmp_path: Path) -> None:
    make_image(tmp_path / "Cat.png")
    make_caption(tmp_path / "cat.txt")
    report = scan_dataset(tmp_path)
    single_error(report, tmp_path / "Cat.png", "missing caption", "cat.txt", "case-sensitive")
    single_error(report, tmp_path / "cat.txt", "caption without an image")


@pytest.mark.parametrize("text", ["", "   \n\t  \n"])
def test_empty_caption(tmp_path: Path, text: str) -> None:
    make_pair(tmp_path, "a.png", text)
    make_pair(tmp_path, "b.png")
    report = scan_dataset(tmp_path)
    assert not report.ok
    single_error(report, tmp_path / "a.txt", "empty caption")
    assert [s.image.name for s in report.samples] == ["b.png"]


def test_caption_without_image(tmp_path: Path) -> None:
    make_pair(tmp_path, "a.png")
    make_caption(tmp_path / "orphan.txt")
    report = scan_dataset(tmp_path)
    assert not report.ok
    single_error(report, tmp_path / "orphan.txt", "caption without an image", "orphan")


def test_caption_named_after_full_file_name_gets_hint(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    make_caption(tmp_path / "a.png.txt")
    report = scan_dataset(tmp_path)
    single_error(report, tmp_path / "a.png.txt", "caption without an image", "name it a.txt")
    single_error(report, tmp_path / "a.png", "missing caption")


def test_caption_must_be_utf8(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\u00e9 latte".encode("latin-1"))
    report = scan_dataset(tmp_path)
    assert not report.ok
    single_error(report, tmp_path / "a.txt", "not UTF-8 text (byte 0xe9 at offset 3", "re-save it as UTF-8")


def test_utf8_bom_is_stripped(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("\ufeffcaf\u00e9".encode())
    assert validate_dataset(tmp_path) == [Sample(tmp_path / "a.png", "caf\u00e9")]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be-bom", "utf-32"])
def test_utf16_and_utf32_with_a_byte_order_mark_are_decoded(tmp_path: Path, encoding: str) -> None:
    make_image(tmp_path / "a.png")
    text = "caf\u00e9 \u732b"
    data = b"\xfe\xff" + text.encode("utf-16-be") if encoding == "utf-16-be-bom" else text.encode(encoding)
    (tmp_path / "a.txt").write_bytes(data)
    assert validate_dataset(tmp_path) == [Sample(tmp_path / "a.png", text)]


def test_utf16_without_a_byte_order_mark_is_named_not_trained_with_nul_characters(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("a cat".encode("utf-16-le"))
    single_error(scan_dataset(tmp_path), tmp_path / "a.txt", "NUL byte at offset 1", "UTF-16 without a byte-order")


@pytest.mark.parametrize("text", ["", " \n\t"])
def test_empty_captions_train_without_a_caption_when_allowed(tmp_path: Path, text: str) -> None:
    make_pair(tmp_path, "a.png", text)
    report = scan_dataset(tmp_path, rules=ImageRules(allow_empty_captions=True))
    assert report.ok and [s.caption for s in report.samples] == [""]
    assert [p.severity for p in report.problems] == ["info"]
    refused = scan_dataset(tmp_path)
    single_error(refused, tmp_path / "a.txt", "empty caption", "data.allow_empty_captions: true")


def test_a_dangling_symlink_is_named_with_its_target(tmp_path: Path) -> None:
    make_pair(tmp_path, "b.png")
    (tmp_path / "a.png").symlink_to(tmp_path / "moved" / "a.png")
    make_caption(tmp_path / "a.txt")
    report = scan_dataset(tmp_path)
    single_error(report, tmp_path / "a.png", "dangling symlink to", str(tmp_path / "moved" / "a.png"))
    assert errors_for(report, tmp_path / "a.txt") == []  # its caption is not also called a stray
    assert [s.image.name for s in report.samples] == ["b.png"]


@pytest.mark.parametrize(
    "name, content",
    [
        ("fake.png", b"this is really a text file\n"),
        ("empty.jpg", b""),
        ("junk.webp", b"RIFF\x00\x00\x00\x00WEBPgarbage"),
    ],
)
def test_corrupt_image(tmp_path: Path, name: str, content: bytes) -> None:
    (tmp_path / name).write_bytes(content)
    make_caption(tmp_path / (Path(name).stem + ".txt"))
    make_pair(tmp_path, "good.png")
    report = scan_dataset(tmp_path)
    assert not report.ok
    single_error(report, tmp_path / name, "unreadable image")
    assert [s.image.name for s in report.samples] == ["good.png"]


def test_truncated_image_is_caught(tmp_path: Path) -> None:
    """A header that opens fine but whose pixel data is cut off must fail the full decode."""
    path = tmp_path / "big.png"
    Image.effect_noise((256, 256), 64).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    make_caption(tmp_path / "big.txt")
    report = scan_dataset(tmp_path)
    single_error(report, path, "unreadable image")


@pytest.mark.parametrize("name", ["anim.gif", "scan.bmp", "photo.tiff", "UPPER.GIF"])
def test_unsupported_extension(tmp_path: Path, name: str) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / name)
    make_caption(tmp_path / (Path(name).stem + ".txt"))
    make_pair(tmp_path, "ok.png")
    report = scan_dataset(tmp_path)
    assert not report.ok
    message = single_error(report, tmp_path / name, "unsupported image extension")
    for ext in IMAGE_EXTENSIONS:
        assert ext in message
    # the caption belongs to the unsupported image: no extra "caption without an image" error
    assert errors_for(report, tmp_path / (Path(name).stem + ".txt")) == []


def test_same_basename_is_ambiguous(tmp_path: Path) -> None:
    make_pair(tmp_path, "a.png")
    make_image(tmp_path / "a.jpg")
    make_pair(tmp_path, "b.png")
    report = scan_dataset(tmp_path)
    assert not report.ok
    for name in ("a.jpg", "a.png"):
        message = single_error(report, tmp_path / name, "ambiguous")
        assert "a.jpg" in message and "a.png" in message
    assert [s.image.name for s in report.samples] == ["b.png"]


def test_unknown_files_are_warnings(tmp_path: Path) -> None:
    make_pair(tmp_path, "a.png")
    (tmp_path / "notes.md").write_text("# notes")
    (tmp_path / "extra").mkdir()
    report = scan_dataset(tmp_path)
    assert report.ok, report.format()
    found = [(p.path.name, p.severity) for p in report.problems]
    assert found == [("extra", "warning"), ("notes.md", "warning")]
    assert report.format().endswith("1 sample, 0 errors, 2 warnings")


def test_empty_dataset(tmp_path: Path) -> None:
    report = scan_dataset(tmp_path)
    assert not report.ok
    single_error(report, tmp_path, "empty dataset", "no images")


def test_only_captions_is_empty_dataset(tmp_path: Path) -> None:
    make_caption(tmp_path / "a.txt")
    report = scan_dataset(tmp_path)
    single_error(report, tmp_path, "empty dataset")
    single_error(report, tmp_path / "a.txt", "caption without an image")


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    report = scan_dataset(missing)
    assert not report.ok and report.samples == []
    single_error(report, missing, "does not exist")


def test_path_is_a_file(tmp_path: Path) -> None:
    path = make_image(tmp_path / "a.png")
    report = scan_dataset(path)
    assert not report.ok
    single_error(report, path, "not a directory")


def test_all_problems_reported_in_one_pass_sorted(tmp_path: Path) -> None:
    make_pair(tmp_path, "good.png", "fine")
    make_image(tmp_path / "no_caption.png")
    make_pair(tmp_path, "empty.png", " ")
    make_caption(tmp_path / "orphan.txt")
    (tmp_path / "corrupt.png").write_text("not a png")
    make_caption(tmp_path / "corrupt.txt")
    Image.new("RGB", (8, 8)).save(tmp_path / "anim.gif")
    make_caption(tmp_path / "anim.txt")
    make_pair(tmp_path, "dup.png")
    make_image(tmp_path / "dup.webp")
    (tmp_path / "notes.md").write_text("hello")
    report = scan_dataset(tmp_path)
    expected = {
        "anim.gif": "unsupported image extension",
        "corrupt.png": "unreadable image",
        "dup.png": "ambiguous",
        "dup.webp": "ambiguous",
        "empty.txt": "empty caption",
        "no_caption.png": "missing caption",
        "orphan.txt": "caption without an image",
    }
    for name, needle in expected.items():
        single_error(report, tmp_path / name, needle)
    assert len(report.errors) == len(expected)
    assert [p.path.name for p in report.warnings] == ["notes.md"]
    assert report.samples == [Sample(tmp_path / "good.png", "fine")]
    assert not report.ok
    paths = [p.path for p in report.problems]
    assert paths == sorted(paths)
    text = report.format()
    for name in [*expected, "notes.md"]:
        assert f"{tmp_path / name}: " in text
    assert text.splitlines()[-1] == "1 sample, 7 errors, 1 warning"
    # deterministic: a second scan gives the identical report
    assert scan_dataset(tmp_path).format() == text


def test_validate_dataset_raises_with_report_and_hint(tmp_path: Path) -> None:
    make_image(tmp_path / "a.png")
    with pytest.raises(DatasetError) as info:
        validate_dataset(tmp_path)
    error = info.value
    assert isinstance(error, ValueError)
    assert not error.report.ok
    message = str(error)
    assert f"{tmp_path / 'a.png'}: error: missing caption" in message
    assert f"python -m glance_lightning validate-data --path {tmp_path}" in message
    assert str(pickle.loads(pickle.dumps(error))) == message


def test_validate_dataset_raises_on_empty(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="empty dataset"):
        validate_dataset(tmp_path)


def test_bad_arguments_raise(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layout"):
        scan_dataset(tmp_path, layout="nested")
    with pytest.raises(ValueError, match="num_controls"):
        scan_dataset(tmp_path, num_controls=-1)
    with pytest.raises(ValueError, match="severity"):
        Problem(tmp_path, "x", severity="fatal")


# ------------------------------------------------------------------------------------------------ edit


def test_good_edit_dataset_single_control(tmp_path: Path) -> None:
    make_edit(tmp_path, ["b", "a"])
    report = scan_dataset(tmp_path)
    assert report.ok, report.format()
    assert report.layout == "edit"
    assert report.samples == [
        Sample(tmp_path / "image/a.jpg", "caption a", (tmp_path / "control/a.png",)),
        Sample(tmp_path / "image/b.jpg", "caption b", (tmp_path / "control/b.png",)),
    ]
    assert scan_dataset(tmp_path, num_controls=1).ok
    assert scan_dataset(tmp_path, layout="edit", num_controls=(1, 3)).ok


@pytest.mark.parametrize("controls", [2, 3])
def test_good_edit_dataset_multiple_controls(tmp_path: Path, controls: int) -> None:
    make_edit(tmp_path, ["x", "y"], controls=controls)
    report = scan_dataset(tmp_path, num_controls=(1, 3))
    assert report.ok, report.format()
    folders = ["control", "control_2", "control_3"][:controls]
    assert [s.controls for s in report.samples] == [
        tuple(tmp_path / folder / f"{stem}.png" for folder in folders) for stem in ("x", "y")
    ]
    assert [s.caption for s in report.samples] == ["caption x", "caption y"]


def test_edit_extensions_may_differ_and_any_case(tmp_path: Path) -> None:
    make_pair(tmp_path / "image", "a.JPG")
    make_image(tmp_path / "control" / "a.WebP")
    make_caption(tmp_path / ".hidden_note.txt")
    (tmp_path / "control" / ".DS_Store").write_bytes(b"\x00")
    report = scan_dataset(tmp_path)
    assert report.ok and report.problems == [], report.format()
    assert report.samples == [Sample(tmp_path / "image/a.JPG", "caption a", (tmp_path / "control/a.WebP",))]


def test_edit_missing_and_stray_and_corrupt_controls(tmp_path: Path) -> None:
    make_edit(tmp_path, ["a", "b", "c"])
    (tmp_path / "control" / "b.png").unlink()
    make_image(tmp_path / "control" / "stray.png")
    (tmp_path / "control" / "c.png").write_text("not an image")
    make_caption(tmp_path / "control" / "a.txt")
    report = scan_dataset(tmp_path)
    assert not report.ok
    single_error(report, tmp_path / "image/b.jpg", "missing first control image", str(tmp_path / "control/b"))
    single_error(report, tmp_path / "control/stray.png", "control image without a target")
    single_error(report, tmp_path / "control/c.png", "unreadable image")
    assert [p.severity for p in report.problems if p.path == tmp_path / "control/a.txt"] == ["warning"]
    assert len(report.errors) == 3
    assert [s.image.name for s in report.samples] == ["a.jpg"]


def test_edit_target_problems_reported(tmp_path: Path) -> None:
    make_edit(tmp_path, ["a", "b"])
    (tmp_path / "image" / "b.txt").unlink()
    make_caption(tmp_path / "image" / "orphan.txt")
    Image.new("RGB", (8, 8)).save(tmp_path / "image" / "anim.gif")
    make_image(tmp_path / "control" / "anim.png")
    make_image(tmp_path / "control" / "dup.png")
    make_image(tmp_path / "control" / "dup.jpg")
    make_pair(tmp_path / "image", "dup.png")
    report = scan_dataset(tmp_path)
    single_error(report, tmp_path / "image/b.jpg", "missing caption")
    single_error(report, tmp_path / "image/orphan.txt", "caption without an image")
    single_error(report, tmp_path / "image/anim.gif", "unsupported image extension")
    single_error(report, tmp_path / "control/dup.png", "ambiguous")
    single_error(report, tmp_path / "control/dup.jpg", "ambiguous")
    # the control of an unsupported target is not reported again as a stray
    assert errors_for(report, tmp_path / "control/anim.png") == []
    assert len(report.errors) == 5
    assert [s.image.name for s in report.samples] == ["a.jpg"]


def test_edit_control_count_mismatch(tmp_path: Path) -> None:
    make_edit(tmp_path, ["a", "b", "c"], controls=2)
    (tmp_path / "control_2" / "b.png").unlink()
    report = scan_dataset(tmp_path)
    assert not report.ok
    target = tmp_path / "image/b.jpg"
    single_error(report, target, "second control image", "control_2", "same for every sample")
    assert [s.image.name for s in report.samples] == ["a.jpg", "c.jpg"]


def test_edit_control_3_requires_control_2(tmp_path: Path) -> None:
    make_edit(tmp_path, ["a"])
    make_image(tmp_path / "control_3" / "a.png")
    report = scan_dataset(tmp_path)
    assert not report.ok
    single_error(report, tmp_path / "control_3", "requires control_2")
    assert report.samples == [Sample(tmp_path / "image/a.jpg", "caption a", (tmp_path / "control/a.png",))]


def test_edit_unknown_root_entries_warn(tmp_path: Path) -> None:
    make_edit(tmp_path, ["a"])
    (tmp_path / "README.md").write_text("hi")
    (tmp_path / "control_4").mkdir()
    (tmp_path / "image" / "nested").mkdir()
    report = scan_dataset(tmp_path)
    assert report.ok, report.format()
    assert sorted(p.path.name for p in report.warnings) == ["README.md", "control_4", "nested"]


@pytest.mark.parametrize(
    "controls, num_controls, needle",
    [(2, 1, "needs 1 control"), (1, 2, "needs 2 control"), (3, (1, 2), "needs 1 to 2 control")],
)
def test_num_controls_mismatch(tmp_path: Path, controls: int, num_controls, needle: str) -> None:
    make_edit(tmp_path, ["a"], controls=controls)
    report = scan_dataset(tmp_path, num_controls=num_controls)
    assert not report.ok
    message = single_error(report, tmp_path, "model family", needle)
    assert "num_controls" not in message  # the user's words, not the argument's name
    assert len(report.samples) == 1  # the samples are fine; the setting does not match


def test_num_controls_on_flat_dataset(tmp_path: Path) -> None:
    make_pair(tmp_path, "a.png")
    assert scan_dataset(tmp_path, num_controls=0).ok
    report = scan_dataset(tmp_path, num_controls=1)
    single_error(report, tmp_path, "model family", "flat layout")


def test_explicit_edit_layout_requires_folders(tmp_path: Path) -> None:
    make_pair(tmp_path / "image", "a.png")
    report = scan_dataset(tmp_path, layout="edit")
    assert report.layout == "edit" and not report.ok
    single_error(report, tmp_path / "control", "missing folder")
    auto = scan_dataset(tmp_path)
    assert auto.layout == "flat" and not auto.ok
    assert [p.severity for p in auto.problems if p.path == tmp_path / "image"] == ["warning"]
    single_error(auto, tmp_path, "empty dataset")


def test_edit_empty_image_folder(tmp_path: Path) -> None:
    (tmp_path / "image").mkdir()
    (tmp_path / "control").mkdir()
    report = scan_dataset(tmp_path)
    assert report.layout == "edit"
    single_error(report, tmp_path / "image", "empty dataset")


# --------------------------------------------------------------------------------------------- command


def test_command_good_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_pair(tmp_path, "a.png")
    assert run_validate_data_command(["--path", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "1 sample, 0 errors, 0 warnings" in out
    assert "OK" in out


def test_command_good_edit_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_edit(tmp_path, ["a", "b"], controls=2)
    assert run_validate_data_command(["--path", str(tmp_path), "--layout", "edit"]) == 0
    assert "2 samples" in capsys.readouterr().out


def test_command_bad_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_image(tmp_path / "a.png")
    make_caption(tmp_path / "b.txt")
    assert run_validate_data_command(["--path", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"{tmp_path / 'a.png'}: error: missing caption" in out
    assert f"{tmp_path / 'b.txt'}: error: caption without an image" in out
    assert "0 samples, 2 errors, 0 warnings" in out


def test_command_missing_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_validate_data_command(["--path", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv", [[], ["--layout", "flat"], ["--path", "x", "--layout", "nested"], ["--path", "x", "--bogus"]]
)
def test_command_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert run_validate_data_command(argv) == 2
    captured = capsys.readouterr()
    assert "usage: python -m glance_lightning validate-data" in captured.err
    assert captured.out == ""


def test_command_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_validate_data_command(["--help"]) == 0
    assert "--layout" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ image kinds
# validate-data opens every image exactly as training does (datamodules/images.py) and reports per file.


def save_pair(folder: Path, name: str, image: Image.Image, **save: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    image.save(folder / name, **save)
    make_caption(folder / (Path(name).stem + ".txt"))
    return folder / name


def findings(report: DatasetReport, path: Path) -> list[tuple[str, str]]:
    return [(p.severity, p.message) for p in report.problems if p.path == path]


def image_zoo(root: Path) -> dict[str, Path]:
    """One file of each kind that needs handling, each with a caption."""
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [Image.new("RGB", (256, 256), c) for c in ((200, 0, 0), (0, 0, 200))]
    return {
        "good": save_pair(root, "good.png", Image.new("RGB", (256, 256), (1, 2, 3))),
        "grey16": save_pair(root, "grey16.png", Image.fromarray(np.full((256, 256), 32896, np.uint16))),
        "phone": save_pair(root, "phone.jpg", Image.new("RGB", (512, 256)), exif=exif),
        "cutout": save_pair(root, "cutout.png", Image.new("RGBA", (256, 256), (0, 0, 0, 0))),
        "anim": save_pair(root, "anim.webp", frames[0], save_all=True, append_images=frames[1:]),
        "cmyk": save_pair(root, "cmyk.jpg", Image.new("CMYK", (256, 256))),
        "dot": save_pair(root, "dot.png", Image.new("RGB", (1, 1))),
        "strip": save_pair(root, "strip.png", Image.new("RGB", (8, 4000))),
        "thumb": save_pair(root, "thumb.png", Image.new("RGB", (64, 64))),
    }


def test_every_image_kind_is_reported_per_file_in_one_pass(tmp_path: Path) -> None:
    files = image_zoo(tmp_path)
    report = scan_dataset(tmp_path)
    assert findings(report, files["good"]) == [] and findings(report, files["grey16"]) == []
    assert findings(report, files["phone"]) == [
        ("info", "EXIF orientation 6 applied (rotated 90° clockwise): used as 256x512, as image viewers show it")]
    ((severity, message),) = findings(report, files["cutout"])
    assert severity == "warning" and "flattened onto white (data.alpha=white)" in message
    assert findings(report, files["anim"]) == [("warning", "animated image (2 frames): only the first frame is used; "
                                                           "save the frame you want as a still image to silence this")]
    assert [s for s, _ in findings(report, files["cmyk"])] == ["info"]
    single_error(report, files["dot"], "degenerate size 1x1", "under 8 px")
    strip = [m for s, m in findings(report, files["strip"]) if s == "warning"]
    assert any("aspect ratio 500.0:1 (8x4000)" in m and "data.max_aspect_ratio=4" in m for m in strip), strip
    assert any("small image 8x32: upscaled 64.0x to 512x2048" in m for m in strip), strip
    ((severity, message),) = findings(report, files["thumb"])
    assert severity == "warning"
    assert "small image 64x64: upscaled 16.0x to 1024x1024 for data.resolution=1024" in message
    assert not report.ok  # the 1x1 image
    assert sorted(s.image.name for s in report.samples) == sorted(p.name for k, p in files.items() if k != "dot")
    assert report.format().splitlines()[-1] == "8 samples, 1 error, 5 warnings, 2 notes"


def test_rules_are_the_datamodule_settings(tmp_path: Path) -> None:
    thumb = save_pair(tmp_path, "thumb.png", Image.new("RGB", (64, 64)))
    cutout = save_pair(tmp_path, "cutout.png", Image.new("RGBA", (256, 256), (0, 0, 0, 0)))
    strip = save_pair(tmp_path, "strip.png", Image.new("RGB", (256, 1536)))
    report = scan_dataset(tmp_path, rules=ImageRules(resolution=256, alpha="error", max_aspect_ratio=8))
    assert findings(report, thumb) == [] and findings(report, strip) == []  # 4x at 256; 6:1 is within 8:1
    single_error(report, cutout, "data.alpha=error")
    assert [s.image.name for s in report.samples] == ["strip.png", "thumb.png"]


def test_edit_control_images_follow_the_same_rules(tmp_path: Path) -> None:
    make_edit(tmp_path, ["a", "b"])
    Image.new("LA", (256, 256), (0, 0)).save(tmp_path / "control" / "a.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "control" / "b.png")
    report = scan_dataset(tmp_path)
    assert [s for s, _ in findings(report, tmp_path / "control/a.png")] == ["warning"]
    single_error(report, tmp_path / "control/b.png", "degenerate size 1x1")
    assert [s.image.name for s in report.samples] == ["a.jpg"]


def validate_data_cli(path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "GLANCE_LIGHTNING_DEBUG": ""}
    return run_reaped([sys.executable, "-m", "glance_lightning", "validate-data", "--path", str(path)],
                      timeout=240, merge_stderr=False, env=env)


def test_validate_data_cli_names_each_image_without_a_traceback(tmp_path: Path) -> None:
    files = image_zoo(tmp_path)
    bad = validate_data_cli(tmp_path)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
    assert f"{files['dot']}: error: degenerate size 1x1" in bad.stdout
    for kind in ("cutout", "anim", "strip", "thumb"):
        assert f"{files[kind]}: warning: " in bad.stdout, kind
    assert f"{files['phone']}: info: EXIF orientation 6 applied" in bad.stdout
    files["dot"].unlink()
    files["dot"].with_suffix(".txt").unlink()
    good = validate_data_cli(tmp_path)
    assert good.returncode == 0, good.stdout + good.stderr  # warnings alone do not fail a dataset
    assert "8 samples, 0 errors, 5 warnings, 2 notes" in good.stdout and "Traceback" not in good.stderr


def test_multi_picture_jpeg_is_a_note_not_an_animation(tmp_path: Path) -> None:
    """Cameras write MPO JPEGs (photo + depth map or preview): the photo is used, no warning."""
    photo, extra = Image.new("RGB", (256, 256), (200, 0, 0)), Image.new("RGB", (64, 64), (0, 0, 200))
    photo.save(tmp_path / "cam.mpo", format="MPO", save_all=True, append_images=[extra])
    (tmp_path / "cam.mpo").rename(tmp_path / "cam.jpg")
    make_caption(tmp_path / "cam.txt")
    report = scan_dataset(tmp_path)
    assert report.ok and findings(report, tmp_path / "cam.jpg") == [
        ("info", "multi-picture JPEG (MPO, 2 pictures): the first (main) picture is used")]
