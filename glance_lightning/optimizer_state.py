"""Optimizer state keyed by parameter name: the checkpoint format every world size reads.

A single-device (or DDP) optimizer's ``state_dict`` keys each parameter by its position in the optimizer's groups;
Lightning's sharded (``ModelParallelStrategy``) checkpoints key it by its index among *all* the module's
parameters, frozen ones included. Read with the other layout, the two mix up parameters (or fail on a shape).
Checkpoints therefore store the state keyed by the parameter's name relative to the LightningModule (what
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict`` calls a full state dict), and each loader
turns it into what it needs: positions for ``torch.optim.Optimizer.load_state_dict``, names for
``set_optimizer_state_dict`` (which then shards it). Checkpoints written before keep loading: positional ones
are recognised by their groups numbering 0..n-1, anything else by int as a module-parameter index.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from glance_lightning.errors import ConfigError

COMPILED = "._orig_mod"  # what torch.compile inserts into parameter names


def canonical(name: str) -> str:
    """A parameter name without the compile wrapper's part, so compiled and eager runs share checkpoints."""
    return name.replace(COMPILED, "")


def group_names(module: torch.nn.Module, groups: Iterable[Iterable[torch.Tensor]]) -> list[list[str]]:
    """Each optimizer group's parameters as names relative to ``module``, in the group's order."""
    names = {id(p): canonical(n) for n, p in module.named_parameters()}
    return [[names[id(p)] for p in params] for params in groups]


def _ordered(groups: Sequence[Sequence[str]]) -> list[str]:
    return [name for group in groups for name in group]


def by_name(state: dict[str, Any], groups: Sequence[Sequence[str]], module_names: Sequence[str]) -> dict[str, Any]:
    """``state`` keyed by parameter name. ``groups``: this run's optimizer groups as names (``group_names``), for a
    positional state; ``module_names``: every parameter name of the module in order, for Lightning's sharded
    (module-index) state. An empty state (another rank's) is returned as it is."""
    if not state or not state.get("param_groups"):
        return state
    saved = _ordered([g["params"] for g in state["param_groups"]])
    if all(isinstance(k, str) for k in saved):
        lookup = {k: canonical(k) for k in saved}
    elif saved == list(range(len(saved))):
        lookup = dict(zip(saved, _ordered(groups), strict=False))
    else:
        lookup = {k: canonical(module_names[k]) for k in saved if 0 <= k < len(module_names)}
    if len(lookup) != len(saved):
        raise ConfigError(f"the checkpoint's optimizer state has {len(saved)} parameters, this run's optimizer "
                          f"{len(_ordered(groups))}: it was written by another model or LoRA shape")
    return {
        "state": {lookup[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [lookup[k] for k in g["params"]]} for g in state["param_groups"]],
    }


def by_position(state: dict[str, Any], groups: Sequence[Sequence[str]]) -> dict[str, Any]:
    """A name-keyed ``state`` keyed by position in this run's optimizer ``groups``, as
    ``torch.optim.Optimizer.load_state_dict`` reads it (positional states are returned as they are)."""
    saved = _ordered([g["params"] for g in state.get("param_groups", [])])
    if not saved or not all(isinstance(k, str) for k in saved):
        return state
    position = {name: i for i, name in enumerate(_ordered(groups))}
    missing = [k for k in saved if k not in position]
    if missing or len(saved) != len(position):
        raise ConfigError(f"the checkpoint's optimizer state does not match this run's LoRA parameters (e.g. "
                          f"{(missing or saved)[0]}): it was written by another model or LoRA shape")
    return {
        "state": {position[k]: v for k, v in state["state"].items()},
        "param_groups": [{**g, "params": [position[k] for k in g["params"]]} for g in state["param_groups"]],
    }
