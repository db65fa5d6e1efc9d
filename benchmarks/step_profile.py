"""Where a training step's wall time goes: device busy, and device idle charged to the host phase that kept it
waiting. For the gap between our module's step and the plain diffusers + peft loop's at the same kernels
(benchmarks/bench_step_ops.py shows the kernels are the same; GLANCE.md section 8 measured ours 3-8% slower).

Both loops mark their host phases with ``torch.profiler.record_function`` ranges (``PHASES``: forward, backward,
optimizer = clipping + the optimizer step + zeroing + the step's closing hooks and sync, between = everything until
the next forward starts: Lightning's loop, the data, the draws). ``torch.profiler`` records a few steps with the
device's kernels; ``summarize`` then charges every idle stretch of the device to the phase the host was in when it
launched the kernel that ended the stretch (the device waited for that launch), and counts kernels, host-device
syncs (and the host reads of device scalars, ``.item()``, that cause them: counted on a CPU too) and Python's
garbage collections per step. On a CPU there are no device kernels: the host phases' wall times
and the collections are still reported.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

PHASES = ("forward", "backward", "optimizer", "between")
TRACE_LIMIT = 15 * 2**20
PREFIX = "step_profile::"
SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")  # kineto activity types of work on the device


class PhaseMarks:
    """Host phase ranges, opened and closed one after the other (each ``enter`` closes the phase before)."""

    def __init__(self) -> None:
        self._open: Any = None

    def enter(self, phase: str) -> None:
        self.close()
        self._open = torch.profiler.record_function(PREFIX + phase)
        self._open.__enter__()

    def close(self) -> None:
        if self._open is not None:
            self._open.__exit__(None, None, None)
            self._open = None


class GcClock:
    """Seconds Python's garbage collector ran (``gc.callbacks``) while installed, and how many collections."""

    def __init__(self) -> None:
        self.seconds, self.collections, self._started = 0.0, 0, 0.0

    def __call__(self, stage: str, info: dict[str, Any]) -> None:
        if stage == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[GcClock]:
        gc.callbacks.append(self)
        try:
            yield self
        finally:
            gc.callbacks.remove(self)


class StepProfiler:
    """Profiles steps ``first`` .. ``first + steps - 1`` of a loop (``step_started(i)`` before each step's
    forward, ``step_ended(i)`` after it), marking the phases in between through ``marks``."""

    def __init__(self, first: int, steps: int, device: str, trace: Path | None = None) -> None:
        """``trace``: where to keep the profile as a gzipped Chrome trace (chrome://tracing, Perfetto)."""
        self.first, self.steps, self.device, self.trace = first, steps, device, trace
        self.marks, self.gc = PhaseMarks(), GcClock()
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.startswith("cuda"):
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.profiler = torch.profiler.profile(activities=activities)
        self.summary: dict[str, Any] | None = None
        self._gc_installed: Any = None

    def step_started(self, index: int) -> None:
        if index == self.first:
            self.profiler.start()
            self._gc_installed = self.gc.installed()
            self._gc_installed.__enter__()
        if self.first <= index < self.first + self.steps:
            self.marks.enter("forward")

    def step_ended(self, index: int) -> None:
        if self.first <= index < self.first + self.steps:
            self.marks.enter("between")
        if index == self.first + self.steps - 1:
            self.marks.close()
            if self.device.startswith("cuda"):
                torch.cuda.synchronize()
            self.profiler.stop()
            self._gc_installed.__exit__(None, None, None)
            self.summary = summarize(self.profiler.profiler.kineto_results.events(), self.steps)
            if self.trace is not None:
                self._keep_trace()
            self.summary.update(gc_s=self.gc.seconds / self.steps, collections=self.gc.collections / self.steps)


    def _keep_trace(self) -> None:
        with tempfile.TemporaryDirectory() as folder:
            raw = Path(folder) / "trace.json"
            self.profiler.export_chrome_trace(str(raw))
            partial = self.trace.with_name(f".{self.trace.name}.tmp")
            with raw.open("rb") as source, gzip.open(partial, "wb") as target:
                shutil.copyfileobj(source, target)
            if partial.stat().st_size > TRACE_LIMIT:  # the GPU machine returns no file above 16 MiB
                partial.unlink()
            else:
                os.replace(partial, self.trace)


class LightningMarks(L.Callback):
    """``StepProfiler`` driven by Lightning's hooks (the phases of ``Trainer.fit``'s automatic optimisation)."""

    def __init__(self, profiler: StepProfiler) -> None:
        self.p = profiler

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self.p.step_started(trainer.global_step)

    def on_before_backward(self, trainer: L.Trainer, *args: Any) -> None:
        if self.p.first <= trainer.global_step < self.p.first + self.p.steps:
            self.p.marks.enter("backward")

    def on_after_backward(self, trainer: L.Trainer, *args: Any) -> None:
        if self.p.first <= trainer.global_step < self.p.first + self.p.steps:
            self.p.marks.enter("optimizer")

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.p.step_ended(trainer.global_step - 1)  # global_step has moved past the step that ended


@dataclass
class Interval:
    start: int  # ns
    end: int
    launched: int = 0  # ns: when the host launched it (kernels)
    name: str = ""


@dataclass
class Charged:
    """Per-step totals in seconds: device ``busy``, ``idle`` per phase, host ``wall`` per phase."""

    busy: float = 0.0
    idle: dict[str, float] = field(default_factory=dict)
    wall: dict[str, float] = field(default_factory=dict)


def charge_idle(kernels: list[Interval], phases: list[Interval], steps: int) -> Charged:
    """Device busy time (the union of ``kernels``) and idle time per phase over the window the ``phases`` span,
    per step: each idle stretch goes to the phase in which the kernel that ended it was launched; the stretch
    after the last kernel goes to the phase the window ends in."""
    charged = Charged(idle={p: 0.0 for p in PHASES}, wall={p: 0.0 for p in PHASES})
    if not phases:
        return charged
    phases = sorted(phases, key=lambda p: p.start)
    for phase in phases:
        charged.wall[phase.name] = charged.wall.get(phase.name, 0.0) + (phase.end - phase.start) / 1e9 / steps
    begin, finish = phases[0].start, phases[-1].end

    def phase_at(t: int) -> str:
        inside = [p.name for p in phases if p.start <= t < p.end]
        return inside[-1] if inside else (phases[0].name if t < begin else phases[-1].name)

    covered = begin
    for kernel in sorted((k for k in kernels if k.end > begin and k.start < finish), key=lambda k: k.start):
        start, end = max(kernel.start, begin), min(kernel.end, finish)
        if start > covered:
            name = phase_at(kernel.launched or kernel.start)
            charged.idle[name] = charged.idle.get(name, 0.0) + (start - covered) / 1e9 / steps
        charged.busy += max(0, end - max(start, covered)) / 1e9 / steps
        covered = max(covered, end)
    if finish > covered:
        name = phases[-1].name
        charged.idle[name] = charged.idle.get(name, 0.0) + (finish - covered) / 1e9 / steps
    return charged


def summarize(events: Any, steps: int) -> dict[str, Any]:
    """``charge_idle`` over a profile's kineto events (ranges named ``PREFIX + phase``; device kernels linked to
    the host op that launched them), with kernels and syncs per step."""
    phases, kernels, host_ops, syncs, launches, reads = [], [], {}, 0, 0, 0
    for event in events:
        name, kind = event.name(), _kind(event)
        start, end = event.start_ns(), event.start_ns() + event.duration_ns()
        if kind == "user_annotation" and name.startswith(PREFIX):
            phases.append(Interval(start, end, name=name.removeprefix(PREFIX)))
        elif kind == "cpu_op":
            host_ops[event.correlation_id()] = event.start_ns()
            reads += name == "aten::_local_scalar_dense"
        elif kind == "cuda_runtime" and name in SYNCS:
            syncs += 1
        elif kind in DEVICE_WORK:
            launches += kind == "kernel"
            kernels.append(Interval(start, end, name=name, launched=event.linked_correlation_id()))
    by_name: dict[str, float] = {}
    for kernel in kernels:
        kernel.launched = host_ops.get(kernel.launched, kernel.start)
        by_name[kernel.name] = by_name.get(kernel.name, 0.0) + (kernel.end - kernel.start) / 1e9 / steps
    charged = charge_idle(kernels, phases, steps)
    return {"busy_s": charged.busy, "idle_s": charged.idle, "host_s": charged.wall,
            "kernels": launches / steps, "syncs": syncs / steps, "reads": reads / steps, "device_s_by_name": by_name}


def _kind(event: Any) -> str:
    """kineto's activity type of ``event``, or (on a torch whose events lack it) the same read from its device and
    name."""
    if hasattr(event, "activity_type"):
        return event.activity_type()
    name, on_host = event.name(), event.device_type() == torch.autograd.DeviceType.CPU
    if name.startswith(PREFIX):
        return "user_annotation" if on_host else "gpu_user_annotation"
    if not on_host:
        return "gpu_memcpy" if "memcpy" in name.lower() else "gpu_memset" if "memset" in name.lower() else "kernel"
    return "cuda_runtime" if name.startswith("cuda") else "cpu_op"


def kernel_differences(ours: dict[str, Any], plain: dict[str, Any], top: int = 6) -> str:
    """The device work whose time per step differs most between two summaries (ours - plain), as one line."""
    a, b = plain.get("device_s_by_name") or {}, ours.get("device_s_by_name") or {}
    diffs = sorted(((b.get(k, 0.0) - a.get(k, 0.0), k) for k in set(a) | set(b)), key=lambda d: -abs(d[0]))[:top]
    shown = "; ".join(f"{name[:70]} {d * 1e3:+.2f} ms" for d, name in diffs if d)
    total = sum(b.values()) - sum(a.values())
    return f"device time per step, ours - plain: {total * 1e3:+.2f} ms in all; most: {shown or 'none'}"


def describe(summary: dict[str, Any]) -> str:
    """One line for a report's note."""
    host = ", ".join(f"{p} {summary['host_s'].get(p, 0.0):.4f}" for p in PHASES)
    gc_part = (f"; {summary.get('reads', 0.0):.1f} scalar reads (.item()); gc "
               f"{summary.get('gc_s', 0.0):.4f} s ({summary.get('collections', 0.0):.1f} collections)")
    if not summary["kernels"]:
        return f"per step: host {host} s; no device kernels (CPU){gc_part}"
    idle = ", ".join(f"{p} {summary['idle_s'].get(p, 0.0):.4f}" for p in PHASES)
    return (f"per step: device busy {summary['busy_s']:.4f} s, idle while the host was in {idle} s; host {host} s; "
            f"{summary['kernels']:.0f} kernels, {summary['syncs']:.1f} syncs{gc_part}")
