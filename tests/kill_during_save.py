"""Run ``python -m glance_lightning fit ...`` with one save point made to stop half-way, for the SIGKILL tests.

    python tests/kill_during_save.py POINT NTH MARKER -- fit --config ...

The NTH file written at save point POINT (``lora``, ``checkpoint``, ``encode-cache``, ``sample``) gets half its
bytes into its temporary file; then this process writes MARKER (the target's path and the SHA-256 of what the
target held before, or "absent") and sleeps, until the test SIGKILLs it. Everything else is the real fit.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from glance_lightning import atomic
from glance_lightning.cli import main
from glance_lightning.lora_io import LORA_WEIGHT_NAME

POINTS: dict[str, Callable[[Path], bool]] = {
    "lora": lambda p: p.name == LORA_WEIGHT_NAME,
    "checkpoint": lambda p: p.suffix == ".ckpt",
    "encode-cache": lambda p: p.suffix == ".safetensors" and len(p.stem) == 64,  # entries are named by SHA-256
    "sample": lambda p: p.suffix == ".png",
}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "absent"


class HalfThenStop:
    """A file handle that writes half of the first write's bytes, then reports and waits to be killed."""

    def __init__(self, handle: IO[Any], target: Path, before: str, marker: Path) -> None:
        self.handle, self.target, self.before, self.marker = handle, target, before, marker

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.handle.write(view[: max(1, len(view) // 2)])
        self.handle.flush()
        part = self.marker.with_name(self.marker.name + ".part")  # the test sees the marker whole or not at all
        part.write_text(json.dumps({"target": str(self.target), "before": self.before}))
        os.replace(part, self.marker)
        time.sleep(600)
        raise SystemExit("not killed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.handle, name)


def install(point: str, nth: int, marker: Path) -> None:
    original = atomic.atomic_write
    seen = [0]

    @contextmanager
    def stopping(path: Any, mode: str = "wb") -> Iterator[IO[Any]]:
        target = Path(path)
        if not POINTS[point](target):
            with original(path, mode) as f:
                yield f
            return
        seen[0] += 1
        before = digest(target)
        with original(path, mode) as f:
            yield HalfThenStop(f, target, before, marker) if seen[0] == nth else f

    atomic.atomic_write = stopping  # write_bytes, write_text and AtomicCheckpointIO all go through it


if __name__ == "__main__":
    point, nth, marker, separator, *fit_args = sys.argv[1:]
    assert separator == "--" and point in POINTS, sys.argv
    install(point, int(nth), Path(marker))
    sys.exit(main(fit_args))
