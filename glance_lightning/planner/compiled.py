"""What regional compile saves for backward that eager does not: the activations it recomputes instead.

A compiled block's backward is planned by AOTAutograd's min-cut partitioner: it keeps what the costly ops need
(the inputs of matmuls and attention, their outputs) and recomputes the elementwise ops whose outputs only other
elementwise backward formulas read (float32 norm inputs, GELU inputs, the operands of modulation products) inside
the fused backward kernels; eager autograd keeps all of those from the forward to the backward pass.
``ElementwiseSaved`` watches the simulated forward and counts the bytes autograd saves, in the repeated blocks that
are not recomputed (a checkpointed block saves only its inputs either way), that an elementwise op produced and no
matmul or attention kernel reads: the bytes a compiled step does not hold at its peak.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from glance_lightning.planner.trace import ATTENTION_FORWARD, MATMULS

ALLOCATION = 512


class ElementwiseSaved(TorchDispatchMode):
    """Inside: bytes (``saved``) of the distinct storages that autograd saves for backward in ``blocks`` and an
    elementwise op made."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        super().__init__()
        self.saved = 0
        self._made: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # storage -> made by an elementwise op
        self._counted: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # saved storage -> bytes
        self._read_by_costly: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._depth = 0
        self._handles = [h for b in blocks for h in (b.register_forward_pre_hook(self._enter_block),
                                                       b.register_forward_hook(self._leave_block))]
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _enter_block(self, *args: Any) -> None:
        self._depth += 1

    def _leave_block(self, *args: Any) -> None:
        self._depth -= 1

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if self._depth and self._made.get(storage):
            self._counted[storage] = math.ceil(storage.nbytes() / ALLOCATION) * ALLOCATION
        return tensor

    def __enter__(self) -> ElementwiseSaved:
        self._hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *args: Any) -> None:
        self.saved = sum(n for storage, n in self._counted.items() if storage not in self._read_by_costly)
        super().__exit__(*args)
        self._hooks.__exit__(*args)
        for handle in self._handles:
            handle.remove()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if getattr(func, "is_view", False) or func.namespace != "aten":
            return out
        elementwise = func._overloadpacket not in MATMULS and func._overloadpacket not in ATTENTION_FORWARD
        if not elementwise:
            for tensor in pytree.tree_leaves((args, kwargs)):
                if isinstance(tensor, torch.Tensor):
                    self._read_by_costly[tensor.untyped_storage()] = True
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage() not in self._made:
                self._made[tensor.untyped_storage()] = elementwise
        return out
