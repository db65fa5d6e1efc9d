"""A roofline time for one training step on a named GPU, from the ops of the fake-tensor step.

``RooflineEstimator`` is torch's ``RuntimeEstimator`` (a dispatch mode that sums a time per aten op) with what
it misses here: it asserts that CUDA exists (the card's figures come from ``GPUS`` instead), and it counts no
FLOPs for the CPU flash-attention kernel that SDPA picks on fake CPU tensors (FLUX: 119.7 counted vs 171.8
TFLOP); those ops get the flop formulas of the CUDA flash kernel. Each op costs
``max(flops / (peak * efficiency), bytes moved / bandwidth, 4 us)``; views and allocations cost nothing. Matmul
efficiency is the H100's measured ~790 of 989 TFLOP/s; attention runs at a lower share of peak (flash-attention
kernels reach about half of the tensor-core peak, less for 64-wide heads). Treat the result as +-40%: kernel
launch gaps, fusion and the host are not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.distributed._tools.runtime_estimator import RuntimeEstimator
from torch.utils._runtime_estimation import _FLOAT_TYPES, _IGNORE_OPS, get_num_bytes
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


@dataclass(frozen=True)
class GpuSpec:
    """A card: usable memory (GiB), dense bf16 tensor-core TFLOP/s (fp32 accumulate), memory bandwidth GB/s."""

    name: str
    memory_gib: float
    bf16_tflops: float
    bandwidth_gbs: float
    description: str = ""
    host_link_gbs: float = 25.0  # achieved host->device copy rate (PCIe 4.0 x16 ~25, PCIe 5.0 x16 ~50)


GPUS: dict[str, GpuSpec] = {g.name: g for g in (  # memory: nvidia-smi's total (MiB / 1024)
    GpuSpec("h200", 140.4, 989.0, 4800.0, "H200 SXM 141 GB", 50.0),
    GpuSpec("h100", 79.6, 989.0, 3350.0, "H100 SXM 80 GB", 50.0),
    GpuSpec("h100-pcie", 79.6, 756.0, 2000.0, "H100 PCIe 80 GB", 50.0),
    GpuSpec("a100-80", 79.2, 312.0, 2039.0, "A100 SXM 80 GB"),
    GpuSpec("a100-40", 39.4, 312.0, 1555.0, "A100 40 GB"),
    GpuSpec("l40s", 45.0, 362.0, 864.0, "L40S 48 GB"),
    GpuSpec("a6000", 48.0, 155.0, 768.0, "RTX A6000 48 GB"),
    GpuSpec("5090", 31.8, 209.5, 1792.0, "GeForce RTX 5090 32 GB", 50.0),
    GpuSpec("4090", 24.0, 165.2, 1008.0, "GeForce RTX 4090 24 GB"),
    GpuSpec("3090", 24.0, 71.0, 936.0, "GeForce RTX 3090 24 GB"),
    GpuSpec("4080", 16.0, 97.5, 717.0, "GeForce RTX 4080 16 GB"),
    GpuSpec("4060ti-16", 16.0, 44.0, 288.0, "GeForce RTX 4060 Ti 16 GB"),
    GpuSpec("3060", 12.0, 25.5, 360.0, "GeForce RTX 3060 12 GB"),
)}
MATMUL_EFFICIENCY = 0.80  # measured bf16 matmul rate / peak on the H100 (790 / 989 TFLOP/s)
ATTENTION_EFFICIENCY = 0.45  # flash-attention forward+backward share of the tensor-core peak
BANDWIDTH_EFFICIENCY = 0.80  # achievable share of the memory bandwidth for elementwise kernels
KERNEL_FLOOR_S = 4e-6  # no eager kernel takes less (launch and tail); many small ops are launch-bound

_ALLOCATIONS = {aten.empty_like, aten.empty, aten.empty_strided, aten.new_empty, aten.new_empty_strided}
_ATTENTION = {
    aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
    aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention,
    aten._scaled_dot_product_flash_attention_for_cpu_backward, aten._scaled_dot_product_flash_attention_backward,
    aten._scaled_dot_product_efficient_attention_backward, aten._scaled_dot_product_cudnn_attention_backward,
}


def _free(func: Any) -> bool:
    """Ops that move no data: metadata queries (``prim.device``), views and allocations."""
    return (func.namespace != "aten" or func._overloadpacket in _IGNORE_OPS or getattr(func, "is_view", False)
            or func._overloadpacket in _ALLOCATIONS)


def get_gpu(name: str) -> GpuSpec:
    key = name.lower().replace("rtx", "").replace("_", "-").strip("- ")
    if key not in GPUS:
        from glance_lightning.errors import ConfigError

        raise ConfigError(f"--gpu {name}: unknown GPU; known: {', '.join(GPUS)} (or give --gpu-memory GiB)")
    return GPUS[key]


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


class RooflineEstimator(RuntimeEstimator):
    """Roofline seconds of the ops run inside (under a FakeTensorMode) on ``gpu``; ``flops`` counts FLOPs."""

    def __init__(self, gpu: GpuSpec, others: tuple[GpuSpec, ...] = ()) -> None:
        super().__init__()
        self.gpu = gpu
        self.others = others
        self.flops = 0
        self.seconds = 0.0
        self.seconds_on: dict[str, float] = {g.name: 0.0 for g in (gpu, *others)}
        self.kernels = 0
        self.counting = True
        self.by_kind: dict[str, float] = {"matmul": 0.0, "attention": 0.0, "memory-bound": 0.0}
        self._estimate_mode_type = "roofline"

    def __enter__(self) -> RooflineEstimator:
        self._estimate = self._op_time
        super().__enter__()
        return self

    def __exit__(self, *args: Any) -> None:  # RuntimeEstimator prints a total here; the planner reports it
        torch.utils._python_dispatch.TorchDispatchMode.__exit__(self, *args)
        self._mod_tracker.clear_user_hooks()
        self._mod_tracker.__exit__()

    def _op_time(self, func: Any, args: tuple, kwargs: dict | None) -> tuple[Any, float]:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.counting or _free(func):
            return out, 0.0
        flat_in = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        flat_out = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        moved = sum(get_num_bytes(t) for t in flat_in + flat_out)
        flops = op_flops(func, args, kwargs, out)
        if flops and not any(t.dtype in _FLOAT_TYPES for t in flat_out):
            flops = 0
        attention = func._overloadpacket in _ATTENTION
        share = ATTENTION_EFFICIENCY if attention else MATMUL_EFFICIENCY
        if any(t.dtype == torch.float32 for t in flat_out):
            share /= 2  # float32 matmuls run as TF32, half the bf16 rate
        seconds = 0.0
        for gpu in (self.gpu, *self.others):
            compute = flops / (gpu.bf16_tflops * 1e12 * share)
            transfer = moved / (gpu.bandwidth_gbs * 1e9 * BANDWIDTH_EFFICIENCY)
            op = max(compute, transfer, KERNEL_FLOOR_S)
            self.seconds_on[gpu.name] += op
            if gpu is self.gpu:
                seconds = op
                kind = "memory-bound" if transfer >= compute else ("attention" if attention else "matmul")
                self.by_kind[kind] += seconds
        self.flops += flops
        self.kernels += 1
        self.seconds += seconds
        return out, seconds * 1e3  # RuntimeEstimator's module tables are in milliseconds
