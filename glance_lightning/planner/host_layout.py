"""Data-dependent layout under fake tensors: ``host_layout``.

Some transformers derive their sequence layout from a mask in the conditioning (Qwen-Image 2.x: where the text
encoder's image slots are, expanded with ``repeat_interleave``, located with ``nonzero``, written with boolean
indexing). Fake tensors have no data, so those ops fail under the planner's ``FakeTensorMode``. A family that keeps
such a mask a real host tensor (``host_condition_keys``, made real in ``planned_prompt_embeds``) runs its
transformer call inside ``host_layout``: every function or op whose tensor arguments are all real runs for real (a
layout is a few thousand integers), and a real boolean index becomes its positions before a fake tensor is indexed
with it; everything else stays fake and is planned as usual.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch._subclasses.fake_tensor import is_fake, unset_fake_temporarily
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["host_layout"]


@contextmanager
def host_layout() -> Iterator[None]:
    """Under the planner's fake tensors: functions and ops of real tensors only run for real, and real boolean
    indices of fake tensors become positions (see the module docstring)."""
    with _RealFunctions(), _RealOps():
        yield


def _all_real(args: Any, kwargs: dict | None) -> bool:
    tensors = [x for x in pytree.tree_leaves((args, kwargs or {})) if isinstance(x, torch.Tensor)]
    return bool(tensors) and not any(is_fake(t) for t in tensors)


class _RealFunctions(TorchFunctionMode):
    """torch functions of real tensors (and Python scalars) run for real."""

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if _all_real(args, kwargs):
            with unset_fake_temporarily():
                return func(*args, **(kwargs or {}))
        return func(*args, **(kwargs or {}))


class _RealOps(TorchDispatchMode):
    """The same for the ops a mixed function decomposes into; real boolean indices of fake tensors as positions."""

    _INDEXING = (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default, torch.ops.aten.index_put_.default,
                 torch.ops.aten._index_put_impl_.default)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if _all_real(args, kwargs):
            with unset_fake_temporarily():
                return func(*args, **(kwargs or {}))
        if func in self._INDEXING:
            args = (args[0], _positions(args[1]), *args[2:])
        return func(*args, **(kwargs or {}))


def _positions(indices: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
    """Real boolean indices -> their positions (one long index per masked dimension), as indexing means them."""
    out: list[torch.Tensor | None] = []
    for index in indices:
        if index is not None and index.dtype == torch.bool and not is_fake(index):
            with unset_fake_temporarily():
                out.extend(index.nonzero(as_tuple=True))
        else:
            out.append(index)
    return out
