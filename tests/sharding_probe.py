"""Callbacks for the sharded test runs (tests/test_sharding.py): each rank writes, at the end of training, how
many elements of every transformer parameter and of every AdamW state it holds itself, against the full size
(``ShardProbe``); its peak tensor memory over the first steps (``StepMemoryProbe``); a poisoned rank."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


def _sizes(tensor: torch.Tensor) -> list[int]:
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return [local.numel(), tensor.numel()]


class ShardProbe(Callback):
    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer, pl_module) -> None:
        params = {n: [*_sizes(p), p.requires_grad] for n, p in pl_module.transformer.named_parameters()}
        names = {id(p): n for n, p in pl_module.transformer.named_parameters()}
        optimizer = trainer.optimizers[0]
        states = {names[id(p)]: _sizes(state["exp_avg"]) for p, state in optimizer.state.items() if "exp_avg" in state}
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps({"params": params, "adamw": states}))


class PoisonOnRank(Callback):
    """From ``step`` on, rank ``rank``'s velocity prediction is NaN: its loss is not finite, the others' are."""

    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        original = type(pl_module).predict_velocity

        def poisoned(*args, **kwargs):
            return original(pl_module, *args, **kwargs) * float("nan")

        pl_module.predict_velocity = poisoned


class LiveBytes(TorchDispatchMode):
    """An independent count of a rank's tensor memory: the storages of ``existing`` tensors and every storage an op
    creates, each at its current size (FSDP2 frees a gathered weight by resizing its storage to 0), rounded as the
    CUDA allocator rounds (512 B), summed after every op while it lives; ``peak``: the most at once. A DTensor
    counts its local shard."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        for tensor in existing:
            self._add(tensor)
        self.peak = self.live

    @property
    def live(self) -> int:
        return sum(-(-s.nbytes() // 512) * 512 for s in list(self.seen))

    def _add(self, tensor: torch.Tensor) -> None:
        from torch.distributed.tensor import DTensor

        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        self.seen[local.untyped_storage()] = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and not tensor.is_meta:
                self._add(tensor)
        self.peak = max(self.peak, self.live)
        return out


class StepMemoryProbe(Callback):
    """Each rank's peak tensor memory over its first two training steps (``LiveBytes``: the transformer's
    parameters and buffers and the encoded caches, then everything the steps allocate), written to
    ``<folder>/memory-rank<N>.json``: what the per-rank plan predicts."""

    def __init__(self, folder: str, steps: int = 2) -> None:
        self.folder, self.steps, self.count = Path(folder), steps, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0 and self.count is None:
            caches = [*pl_module.latent_cache, *(v for c in pl_module.cond_cache for v in c.values()),
                      *(v for c in pl_module.dropout_cache for v in c.values())]
            existing = [*pl_module.transformer.parameters(), *pl_module.transformer.buffers(), *caches]
            self.count = LiveBytes([t for t in existing if isinstance(t, torch.Tensor)])
            self.start = self.count.live
            self.count.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.count is not None and trainer.global_step == self.steps:
            self.count.__exit__(None, None, None)
            self.folder.mkdir(parents=True, exist_ok=True)
            record = {"peak": self.count.peak, "start": self.start}
            (self.folder / f"memory-rank{trainer.global_rank}.json").write_text(json.dumps(record))
            self.count = None
