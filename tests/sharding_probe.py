"""A callback for the sharded test runs (tests/test_sharding.py): each rank writes, at the end of training, how
many elements of every transformer parameter and of every AdamW state it holds itself, against the full size."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback


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
