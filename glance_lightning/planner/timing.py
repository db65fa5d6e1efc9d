"""Seconds per training step on a named card, priced op by op from the simulated step's trace (``trace``).

Each recorded kernel costs its busy time plus a fixed ``LAUNCH_S``:

- matmuls: FLOPs at ``MATMUL_EFFICIENCY`` of the card's dense bf16 peak (cuBLAS on large shapes: 790 of 989 TFLOP/s
  measured on the H100/H200), times the share of the SMs its output tiles keep busy (``TILE`` x ``TILE`` tiles
  spread over the SMs in waves: a 333-token text stream or a batch of one fills a fraction of a wave), float32
  outputs at the TF32 half rate; never faster than its bytes over the memory bandwidth (rank-32 LoRA matmuls are
  bandwidth-bound).
- attention: FLOPs at the share of the peak FlashAttention-2 (PyTorch SDPA's flash kernel) reaches on the card's
  generation, by pass and head dimension (``ATTENTION_SHARE``: Hopper runs FA2 on the Ampere instructions, so a
  third of its peak forward and less backward, less again for 64-wide heads as SD3's).
- everything else (casts, norms, adds, GELU, RoPE, the loss): bytes read and written at ``BANDWIDTH_EFFICIENCY``
  of the card's bandwidth.
- ``LAUNCH_S`` per kernel: eager PyTorch launches every op from Python or the autograd engine; a short kernel
  then waits for the host and the next launch (FLUX's step is 11 000 kernels). It is the one constant fitted to
  the measured steps (GLANCE.md section 8: FLUX.1-dev and SD3.5-Large on an H200, with and without
  checkpointing); the rates above are the libraries' published figures.

Gradient clipping and AdamW run as multi-tensor kernels on a GPU (foreach norm, fused AdamW): their recorded
per-parameter ops are priced by bytes with one launch per ``FOREACH_TENSORS`` tensors. With regional compile
(``compiled``) each run of consecutive elementwise ops is one kernel (``OpTrace.fused``).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from glance_lightning.planner.runtime import GpuSpec
from glance_lightning.planner.trace import Op, OpTrace

MATMUL_EFFICIENCY = 0.80
TILE = 128
ATTENTION_SHARE: dict[str, dict[tuple[str, int], float]] = {  # (pass, head dim) -> share of the dense bf16 peak
    "hopper": {("forward", 64): 0.31, ("forward", 128): 0.34, ("backward", 64): 0.22, ("backward", 128): 0.28},
    "ampere": {("forward", 64): 0.60, ("forward", 128): 0.70, ("backward", 64): 0.45, ("backward", 128): 0.55},
}
BANDWIDTH_EFFICIENCY = 0.80
LAUNCH_S = 14e-6
FOREACH_TENSORS = 64
FUSED_PHASES = ("clip", "optimizer")
PARTS = ("matmul", "attention", "elementwise", "launches", "clip+optimizer")


@dataclass
class StepTime:
    """Predicted seconds of one step by part (``PARTS``) and how many kernels it launches."""

    gpu: str
    parts: dict[str, float] = field(default_factory=dict)
    kernels: int = 0
    tflop: float = 0.0
    compiled: bool = False
    offload_s: float = 0.0  # block offload's host->device copies not hidden behind compute (``plan``, by formula)
    comm_s: float = 0.0  # several ranks' communication not hidden behind compute (``planner.ranks``, by formula)
    comm: str = ""  # how comm_s was derived

    @property
    def seconds(self) -> float:
        return sum(self.parts.values()) + self.offload_s + self.comm_s

    def derivation(self) -> str:
        """One line: how the figure was made."""
        shown = " + ".join(f"{name} {self.parts.get(name, 0.0):.3f}" for name in PARTS)
        if self.offload_s:
            shown += f" + offload copies {self.offload_s:.3f}"
        if self.comm:
            shown += f" + communication {self.comm_s:.3f}"
        how = "elementwise runs fused by compile" if self.compiled else "eager"
        comm = f"; {self.comm} (planner/ranks.py)" if self.comm else ""
        return (f"{self.seconds:.3f} s = {shown} ({self.kernels} kernels, {how}; {self.tflop:.0f} TFLOP; "
                f"priced per kernel on the {self.gpu}: planner/timing.py{comm})")


def _attention_share(gpu: GpuSpec, kind: str, head_dim: int) -> float:
    table = ATTENTION_SHARE[gpu.generation if gpu.generation in ATTENTION_SHARE else "ampere"]
    pass_ = kind.split("-")[1]
    return table[(pass_, 64 if head_dim <= 64 else 128)]


def matmul_seconds(op: Op, gpu: GpuSpec) -> float:
    batch, m, n, _ = op.dims
    tiles = batch * math.ceil(m / TILE) * math.ceil(n / TILE)
    filled = tiles / (math.ceil(tiles / gpu.sms) * gpu.sms)
    rate = gpu.bf16_tflops * 1e12 * MATMUL_EFFICIENCY * filled * (0.5 if op.fp32 else 1.0)
    return max(op.flops / rate, op.bytes / (gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY))


def kernel_seconds(op: Op, gpu: GpuSpec) -> float:
    """Busy time of one kernel (launch cost not included)."""
    if op.kind == "matmul":
        return matmul_seconds(op, gpu)
    if op.kind.startswith("attention"):
        return op.flops / (gpu.bf16_tflops * 1e12 * _attention_share(gpu, op.kind, op.dims[4]))
    return op.bytes / (gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY)


def step_time(trace: OpTrace, gpu: GpuSpec, compiled: bool = False) -> StepTime:
    """The step's predicted seconds on ``gpu`` by part; ``compiled``: regional compile's fused elementwise runs."""
    parts: Counter = Counter()
    kernels = 0
    bandwidth = gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY
    for op, count in trace.ops.items():
        if op.phase in FUSED_PHASES:
            parts["clip+optimizer"] += op.bytes * count / bandwidth
            continue
        if compiled and op.kind == "elementwise":
            continue
        kind = "attention" if op.kind.startswith("attention") else op.kind
        parts[kind] += kernel_seconds(op, gpu) * count
        kernels += count
    if compiled:
        for phase, (runs, moved) in trace.fused.items():
            if phase not in FUSED_PHASES:
                parts["elementwise"] += moved / bandwidth
                kernels += runs
    fused_launches = sum(math.ceil(count / FOREACH_TENSORS) for op, count in trace.ops.items()
                         if op.phase in FUSED_PHASES)
    parts["launches"] = kernels * LAUNCH_S
    parts["clip+optimizer"] += fused_launches * LAUNCH_S
    return StepTime(gpu.name, {p: parts.get(p, 0.0) for p in PARTS}, kernels + fused_launches,
                    trace.flops / 1e12, compiled)
