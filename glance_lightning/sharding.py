"""Sharding the frozen base over ranks: Lightning's ``ModelParallelStrategy`` driving PyTorch FSDP2.

The strategy is ``strategy: fsdp2`` (``FSDP2Strategy``, registered in Lightning's ``StrategyRegistry`` when this
module is imported, as ``glance_lightning.families`` does). It is Lightning's ``ModelParallelStrategy`` with every
rank in one data-parallel dimension (no tensor parallelism) and checkpoints that hold only the LoRA weights,
gathered into one file on rank 0 as a single-device run writes them. Why this one and not ``strategy: fsdp``:
Lightning's ``FSDPStrategy`` wraps FSDP1, whose flat parameters mix the frozen bf16 base and the fp32 LoRA
weights badly and which Lightning refuses on a CPU; ``ModelParallelStrategy`` hands the module a device mesh in
``configure_model`` and lets it call ``fully_shard`` (FSDP2), which shards every parameter on its first dimension
as a DTensor. So frozen and trainable, bf16 and fp32 weights share a block, the AdamW state of each LoRA weight
is sharded like the weight, and the same code runs over gloo (CPU, the tests) and NCCL (GPUs): FSDP2 needs only
all-gather, reduce-scatter, all-reduce and broadcast, which gloo has.

What the module does under it (``GlanceModule``): ``configure_model`` shards each repeated transformer block,
then the transformer's remaining modules (``shard_transformer``); both adapters stay trainable for FSDP2's sake
(the inactive one gets no gradient because peft leaves it out of the forward pass, so AdamW skips it); LoRA files
are gathered on every rank (``full_tensors``, a collective) and written by rank 0; chained samples are rendered
sharded (every rank runs the forward passes, rank 0 writes the images). ``check_sharding`` refuses, in one line
and before any model loads, the settings sharding cannot serve.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

from glance_lightning import optimizer_state
from glance_lightning.errors import ConfigError

STRATEGY_NAME = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy(data_parallel_size=<every rank>, tensor_parallel_size=1)`` whose checkpoints hold
    only the trainable (LoRA) weights and their optimizer state, gathered into one file (atomic, like a
    single-device run's) instead of a folder of shards of the whole base."""

    def __init__(self, process_group_backend: str | None = None,
                 timeout: timedelta | None = default_pg_timeout) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False,
                         process_group_backend=process_group_backend, timeout=timeout)

    def setup_environment(self) -> None:
        # every rank shards the base (one data-parallel dimension); the mesh is built from this in the parent
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """What the module's ``state_dict`` keeps (the LoRA weights), gathered on every rank, kept on rank 0 on
        the CPU; the frozen base is never gathered."""
        state = full_tensors(self.lightning_module.state_dict())
        return {k: v.detach().cpu() for k, v in state.items()} if self.is_global_zero else {}

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        """Any world size's checkpoint (one file: the LoRA weights and the optimizer state keyed by name,
        ``glance_lightning.optimizer_state``), each rank keeping its shard of both."""
        from lightning.fabric.strategies.model_parallel import _load_raw_module_state
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        path = Path(self.broadcast(str(checkpoint_path)))
        checkpoint = torch.load(path, mmap=True, map_location="cpu", weights_only=weights_only)
        module = self.lightning_module
        _load_raw_module_state(checkpoint["state_dict"], self.model, strict=module.strict_loading)
        names = [name for name, _ in module.named_parameters()]
        options = StateDictOptions(broadcast_from_rank0=True, full_state_dict=True, strict=module.strict_loading)
        for optimizer, state in zip(self.optimizers, checkpoint.get("optimizer_states", []), strict=False):
            optimizer = getattr(optimizer, "_optimizer", optimizer)  # LightningOptimizer wraps it
            groups = optimizer_state.group_names(module, [g["params"] for g in optimizer.param_groups])
            set_optimizer_state_dict(self.model, optimizer, options=options,
                                     optim_state_dict=optimizer_state.by_name(state, groups, names))
        return checkpoint


StrategyRegistry.register(STRATEGY_NAME, FSDP2Strategy, description="FSDP2: the frozen base sharded over every "
                          "rank per transformer block (glance_lightning.sharding)", override=True)


def is_sharded(strategy: Any) -> bool:
    """Whether the strategy leaves the parameters to the module's ``configure_model`` (FSDP2 via Lightning)."""
    return isinstance(strategy, ModelParallelStrategy)


def shard_transformer(transformer: torch.nn.Module, blocks: Iterable[torch.nn.Module], mesh: Any) -> int:
    """``fully_shard`` each repeated block, then the transformer (its embedders, norms and projections), over the
    data-parallel ``mesh``; returns the number of blocks sharded. Each block's weights are gathered just before
    its forward (and its recomputation) and freed after it."""
    from torch.distributed.fsdp import fully_shard

    count = 0
    for block in blocks:
        fully_shard(block, mesh=mesh)
        count += 1
    fully_shard(transformer, mesh=mesh)
    return count


def full_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every DTensor shard gathered to its full tensor (a collective: every rank must call it, in the same
    order); plain tensors are returned as they are."""
    from torch.distributed.tensor import DTensor

    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in state.items()}


def local_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor reduction's value as a plain tensor (replicated after the reduction); others unchanged."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def on_every_rank(trainer: Any, flag: torch.Tensor | bool) -> bool:
    """Whether ``flag`` holds on every rank: one all-reduce when there are several (every rank must call it);
    so that all ranks take the same branch (stop, save) together."""
    if trainer.world_size == 1:
        return bool(flag)
    value = torch.as_tensor(flag, dtype=torch.float32, device=trainer.strategy.root_device)
    return bool(trainer.strategy.reduce(value, reduce_op="sum") >= trainer.world_size)


def drop_optimizer_state(optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor]) -> None:
    """Forget ``params``' optimizer state. Sharded loading (torch.distributed.checkpoint) first gives every
    parameter AdamW state, by one step at lr 0 with zero gradients, then sets the checkpoint's; a parameter the
    checkpoint has no state for would keep that fake step, which changes its bias correction."""
    for param in params:
        optimizer.state.pop(param, None)


def check_sharding(strategy: Any, module: Any = None) -> None:
    """Refuse, naming the setting, what sharding cannot serve with ``module``'s settings (a ``GlanceModule``),
    before any model is loaded."""
    if not is_sharded(strategy):
        return
    tensor_parallel = getattr(strategy, "_tensor_parallel_size", 1)  # ModelParallelStrategy keeps it private
    if tensor_parallel not in (1, "auto") or (tensor_parallel == "auto" and not isinstance(strategy, FSDP2Strategy)):
        raise ConfigError(
            f"trainer.strategy: {type(strategy).__name__} with tensor_parallel_size={tensor_parallel}: "
            f"glance_lightning shards the base with FSDP2 over data-parallel ranks only; use strategy: {STRATEGY_NAME}")
    if module is None:
        return
    perf, optimizer = module.perf, module.optim_settings
    conflicts = {
        "model.performance.base_quantization": perf.base_quantization not in (None, "none"),
        "model.performance.offload": perf.offload not in (None, "none"),
        "model.performance.compile_blocks": bool(perf.compile_blocks),
        "model.optimizer.name=adamw8bit": optimizer.name == "adamw8bit",
    }
    why = {
        "model.performance.base_quantization": "quantised weights are not DTensors FSDP2 can shard; sharding "
                                               "already divides the base's memory by the number of ranks",
        "model.performance.offload": "block offload moves whole weights between host and device while FSDP2 "
                                     "holds them sharded",
        "model.performance.compile_blocks": "regional compile of sharded blocks is not supported here yet",
        "model.optimizer.name=adamw8bit": "bitsandbytes' 8-bit AdamW cannot update sharded (DTensor) weights; "
                                          "AdamW's state is sharded already",
    }
    for setting, conflict in conflicts.items():
        if conflict:
            raise ConfigError(f"{setting} cannot be used with trainer.strategy: {STRATEGY_NAME} ({why[setting]}); "
                              "turn it off, or train on one device")
    if module.hparams.encode_cache is None:
        raise ConfigError(f"model.encode_cache=null with trainer.strategy: {STRATEGY_NAME}: rank 0 encodes once and "
                          "the other ranks read its encode cache; set model.encode_cache to user or a folder every "
                          "rank of a node can read")
