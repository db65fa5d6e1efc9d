"""What one simulated training step runs, op by op: the trace the time model prices on any card.

``TraceRecorder`` is a dispatch mode entered inside the planner's ``FakeTensorMode``: every aten op the module's
step runs (forward, backward with its recomputation, gradient clipping, optimizer) is recorded with the shapes
that decide its cost: ``(batch, M, N, K)`` of a matmul, ``(batch, heads, query, key, head_dim)`` of an attention
kernel, bytes read and written of everything else, and the FLOPs torch's formulas give (the CPU flash-attention
kernel that SDPA picks on fake CPU tensors is counted as CUDA's flash kernel). Equal records are counted, not
repeated, so a 57-block step is a few hundred rows. Runs of consecutive elementwise ops between two matmuls or
attention kernels are summed up as well (``fused``: what ``torch.compile`` would make one kernel of). Views,
metadata queries and allocations launch no kernel and are not recorded.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._runtime_estimation import _IGNORE_OPS, get_num_bytes
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten

MATMULS = {aten.mm, aten.addmm, aten.bmm, aten.baddbmm}
ATTENTION_FORWARD = {aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
                     aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention}
ATTENTION_BACKWARD = {aten._scaled_dot_product_flash_attention_for_cpu_backward,
                      aten._scaled_dot_product_flash_attention_backward,
                      aten._scaled_dot_product_efficient_attention_backward,
                      aten._scaled_dot_product_cudnn_attention_backward}
_ALLOCATIONS = {aten.empty_like, aten.empty, aten.empty_strided, aten.new_empty, aten.new_empty_strided}
PHASES = ("forward", "backward", "clip", "optimizer")


class Op(NamedTuple):
    """One kind of kernel launch: ``kind`` is matmul, attention-forward, attention-backward or elementwise (every
    other op: bandwidth-bound); ``dims`` as the module docstring says (empty for elementwise)."""

    phase: str
    kind: str
    name: str
    dims: tuple[int, ...]
    flops: int
    bytes: int
    fp32: bool  # a float32 output (a matmul then runs as TF32)


@dataclass
class OpTrace:
    """The counted ops of one step; ``fused[phase]`` = [runs, bytes]: the runs of consecutive elementwise ops
    (as ``torch.compile`` fuses them, each run one kernel that reads and writes about twice its largest op's
    bytes: its distinct inputs once and what is kept for backward or read by the next matmul)."""

    ops: Counter = field(default_factory=Counter)
    fused: dict[str, list[int]] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return sum(op.flops * n for op, n in self.ops.items())

    def launches(self, phase: str | None = None) -> int:
        return sum(n for op, n in self.ops.items() if phase is None or op.phase == phase)

    def as_dict(self) -> dict[str, Any]:
        """JSON-able: rows ``[phase, kind, name, dims, flops, bytes, fp32, count]`` and ``fused`` (``from_dict``)."""
        return {"ops": [[*op[:3], list(op.dims), *op[4:], n] for op, n in sorted(self.ops.items())],
                "fused": self.fused}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OpTrace:
        ops = Counter({Op(r[0], r[1], r[2], tuple(r[3]), r[4], r[5], bool(r[6])): r[7] for r in data["ops"]})
        return cls(ops, {k: list(v) for k, v in data.get("fused", {}).items()})


def _matmul_dims(packet: Any, args: tuple) -> tuple[int, ...]:
    if packet is aten.mm:
        a, b = args[0], args[1]
        return (1, a.shape[0], b.shape[1], a.shape[1])
    if packet is aten.addmm:
        a, b = args[1], args[2]
        return (1, a.shape[0], b.shape[1], a.shape[1])
    a, b = (args[0], args[1]) if packet is aten.bmm else (args[1], args[2])
    return (a.shape[0], a.shape[1], b.shape[2], a.shape[2])


def op_flops(func: Any, args: tuple, kwargs: dict, out: Any) -> int:
    """FLOPs of one aten op: torch's flop formulas, plus the CPU flash-attention kernels (as CUDA flash)."""
    packet = func._overloadpacket
    if packet is aten._scaled_dot_product_flash_attention_for_cpu:
        q, k, v = args[:3]
        return sdpa_flop_count(q.shape, k.shape, v.shape)
    if packet is aten._scaled_dot_product_flash_attention_for_cpu_backward:
        grad, q, k, v = args[:4]
        return sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)
    if packet in flop_registry:
        return flop_registry[packet](*args, **kwargs, out_val=out)
    return 0


def _launches_nothing(func: Any) -> bool:
    return (func.namespace != "aten" or func._overloadpacket in _IGNORE_OPS or getattr(func, "is_view", False)
            or func._overloadpacket in _ALLOCATIONS)


class TraceRecorder(TorchDispatchMode):
    """Records ``OpTrace`` of the ops run inside, under ``phase`` (set by the caller as the step goes on)."""

    def __init__(self) -> None:
        super().__init__()
        self.trace = OpTrace()
        self._phase = "forward"
        self._run: list[Any] = ["forward", 0]  # the open run of elementwise ops: phase, largest op's bytes

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        self._close_run()
        self._phase = value

    def __exit__(self, *args: Any) -> None:
        self._close_run()
        super().__exit__(*args)

    def _close_run(self) -> None:
        phase, largest = self._run
        if largest:
            runs = self.trace.fused.setdefault(phase, [0, 0])
            runs[0] += 1
            runs[1] += 2 * largest
        self._run = [self._phase, 0]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if _launches_nothing(func):
            return out
        packet = func._overloadpacket
        tensors_in = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        tensors_out = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        moved = sum(get_num_bytes(t) for t in tensors_in + tensors_out)
        floating = any(t.is_floating_point() for t in tensors_out)
        flops = op_flops(func, args, kwargs, out) if floating else 0
        fp32 = any(t.dtype == torch.float32 for t in tensors_out)
        if packet in MATMULS:
            kind, dims = "matmul", _matmul_dims(packet, args)
        elif packet in ATTENTION_FORWARD or packet in ATTENTION_BACKWARD:
            q = args[0] if packet in ATTENTION_FORWARD else args[1]
            kind = "attention-forward" if packet in ATTENTION_FORWARD else "attention-backward"
            dims = (q.shape[0], q.shape[1], q.shape[2], args[1 if packet in ATTENTION_FORWARD else 2].shape[2],
                    q.shape[3])
        else:
            kind, dims = "elementwise", ()
        if kind == "elementwise":
            self._run[1] = max(self._run[1], moved)
        else:
            self._close_run()
        self.trace.ops[Op(self.phase, kind, packet.__name__, tuple(int(d) for d in dims), int(flops), int(moved),
                          fp32)] += 1
        return out
