"""Quantised frozen bases and 8-bit optimizer states, planned without the quantisation libraries' kernels.

torchao and bitsandbytes quantise on real data (bitsandbytes only on a GPU), so on fake tensors each frozen
``nn.Linear`` of the transformer is *emulated*: its weight is replaced by a fake tensor of the library's storage
layout and its forward by an autograd function that allocates what the library allocates:

- ``int8-weight-only`` / ``float8-weight-only`` / ``float8-dynamic`` (torchao): 1 byte per weight, a per-row
  scale (and for int8 an int64 zero point); the forward dequantises to the compute dtype and the backward keeps
  that bf16 copy of each weight whose input needs a gradient (what torchao's subclass does under autograd:
  without checkpointing a quantised FLUX needs about as much memory as a bf16 one). float8-dynamic is planned
  like float8 weight-only.
- ``nf4`` (bitsandbytes ``Params4bit``): half a byte per weight plus one float32 absmax per 64 weights; the
  forward dequantises transiently and the backward dequantises again (``MatMul4Bit`` saves only the packed
  weight).

8-bit AdamW (bitsandbytes ``AdamW8bit``) refuses fake tensors; its states are computed from the simulated AdamW
states by formula: two uint8 states plus one float32 absmax per 256 values each for tensors of at least 4096
elements, float32 states (8 bytes per value) below that (bitsandbytes' ``min_8bit_size``).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TORCHAO = ("int8-weight-only", "float8-weight-only", "float8-dynamic")
QUANTIZED = (*TORCHAO, "nf4")
NF4_BLOCK = 64
BNB_8BIT_BLOCK = 256
BNB_MIN_8BIT_SIZE = 4096


class _QuantisedLinear(torch.autograd.Function):
    """y = x W^T + b with W held quantised; allocates the dequantised W in the compute dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                shape: tuple[int, int], dtype: torch.dtype, keep: bool) -> torch.Tensor:
        weight = _dequantised(packed, shape, dtype)
        keep = keep and ctx.needs_input_grad[0]  # autograd keeps a weight only where the input needs a gradient
        ctx.shape, ctx.dtype, ctx.keep = shape, dtype, keep
        ctx.save_for_backward(weight if keep else packed)
        return F.linear(x.to(dtype), weight, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        (saved,) = ctx.saved_tensors
        weight = saved if ctx.keep else _dequantised(saved, ctx.shape, ctx.dtype)
        grad_x = grad.to(ctx.dtype) @ weight if ctx.needs_input_grad[0] else None
        return grad_x, None, None, None, None, None


def _dequantised(packed: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """The weight in the compute dtype, by an op that reads the packed bytes and writes the full ones (so the
    roofline counts the dequantisation traffic); NF4's two weights per byte are read through a broadcast."""
    if packed.numel() * 2 == shape[0] * shape[1]:
        return packed.expand(-1, 2).to(dtype).view(shape)
    return packed.to(dtype).view(shape)


def _quantised_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    packed = self._planned_quant_0 if self._planned_keep else self.weight  # torchao: data in the first buffer
    return _QuantisedLinear.apply(x, packed, self.bias, self._planned_shape, self._planned_dtype,
                                  self._planned_keep)


def quantised_storage(kind: str, out_features: int, in_features: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """The tensors (shape, dtype) a library stores for one quantised [out, in] weight."""
    numel = out_features * in_features
    if kind == "nf4":
        return [((math.ceil(numel / 2), 1), torch.uint8), ((math.ceil(numel / NF4_BLOCK),), torch.float32)]
    if kind == "int8-weight-only":
        return [((out_features, in_features), torch.int8), ((out_features,), torch.bfloat16),
                ((out_features,), torch.int64)]
    return [((out_features, in_features), torch.float8_e4m3fn), ((out_features, 1), torch.float32)]


def emulate_quantised_base(transformer: nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace every ``nn.Linear`` weight of ``transformer`` (fake tensors) by its quantised layout; returns the
    number of layers. Call before the adapters are added (peft wraps the emulated layer as it wraps the real one)."""
    if kind not in QUANTIZED:
        raise ValueError(f"unknown quantisation {kind!r}; planned: {', '.join(QUANTIZED)}")
    count = 0
    for module in transformer.modules():
        if type(module) is not nn.Linear:
            continue
        out_features, in_features = module.weight.shape
        stored = [torch.empty(shape, dtype=dtype) for shape, dtype in quantised_storage(kind, out_features,
                                                                                        in_features)]
        if kind in TORCHAO:
            # torchao's weight is a tensor subclass that reports the compute dtype (peft then makes the LoRA of the
            # layer in that dtype): a bf16 stand-in of no storage, the quantised data beside it
            module.weight = nn.Parameter(torch.empty((), dtype=compute_dtype).expand(out_features, in_features),
                                         requires_grad=False)
        else:  # bitsandbytes' Params4bit is uint8 (peft keeps the LoRA in float32)
            module.weight = nn.Parameter(stored.pop(0), requires_grad=False)
        for i, extra in enumerate(stored):
            module.register_buffer(f"_planned_quant_{i}", extra)
        module._planned_shape, module._planned_dtype = (out_features, in_features), compute_dtype
        module._planned_keep = kind in TORCHAO
        module.forward = types.MethodType(_quantised_forward, module)
        count += 1
    return count


def adamw8bit_state_bytes(numel: int) -> int:
    """Bytes of bitsandbytes AdamW8bit state for one parameter of ``numel`` values."""
    if numel < BNB_MIN_8BIT_SIZE:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / BNB_8BIT_BLOCK)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer, rounding: int = 512) -> tuple[int, int]:
    """(AdamW bytes as simulated, AdamW8bit bytes by formula) of the optimizer's state tensors (rounded)."""
    simulated, eight_bit = 0, 0
    for param, state in optimizer.state.items():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                simulated += math.ceil(value.untyped_storage().nbytes() / rounding) * rounding
        if state:
            eight_bit += math.ceil(adamw8bit_state_bytes(param.numel()) / rounding) * rounding
    return simulated, eight_bit


def linear_weight_bytes(model: nn.Module, kind: str) -> tuple[int, int]:
    """(bf16 bytes, quantised bytes) of every ``nn.Linear`` weight of ``model`` (a meta or fake build), each
    tensor rounded to 512 bytes as the CUDA allocator does."""
    bf16 = quantised = 0
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        out_features, in_features = module.weight.shape
        bf16 += _round(out_features * in_features * 2)
        if kind in QUANTIZED:
            for shape, dtype in quantised_storage(kind, out_features, in_features):
                quantised += _round(math.prod(shape) * torch.empty((), dtype=dtype, device="meta").element_size())
        else:
            quantised += _round(out_features * in_features * 2)
    return bf16, quantised


def _round(n: int) -> int:
    return math.ceil(n / 512) * 512
