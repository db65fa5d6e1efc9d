"""Pre-flight validation of Glance training datasets (runs before any model is loaded).

This module owns the on-disk dataset contract and its checks:

* ``flat`` (text-to-image): one folder of images (``.png .jpg .jpeg .webp``, any letter case), each with a
  caption file of the same basename (``img1.png`` + ``img1.txt``): UTF-8, or UTF-16/32 with a byte-order mark;
  not empty unless ``data.allow_empty_captions``.
* ``edit`` (Qwen-Image-Edit): ``image/`` holds target images and their captions, ``control/`` holds the
  control image of the same basename; Qwen-Image-Edit-2509/2511 may add ``control_2/`` and ``control_3/``
  (second and third control image). Every target needs a file in every control folder that exists, and
  ``control_3/`` requires ``control_2/``.

:func:`scan_dataset` walks the whole dataset once and collects *every* problem (each naming its file) into a
:class:`DatasetReport`. Every image, control images included, is decoded by
``glance_lightning.datamodules.images.open_image`` and checked by its ``size_notes`` against the DataModule's
``ImageRules`` (the training defaults when none are given), exactly as training will load it: undecodable files,
degenerate sizes and ``alpha="error"`` are errors; flattened alpha, animation frames dropped, extreme aspect
ratios (centre-cropped) and large upscales are warnings; EXIF rotations and CMYK conversions are info lines.
:func:`validate_dataset` raises :class:`DatasetError` unless the report is usable;
``python -m glance_lightning validate-data`` (``glance_lightning.commands.validate_data``) prints the report.
Hidden files and folders (names starting with ``.``) are ignored everywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from glance_lightning.datamodules.images import ImageError, ImageRules, open_image, size_notes
from glance_lightning.datamodules.report import (  # noqa: F401 (re-exported: the dataset contract's names)
    PROG,
    SEVERITIES,
    Collector,
    DatasetError,
    DatasetReport,
    Problem,
    Sample,
)

from glance_lightning.errors import ConfigError
from glance_lightning.texts import UndecodableText, read_text

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_EXTENSION = ".txt"
CONTROL_DIRS = ("control", "control_2", "control_3")
LAYOUTS = ("auto", "flat", "edit")

_SUPPORTED = ", ".join(IMAGE_EXTENSIONS)
# Image formats people commonly drop into a dataset that the training loaders do not accept.
_UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    {".gif", ".bmp", ".tif", ".tiff", ".ico", ".heic", ".heif", ".avif", ".jxl", ".jp2", ".j2k", ".jfif",
     ".pjpeg", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".psd", ".svg", ".exr", ".hdr", ".dng", ".raw",
     ".cr2", ".nef", ".arw"}
)
# Control images per sample a model family accepts: exactly N, or an inclusive (min, max) range.
ControlCount = int | tuple[int, int]
_ORDINALS = {"control": "first", "control_2": "second", "control_3": "third"}


# --------------------------------------------------------------------------------------------- helpers


def _visible_entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _expected(folder: Path, stem: str) -> str:
    return f"{folder / stem}{{{','.join(IMAGE_EXTENSIONS)}}}"


@dataclass
class _FolderScan:
    """Files of one folder grouped by basename (stem); ``valid`` maps stems to decodable, unique images."""

    folder: Path
    images: dict[str, list[Path]] = field(default_factory=dict)
    captions: dict[str, list[Path]] = field(default_factory=dict)
    unsupported: dict[str, list[Path]] = field(default_factory=dict)
    valid: dict[str, Path] = field(default_factory=dict)

    def first_image(self, stem: str) -> Path:
        return self.images[stem][0]


def _scan_folder(
    folder: Path, out: Collector, *, captions_here: bool, flat_root: bool = False
) -> _FolderScan:
    """Group a folder's files; report unsupported formats, stray files and sub-folders, then decode images."""
    scan = _FolderScan(folder)
    for entry in _visible_entries(folder):
        suffix = entry.suffix.lower()
        if entry.is_symlink() and not entry.exists():
            out.error(entry, f"dangling symlink to {os.readlink(entry)} (no such file); fix the link or remove it")
            scan.unsupported.setdefault(entry.stem, []).append(entry)  # its caption is not reported as stray
        elif entry.is_dir():
            out.warning(entry, _subfolder_message(entry, flat_root))
        elif suffix in IMAGE_EXTENSIONS:
            scan.images.setdefault(entry.stem, []).append(entry)
        elif suffix == CAPTION_EXTENSION and captions_here:
            scan.captions.setdefault(entry.stem, []).append(entry)
        elif suffix == CAPTION_EXTENSION:
            out.warning(entry, "caption file ignored: captions belong next to the target image in image/")
        elif suffix in _UNSUPPORTED_IMAGE_EXTENSIONS:
            scan.unsupported.setdefault(entry.stem, []).append(entry)
            out.error(entry, f"unsupported image extension '{entry.suffix}'; convert to one of {_SUPPORTED}")
        else:
            out.warning(entry, "unknown file, ignored")
    _check_images(scan, out)
    return scan


def _subfolder_message(entry: Path, flat_root: bool) -> str:
    if flat_root and entry.name in ("image", *CONTROL_DIRS):
        return "folder ignored: read as a flat dataset; an edit dataset needs both image/ and control/"
    return "unexpected sub-folder, ignored (sub-folders are not scanned)"


def _check_images(scan: _FolderScan, out: Collector) -> None:
    """Decode every image; only unique, decodable ones go into ``scan.valid``."""
    for stem, paths in scan.images.items():
        decoded = [path for path in paths if _decodes(path, out)]
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            for path in paths:
                out.error(path, f"ambiguous: several images share the basename '{stem}' ({names}); keep one")
        elif decoded:
            scan.valid[stem] = decoded[0]


def _decodes(path: Path, out: Collector) -> bool:
    """Open the image as training will (``images.open_image``) and report its findings; False on an error."""
    try:
        opened = open_image(path, out.rules.alpha)
    except ImageError as exc:
        out.error(path, exc.reason)
        return False
    notes = opened.notes + size_notes(opened.image.size, out.rules)
    for note in notes:
        out.add(path, note.severity, note.message)
    return not any(note.severity == "error" for note in notes)


def _read_captions(scan: _FolderScan, out: Collector) -> dict[str, str]:
    """Read every caption file; return the unique, non-empty, UTF-8 ones by stem."""
    texts: dict[str, str] = {}
    for stem, paths in scan.captions.items():
        read = [(path, _read_caption(path, out)) for path in paths]
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            for path in paths:
                out.error(path, f"ambiguous: several caption files for basename '{stem}' ({names}); keep one")
        elif read[0][1] is not None:
            texts[stem] = read[0][1]
    return texts


def _read_caption(path: Path, out: Collector) -> str | None:
    """The caption's text (UTF-8, or UTF-16/32 with a byte-order mark); None after reporting why it is unusable.
    An empty caption is an error unless ``data.allow_empty_captions`` (then the sample trains on "")."""
    try:
        text = read_text(path)
    except UndecodableText as exc:
        out.error(path, f"caption is {exc}")
        return None
    except OSError as exc:
        out.error(path, f"unreadable caption file: {exc.strerror or exc}")
        return None
    if text.strip():
        return text.strip()
    if out.rules.allow_empty_captions:
        out.add(path, "info", "empty caption: trained without one (data.allow_empty_captions)")
        return ""
    out.error(path, "empty caption (the file is empty or whitespace only); write one, or set "
                    "data.allow_empty_captions: true to train this image without a caption")
    return None


def _pair_captions(scan: _FolderScan, out: Collector) -> dict[str, str]:
    """Report images without captions and captions without images; return the readable captions."""
    texts = _read_captions(scan, out)
    lower_captions = {stem.lower(): paths[0] for stem, paths in scan.captions.items()}
    for stem in sorted(scan.images.keys() - scan.captions.keys()):
        message = f"missing caption file: expected {scan.folder / (stem + CAPTION_EXTENSION)}"
        near = lower_captions.get(stem.lower())
        if near is not None:
            message += f" (found {near.name}: basenames are case-sensitive)"
        out.error(scan.first_image(stem), message)
    for stem in sorted(scan.captions.keys() - scan.images.keys() - scan.unsupported.keys()):
        message = f"caption without an image: no {_expected(scan.folder, stem)}"
        if Path(stem).stem in scan.images and _is_image(Path(stem)):
            message += f" (name it {Path(stem).stem}{CAPTION_EXTENSION})"
        out.error(scan.captions[stem][0], message)
    return texts


def _require_images(scan: _FolderScan, out: Collector) -> None:
    if not scan.images:
        out.error(scan.folder, f"empty dataset: no images found (supported extensions: {_SUPPORTED})")


# ------------------------------------------------------------------------------------------------ layouts


def _scan_flat(root: Path, out: Collector) -> list[Sample]:
    scan = _scan_folder(root, out, captions_here=True, flat_root=True)
    captions = _pair_captions(scan, out)
    _require_images(scan, out)
    return [Sample(scan.valid[stem], captions[stem]) for stem in sorted(scan.valid.keys() & captions.keys())]


def _control_dirs(root: Path, out: Collector) -> list[Path]:
    """The control folders in use, in order; reports ``control_3/`` without ``control_2/``."""
    present = [name for name in CONTROL_DIRS if (root / name).is_dir()]
    used: list[Path] = []
    for name in CONTROL_DIRS:
        if name not in present:
            break
        used.append(root / name)
    for name in present[len(used):]:
        previous = CONTROL_DIRS[CONTROL_DIRS.index(name) - 1]
        out.error(root / name, f"{name}/ requires {previous}/ (control folders must be consecutive); ignored")
    return used


def _check_root_entries(root: Path, out: Collector) -> None:
    known = {"image", *CONTROL_DIRS}
    for entry in _visible_entries(root):
        if entry.is_dir() and entry.name in known:
            continue
        if entry.is_dir() and entry.name.startswith("control"):
            out.warning(entry, f"unknown folder, ignored (control folders are {', '.join(CONTROL_DIRS)})")
        else:
            kind = "folder" if entry.is_dir() else "file"
            out.warning(entry, f"unknown {kind}, ignored (an edit dataset has image/ and control*/ folders)")


def _pair_controls(targets: _FolderScan, control: _FolderScan, out: Collector) -> None:
    """Report targets without a control image in ``control`` and control images without a target."""
    name = control.folder.name
    count_hint = "" if name == "control" else (
        f"; {name}/ exists, so every sample needs a {_ORDINALS[name]} control image "
        "(the number of control images must be the same for every sample)"
    )
    for stem in sorted(targets.images.keys() - control.images.keys() - control.unsupported.keys()):
        message = f"missing {_ORDINALS[name]} control image: expected {_expected(control.folder, stem)}"
        out.error(targets.first_image(stem), message + count_hint)
    for stem in sorted(control.images.keys() - targets.images.keys() - targets.unsupported.keys()):
        message = f"control image without a target: no {_expected(targets.folder, stem)}"
        out.error(control.first_image(stem), message)


def _scan_edit(root: Path, out: Collector) -> tuple[list[Sample], int]:
    _check_root_entries(root, out)
    image_dir = root / "image"
    controls = _control_dirs(root, out)
    if not image_dir.is_dir():
        out.error(image_dir, "missing folder: an edit dataset needs image/ (targets + captions) and control/")
    if not controls:
        out.error(root / "control", "missing folder: an edit dataset needs control/ (first control images)")
    if not image_dir.is_dir():
        return [], len(controls)
    targets = _scan_folder(image_dir, out, captions_here=True)
    captions = _pair_captions(targets, out)
    _require_images(targets, out)
    control_scans = [_scan_folder(folder, out, captions_here=False) for folder in controls]
    for control in control_scans:
        _pair_controls(targets, control, out)
    stems = set(targets.valid.keys() & captions.keys())
    for control in control_scans:
        stems &= control.valid.keys()
    samples = [
        Sample(targets.valid[s], captions[s], tuple(c.valid[s] for c in control_scans)) for s in sorted(stems)
    ]
    return samples, len(controls)


def _resolve_layout(root: Path, layout: str) -> str:
    if layout != "auto":
        return layout
    return "edit" if (root / "image").is_dir() and (root / "control").is_dir() else "flat"


def _control_range(num_controls: ControlCount) -> tuple[int, int]:
    low, high = (num_controls, num_controls) if isinstance(num_controls, int) else num_controls
    if not 0 <= low <= high:
        raise ConfigError(f"num_controls must be an int >= 0 or a (min, max) range, got {num_controls!r}")
    return low, high


def _check_control_count(root: Path, found: int, num_controls: ControlCount, out: Collector) -> None:
    low, high = _control_range(num_controls)
    if low <= found <= high:
        return
    wanted = str(low) if low == high else f"{low} to {high}"
    where = "no control folders (flat layout)" if found == 0 else f"{found} control image(s) per sample"
    out.error(root, f"the model family needs {wanted} control image(s) per sample, but the dataset has {where}")


# ---------------------------------------------------------------------------------------------- public API


def scan_dataset(
    root: str | Path, layout: str = "auto", num_controls: ControlCount | None = None,
    rules: ImageRules | None = None,
) -> DatasetReport:
    """Check a dataset folder in one pass and return every problem found (sorted by path).

    ``layout`` is ``"auto"`` (edit when ``image/`` and ``control/`` exist, else flat), ``"flat"`` or
    ``"edit"``. ``num_controls`` (an int, or an inclusive ``(min, max)`` range such as ``(1, 3)``) is the
    number of control images per sample the model family accepts; a mismatch is an error. ``rules`` (the
    DataModule's resolution, size_multiple, resize, max_aspect_ratio, alpha; default ``ImageRules()``, the
    DataModule defaults) decide the per-image findings.
    """
    if layout not in LAYOUTS:
        raise ConfigError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if num_controls is not None:
        _control_range(num_controls)
    root = Path(root)
    out = Collector(rules or ImageRules())
    if not root.is_dir():
        out.error(root, "dataset path is not a directory" if root.exists() else "dataset path does not exist")
        return DatasetReport(root, layout, [], out.sorted())
    resolved = _resolve_layout(root, layout)
    if resolved == "edit":
        samples, found = _scan_edit(root, out)
    else:
        samples, found = _scan_flat(root, out), 0
    if num_controls is not None:
        _check_control_count(root, found, num_controls, out)
    return DatasetReport(root, resolved, samples, out.sorted())


def validate_dataset(
    root: str | Path, layout: str = "auto", num_controls: ControlCount | None = None,
    rules: ImageRules | None = None,
) -> list[Sample]:
    """Return the dataset's samples, or raise :class:`DatasetError` listing every problem."""
    report = scan_dataset(root, layout, num_controls, rules)
    if not report.ok:
        raise DatasetError(report)
    return report.samples
