"""What a run was trained on: a fingerprint of its dataset, and the differences between two fingerprints.

A checkpoint records the fingerprint (``glance_lightning.families.resume``), so that a resume on other data is
refused naming what differs. The fingerprint holds, per training sample, its image file's size and SHA-256, the
SHA-256 of its caption text (as trained: after reading, so a caption file and a caption given another way
compare the same) and its control images' sizes and SHA-256; and the DataModule's settings that change what is
trained (``fingerprint_settings()``, e.g. resolution, resize rule, batch size). Samples are named by their path
relative to the dataset's common folder, so a dataset moved or copied elsewhere is the same dataset. A sample
whose image is no file on disk (a DataModule of one's own) is fingerprinted by its pixels instead.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from glance_lightning.draws import TrainSample

_CHUNK = 1 << 20
_SHOWN = 4  # names listed per kind of difference before "and N more"


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256) of a file, read in chunks."""
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def _pixels_digest(pixels: torch.Tensor) -> str:
    data = pixels.detach().cpu().contiguous()
    return "pixels:" + hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def _entry(path: Path | None, pixels: torch.Tensor) -> dict[str, Any]:
    if path is not None and Path(path).is_file():
        size, sha = file_digest(Path(path))
        return {"bytes": size, "sha256": sha}
    return {"bytes": None, "sha256": _pixels_digest(pixels)}


def _names(samples: list[TrainSample]) -> list[str]:
    """Each sample's image path relative to the folder all images share (the file name for one image)."""
    paths = [str(Path(s.image)) for s in samples]
    if len(paths) == 1:
        return [Path(paths[0]).name]
    try:
        root = os.path.commonpath(paths)
    except ValueError:  # relative and absolute paths mixed, or other drives
        return paths
    return [os.path.relpath(p, root) for p in paths]


def dataset_fingerprint(datamodule: Any) -> dict[str, Any]:
    """The fingerprint of ``datamodule.train_samples`` (set up) and its ``fingerprint_settings()``."""
    samples = list(datamodule.train_samples)
    entries = {}
    for name, sample in zip(_names(samples), samples):
        control_paths = tuple(getattr(sample, "control_paths", ()) or ())
        controls = [_entry(control_paths[i] if i < len(control_paths) else None, pixels)
                    for i, pixels in enumerate(sample.controls)]
        entries[name] = {**_entry(sample.image, sample.pixels),
                         "caption_sha256": hashlib.sha256(sample.caption.encode("utf-8")).hexdigest(),
                         "controls": controls}
    settings = getattr(datamodule, "fingerprint_settings", None)
    found = settings() if callable(settings) else {"data.resolution": getattr(datamodule, "resolution", None)}
    root = getattr(datamodule, "path", None)
    return {"samples": entries, "settings": found, "folder": str(root) if root is not None else None}


def differences(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, list[str]]:
    """What differs between two fingerprints, by kind (empty: the same data); the folder may differ."""
    old, new = saved.get("samples", {}), current.get("samples", {})
    found: dict[str, list[str]] = {
        "only in the checkpoint's data": sorted(old.keys() - new.keys()),
        "new in this run's data": sorted(new.keys() - old.keys()),
        "other image content": [], "other caption": [], "other control images": [], "settings": [],
    }
    for name in sorted(old.keys() & new.keys()):
        a, b = old[name], new[name]
        if a.get("sha256") != b.get("sha256"):
            sizes = f" ({a['bytes']} -> {b['bytes']} bytes)" if a.get("bytes") != b.get("bytes") else ""
            found["other image content"].append(name + sizes)
        if a.get("caption_sha256") != b.get("caption_sha256"):
            found["other caption"].append(name)
        if [c.get("sha256") for c in a.get("controls", [])] != [c.get("sha256") for c in b.get("controls", [])]:
            found["other control images"].append(name)
    old_settings, new_settings = saved.get("settings", {}), current.get("settings", {})
    for key in sorted(old_settings.keys() | new_settings.keys()):
        if old_settings.get(key) != new_settings.get(key):
            found["settings"].append(f"{key} {old_settings.get(key)!r} -> {new_settings.get(key)!r}")
    return {kind: names for kind, names in found.items() if names}


def summary(found: dict[str, list[str]]) -> str:
    """The differences in one line: ``kind: a, b and 3 more; kind: ...``."""
    parts = []
    for kind, names in found.items():
        more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
        parts.append(f"{kind}: {', '.join(names[:_SHOWN])}{more}")
    return "; ".join(parts)
