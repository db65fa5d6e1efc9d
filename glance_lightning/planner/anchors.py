"""The search's anchors: the three training steps it simulates at full size (share 0 compiled; every block
recomputed under each checkpoint policy; all with a bf16 base and AdamW), which every other candidate is
interpolated from, and their cached form (plain JSON data, ``anchors_to_dict``).

The three steps are independent, so on a machine with CPUs to spare they are simulated at once: for a full-size
model (at least ``PARALLEL_FROM`` parameters) up to two run in helper processes while this process runs the rest.
A helper first imports torch and the family (a few seconds), so a tiny model is always simulated here. The helpers
print nothing (third-party import lines stay out of the run's console) and are always reaped; if one cannot start
or fails (a family class defined where a fresh process cannot import it, say), its step is simulated here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from glance_lightning import performance as perf_ops
from glance_lightning.planner.memory import StepMemory, build_transformer
from glance_lightning.planner.plan import PlanRequest, encode_stage_gib, make_plan
from glance_lightning.planner.quant import linear_weight_bytes
from glance_lightning.planner.request import build_request
from glance_lightning.planner.trace import OpTrace

QUANTS = ("none", "int8-weight-only", "nf4")
# (checkpointed share, policy, regional compile) of each anchor; the first is simulated in this process
ANCHOR_SWITCHES = ((0.0, "full", True), (1.0, "full", False), (1.0, "save-matmuls", False))
PARALLEL_FROM = 500_000_000  # parameters: below this a step simulates in about the time a helper takes to start
HELPER_TIMEOUT_S = 900.0  # a helper still running after this is stopped and its step simulated here
STEP_FIELDS = ("peak", "base", "lora", "optimizer", "gradients", "activations", "flops", "wall_s",
               "recomputed_block_bytes", "optimizer_adamw", "optimizer_8bit", "grad_input_linear_bytes",
               "lora_numel", "compile_saving")


@dataclass
class Anchors:
    """The three simulated steps and the layout figures every candidate is interpolated from."""

    steps: dict[tuple[float, str], StepMemory]
    layouts: dict[str, tuple[int, int]]
    blocks: int
    encode_gib: float
    seconds: float
    helpers: int = 0  # steps simulated in helper processes


def variant(request: PlanRequest | SimpleNamespace, share: float, policy: str, quant: str = "none",
            optimizer: str = "adamw", offload: str = "none", compile_blocks: bool = False) -> PlanRequest:
    """``request`` (only its ``raw`` is read) with these performance switches."""
    raw = request.raw
    init = {**raw["init"]}
    init["performance"] = {**(init.get("performance") or {}), "gradient_checkpointing": share,
                           "checkpoint_policy": policy, "base_quantization": quant, "offload": offload,
                           "compile_blocks": compile_blocks, "auto": False}
    init["optimizer"] = {**(init.get("optimizer") or {}), "name": optimizer}
    return build_request(raw["cls"], init, raw["data"], raw["trainer"], raw["gpu"], raw["gpu_memory"],
                         raw["text_tokens"], raw["architecture"], raw.get("ranks"))


def simulate(request: PlanRequest) -> StepMemory:
    """The step of ``request`` on fake tensors, its module's own lines kept off the console."""
    from glance_lightning import console

    with contextlib.redirect_stdout(io.StringIO()), console.quiet_info(True):
        return make_plan(request).memory


def simulate_anchors(request: PlanRequest, cpus: int | None = None) -> Anchors:
    """The anchors of ``request``'s config; ``cpus``: how many this planning may use (default: this process's)."""
    started = time.perf_counter()
    with torch.device("meta"):
        model = build_transformer(request.step.architecture, torch.bfloat16)
    layouts = {q: linear_weight_bytes(model, q) for q in QUANTS}
    blocks = len(perf_ops.repeated_blocks(model, request.module.repeated_blocks))
    size = sum(p.numel() for p in model.parameters())
    del model
    encode, _ = encode_stage_gib(request.module.family_spec, request.module.dtype_name,
                                 request.step.height * request.step.width)
    spare = (available_cpus() if cpus is None else cpus) - 1
    helpers = min(len(ANCHOR_SWITCHES) - 1, spare) if size >= PARALLEL_FROM else 0
    steps, helped = _simulate_all(request, helpers)
    return Anchors(steps, layouts, blocks, encode, time.perf_counter() - started, helped)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _simulate_all(request: PlanRequest, helpers: int) -> tuple[dict[tuple[float, str], StepMemory], int]:
    """Each anchor's step: the last ``helpers`` in helper processes, the others here (meanwhile)."""
    steps: dict[tuple[float, str], StepMemory] = {}
    split = len(ANCHOR_SWITCHES) - helpers
    here, away = ANCHOR_SWITCHES[:split], ANCHOR_SWITCHES[split:]
    started = [_Helper.start(request.raw, switches) for switches in away]
    helped = 0
    try:
        for share, policy, compiled in here:
            steps[(share, policy)] = simulate(variant(request, share, policy, compile_blocks=compiled))
        for (share, policy, compiled), helper in zip(away, started):
            row = helper.result() if helper is not None else None
            if row is None:  # the helper could not run it
                steps[(share, policy)] = simulate(variant(request, share, policy, compile_blocks=compiled))
            else:
                steps[(share, policy)], helped = step_from_dict(row), helped + 1
    finally:
        for helper in started:
            if helper is not None:
                helper.stop()
    return steps, helped


class _Helper:
    """One anchor simulated in a fresh ``python`` process (not ``multiprocessing``: its spawn would run the
    user's script again as the helper's main module). The switches and the request's plain parts go in on stdin
    (pickled: a family class is named by its module), the step comes back as JSON in a file; its own output goes
    nowhere."""

    def __init__(self, process: subprocess.Popen, folder: tempfile.TemporaryDirectory, out: Path) -> None:
        self.process, self.folder, self.out = process, folder, out

    @classmethod
    def start(cls, raw: dict[str, Any], switches: tuple) -> _Helper | None:
        try:
            payload = pickle.dumps((raw, switches))
        except Exception:  # noqa: BLE001 - a class or value a helper cannot import: simulated here instead
            return None
        folder = tempfile.TemporaryDirectory(prefix="glance-plan-")
        out = Path(folder.name) / "step.json"
        code = "import sys; from glance_lightning.planner.anchors import helper_main; helper_main(sys.argv[1])"
        try:
            process = subprocess.Popen([sys.executable, "-c", code, str(out)], stdin=subprocess.PIPE,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            process.stdin.write(payload)
            process.stdin.close()
        except OSError:
            folder.cleanup()
            return None
        return cls(process, folder, out)

    def result(self) -> dict[str, Any] | None:
        """The helper's step, or None when it failed (or ran past ``HELPER_TIMEOUT_S``)."""
        try:
            code = self.process.wait(timeout=HELPER_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return None
        if code != 0:
            return None
        try:
            return json.loads(self.out.read_text())
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.folder.cleanup()


def helper_main(out: str) -> None:
    """A helper process's work: the anchor named on stdin, its step written to ``out``."""
    raw, (share, policy, compiled) = pickle.loads(sys.stdin.buffer.read())
    memory = simulate(variant(SimpleNamespace(raw=raw), share, policy, compile_blocks=compiled))
    Path(out).write_text(json.dumps(step_to_dict(memory)))


def step_to_dict(memory: StepMemory) -> dict[str, Any]:
    return {**{k: getattr(memory, k) for k in STEP_FIELDS}, "trace": memory.trace.as_dict()}


def step_from_dict(row: dict[str, Any]) -> StepMemory:
    known = {f.name for f in fields(StepMemory)}
    values = {k: row[k] for k in STEP_FIELDS if k in known}
    return StepMemory(step_s=None, **values, trace=OpTrace.from_dict(row["trace"]))


def anchors_to_dict(anchors: Anchors) -> dict[str, Any]:
    steps = [{"share": share, "policy": policy, **step_to_dict(m)} for (share, policy), m in anchors.steps.items()]
    return {"steps": steps, "layouts": anchors.layouts, "blocks": anchors.blocks, "encode_gib": anchors.encode_gib,
            "seconds": anchors.seconds}


def anchors_from_dict(data: dict[str, Any]) -> Anchors:
    steps = {(float(row["share"]), row["policy"]): step_from_dict(row) for row in data["steps"]}
    layouts = {k: tuple(v) for k, v in data["layouts"].items()}
    return Anchors(steps, layouts, int(data["blocks"]), float(data["encode_gib"]), float(data["seconds"]))
