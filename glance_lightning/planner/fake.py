"""Fake tensors that behave like CUDA ones where GPU memory depends on it, and a MemTracker that is cheap.

A full-size transformer built under ``FakeTensorMode`` costs no memory: every tensor has a shape, a dtype and a
storage size but no data. Fake CUDA tensors do not work with the CPU build of torch (autograd on them aborts),
so the planner uses fake CPU tensors and puts back the three CUDA behaviours that change what a training step
allocates (``cuda_behaviour``):

- autocast with CUDA's op lists: on CUDA, norms, softmax, exp, pow, sums (and the other ops of its fp32 list) run
  in float32 under bf16/fp16 autocast; CPU autocast leaves them in bf16. Registered as AutocastCPU kernels for the
  duration of the context.
- ``torch.nn.RMSNorm`` as one fused op (CUDA's ``_fused_rms_norm``) that saves its bf16 input and the per-row
  rstd for backward; the CPU decomposition keeps float32 copies of q and k instead (+3 GiB for FLUX).
- allocations rounded up to 512 bytes, as the CUDA caching allocator does (``PlannerMemTracker``).

SDPA on fake CPU tensors picks the flash kernel, which saves what CUDA flash saves (output and logsumexp).

``PlannerMemTracker`` is torch's ``MemTracker`` with two fixes: no gradient hooks on parameters that do not
require grad (a frozen base: torch raises there when a module is tracked again), and per-op cost independent of
the number of modules (only the global peak is updated per op; module-wise peaks are not needed here).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.distributed._tools import mem_tracker as _mt
from torch.distributed._tools.mem_tracker import MemTracker, _MemRefType, _State
from torch.utils._pytree import tree_map

CUDA_ALLOCATION = 512  # bytes: the CUDA caching allocator's smallest block (sizes round up to a multiple)

# CUDA autocast's float32 ops (aten/src/ATen/autocast_mode.cpp), those a diffusion transformer step meets.
CUDA_FP32_OPS = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "group_norm", "frobenius_norm.dim", "cosine_similarity", "mse_loss", "l1_loss",
    "smooth_l1_loss", "huber_loss", "kl_div", "binary_cross_entropy_with_logits", "dist", "cdist", "renorm",
    "logsumexp",
)
# ... and those that run in float32 by getting ``dtype=float32`` when none is given (no float32 input copy).
CUDA_FP32_SET_DTYPE_OPS = (
    "softmax.int", "log_softmax.int", "sum", "sum.dim_IntList", "prod", "prod.dim_int", "cumsum", "cumprod",
    "linalg_vector_norm",
)
# ... and lower-precision ops CUDA casts that CPU autocast does not.
CUDA_LOW_PRECISION_OPS = ("addmv", "addr", "mv", "einsum", "chain_matmul", "linalg_multi_dot")

_AUTOCAST_KEY = torch._C.DispatchKey.AutocastCPU


def _op(name: str) -> Any:
    packet, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, packet), overload or "default")


def _is_low(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.dtype in (torch.bfloat16, torch.float16)


def _below_autocast(op: Any, args: tuple, kwargs: dict) -> Any:
    with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_AUTOCAST_KEY)):
        return op(*args, **kwargs)


def _fp32_kernel(op: Any) -> Any:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        def up(x: Any) -> Any:
            return x.float() if _is_low(x) else x

        return _below_autocast(op, tree_map(up, args), tree_map(up, kwargs))
    return kernel


def _set_dtype_kernel(op: Any) -> Any:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        if _is_low(args[0]) and kwargs.get("dtype") is None and "dtype" in _arg_names(op):
            kwargs = {**kwargs, "dtype": torch.float32}
        return _below_autocast(op, args, kwargs)
    return kernel


def _low_kernel(op: Any) -> Any:
    def kernel(*args: Any, **kwargs: Any) -> Any:
        dtype = torch.get_autocast_dtype("cpu")
        def down(x: Any) -> Any:
            return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x

        return _below_autocast(op, tree_map(down, args), tree_map(down, kwargs))
    return kernel


def _arg_names(op: Any) -> set[str]:
    return {a.name for a in op._schema.arguments}


@contextmanager
def cuda_autocast_lists() -> Iterator[None]:
    """Inside: CPU autocast casts like CUDA autocast (its float32 and lower-precision op lists)."""
    lib = torch.library.Library("aten", "IMPL")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "overriding a previously registered kernel" for ops CPU lists too
        for names, make in ((CUDA_FP32_OPS, _fp32_kernel), (CUDA_FP32_SET_DTYPE_OPS, _set_dtype_kernel),
                            (CUDA_LOW_PRECISION_OPS, _low_kernel)):
            for name in names:
                try:
                    op = _op(name)
                except AttributeError:
                    continue
                lib.impl(name, make(op), "AutocastCPU")
    try:
        yield
    finally:
        lib._destroy()


class _FusedRMSNorm(torch.autograd.Function):
    """CUDA's fused RMSNorm: output in the input's dtype; saves the input and a float32 rstd per row."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        rstd = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
        ctx.save_for_backward(x, weight, rstd)
        out = torch.empty_like(x)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:
        x, weight, _ = ctx.saved_tensors
        grad_weight = torch.empty_like(weight) if weight is not None and ctx.needs_input_grad[1] else None
        return torch.empty_like(x), grad_weight, None


def _fused_rms_norm_forward(self: nn.RMSNorm, x: torch.Tensor) -> torch.Tensor:
    eps = self.eps if self.eps is not None else torch.finfo(x.dtype).eps
    weight = self.weight.to(x.dtype) if self.weight is not None else None
    return _FusedRMSNorm.apply(x, weight, eps)


@contextmanager
def fused_rms_norm() -> Iterator[None]:
    """Inside: ``torch.nn.RMSNorm`` allocates like CUDA's fused kernel (values are not computed: fake tensors)."""
    original = nn.RMSNorm.forward
    nn.RMSNorm.forward = _fused_rms_norm_forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.RMSNorm.forward = original  # type: ignore[method-assign]


def _apply_without_swap(self: nn.Module, fn: Any, recurse: bool = True) -> nn.Module:
    """``nn.Module._apply`` for fake tensors: torch swaps fake parameters in place, which fails whenever the
    fake mode holds a weak reference to them; a new Parameter is put in instead (before any optimizer holds one)."""
    if recurse:
        for child in self.children():
            child._apply(fn)
    for key, param in self._parameters.items():
        if param is not None:
            with torch.no_grad():
                applied = fn(param)
            if applied is not param:
                self._parameters[key] = nn.Parameter(applied, requires_grad=param.requires_grad)
    for key, buffer in self._buffers.items():
        if buffer is not None:
            self._buffers[key] = fn(buffer)
    return self


@contextmanager
def fake_module_conversion() -> Iterator[None]:
    """Inside: ``module.to(...)`` works on modules of fake tensors (peft moves each new adapter with it)."""
    original = nn.Module._apply
    nn.Module._apply = _apply_without_swap  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module._apply = original  # type: ignore[method-assign]


@contextmanager
def cuda_behaviour() -> Iterator[None]:
    """CUDA's autocast lists and fused RMSNorm, and ``.to()`` on fake modules, for a step on fake CPU tensors."""
    with cuda_autocast_lists(), fused_rms_norm(), fake_module_conversion():
        yield


def _rounded(self: Any) -> int:
    return math.ceil(self.size * self.element_size / CUDA_ALLOCATION) * CUDA_ALLOCATION


class PlannerMemTracker(MemTracker):
    """``MemTracker`` for planning: CUDA allocation rounding on fake CPU tensors, no grad hooks on frozen
    parameters, and a per-op cost that does not grow with the number of modules."""

    def _track_module_params_and_buffers(self, module: nn.Module, install_grad_hooks: bool = True
                                         ) -> tuple[int, int]:
        def on_grad(grad: torch.Tensor) -> None:
            self._update_and_maybe_create_winfos(grad, _MemRefType.GRAD)

        params = 0
        for param in module.parameters():
            params += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(param, _MemRefType.PARAM))
            if param.grad is not None:
                self._update_and_maybe_create_winfos(param.grad, _MemRefType.GRAD)
            if install_grad_hooks and param.requires_grad and param not in self._param_to_grad_hook_handles:
                self._param_to_grad_hook_handles[param] = (
                    param.register_hook(on_grad),
                    param.register_post_accumulate_grad_hook(lambda p: on_grad(p.grad)),
                )
        buffers = 0
        for buffer in module.buffers():
            buffers += sum(w.mem_consumed for w in self._update_and_maybe_create_winfos(buffer, _MemRefType.BUFFER))
        return params, buffers

    def _update_peak_stats(self, peak_state: _State) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[_mt._TOTAL_KEY]:
                self._peak_mem[dev] = snap[_mt._TOTAL_KEY]
                self._peak_mem_snap[dev] = dict(snap)

    def _pre_fw_hook(self, module: nn.Module, inputs: Any) -> None:
        # A module called again at top level (the next step) starts its stats afresh instead of raising.
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            parents = set(self._mod_tracker.parents) - {self._mod_tracker.get_known_fqn(module)}
            if parents <= {"Global"}:
                self.reset_mod_stats()
        super()._pre_fw_hook(module, inputs)

    def __enter__(self) -> PlannerMemTracker:
        self._calculate_original = _mt._WeakRefInfo._calculate_mem_consumed
        _mt._WeakRefInfo._calculate_mem_consumed = _rounded  # type: ignore[method-assign]
        super().__enter__()
        return self

    def __exit__(self, *args: Any) -> None:
        super().__exit__(*args)
        _mt._WeakRefInfo._calculate_mem_consumed = self._calculate_original  # type: ignore[method-assign]

    def peak_breakdown(self) -> dict[str, int]:
        """Bytes by kind at the peak (Parameter, Buffer, Gradient, Activation, Temp, Optstate, Other, Total)."""
        snaps = list(self.get_tracker_snapshot("peak").values())
        if not snaps:
            return {"Total": 0}
        return {(k.value if isinstance(k, _MemRefType) else str(k)): v for k, v in snaps[0].items()}

    def peak_bytes(self) -> int:
        return max(self._peak_mem.values(), default=0)
