"""A callback for benchmarks/bench_distributed.py: each rank of a fit writes ``rank<N>.json`` into ``folder`` with
its peak RSS (``ru_maxrss``: memory-mapped file pages read count too), its peak anonymous memory (``RssAnon``,
sampled every 10 ms from the callback's ``setup``, before any model loads: what the kernel cannot reclaim), its
device peak (``torch.cuda.max_memory_allocated``; None on a CPU, where the host is the device) and the seconds of
each training step (the device synchronised at both ends)."""

from __future__ import annotations

import json
import resource
import threading
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

GIB = 2**30


def anonymous_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class RankProbe(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.peak_anonymous, self.load_anonymous, self.steps, self._started = 0, 0, [], 0.0
        self._done = threading.Event()

    def setup(self, trainer, pl_module, stage: str) -> None:
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while not self._done.is_set():
            self.peak_anonymous = max(self.peak_anonymous, anonymous_bytes())
            time.sleep(0.01)

    def on_train_start(self, trainer, pl_module) -> None:
        self.load_anonymous = max(self.peak_anonymous, anonymous_bytes())

    def _sync(self, trainer) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize(trainer.strategy.root_device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync(trainer)
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync(trainer)
        self.steps.append(time.perf_counter() - self._started)

    def on_train_end(self, trainer, pl_module) -> None:
        self._done.set()
        device = trainer.strategy.root_device
        record = {
            "rank": trainer.global_rank, "world_size": trainer.world_size,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
            "peak_anonymous_gib": max(self.peak_anonymous, anonymous_bytes()) / GIB,
            "load_anonymous_gib": self.load_anonymous / GIB,
            "device_peak_gib": torch.cuda.max_memory_allocated(device) / GIB if device.type == "cuda" else None,
            "step_s": self.steps,
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))
