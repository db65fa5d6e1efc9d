"""Planning one rank of a fit on several devices: ``plan --devices N [--num-nodes M] [--strategy fsdp2|ddp]``.

Sharded (``fsdp2``), the simulated step is the real one on one rank: a fake process group of N x M ranks
(``torch.testing._internal.distributed.fake_pg``: collectives return at once, nothing is sent) gives the device
mesh, and ``glance_lightning.sharding.shard_transformer`` runs FSDP2's own ``fully_shard`` on the fake
transformer, so the rank's shards of the base, LoRAs and AdamW states, the blocks FSDP2 all-gathers (with its
prefetch of the next one) and its copy buffers are all allocated as on a GPU rank. Replicated (``ddp``), each
rank runs the single-device step and keeps DDP's gradient buckets (the LoRA gradients once more).

Time per rank: the step's compute (``planner.timing``, the same kernels on each rank's batch) plus the
communication it cannot hide, by formula: FSDP2 all-gathers every weight twice per step (forward, and backward
after ``reshard_after_forward``) and reduce-scatters the LoRA gradients; each all-gather of a block overlaps the
previous block's compute (prefetch), so what shows is the communication beyond the compute plus one block's
gather per pass. Links: the card's peer link within a node (``GpuSpec.peer_link_gbs``), the network across nodes
(``NETWORK_GBS`` per GPU unless given).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from glance_lightning.errors import ConfigError

NETWORK_GBS = 25.0  # achieved per-GPU bandwidth between nodes (a 200 Gb/s InfiniBand/RoCE NIC per GPU)
STRATEGIES = ("fsdp2", "ddp")


@dataclass(frozen=True)
class Ranks:
    """The devices a fit runs on: per node, nodes, and whether the base is sharded (fsdp2) or replicated (ddp)."""

    devices: int = 1
    nodes: int = 1
    strategy: str = "fsdp2"

    @property
    def world(self) -> int:
        return self.devices * self.nodes

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp2" and self.world > 1

    def label(self) -> str:
        nodes = f" x {self.nodes} nodes" if self.nodes > 1 else ""
        return f"per rank of {self.devices} devices{nodes} ({self.strategy})"


def ranks_from(devices: Any, nodes: Any, strategy: Any) -> Ranks:
    """The ranks a plan is for, from ``plan``'s flags or the config's trainer (``devices`` may be "auto" or a list:
    one device then, unless given)."""
    name = str(strategy or "fsdp2").lower()
    name = "ddp" if name.startswith("ddp") else name
    if name not in STRATEGIES:
        raise ConfigError(f"--strategy {strategy}: plan per rank for one of {', '.join(STRATEGIES)} (fsdp2 shards the "
                          "base, ddp replicates it)")
    count = len(devices) if isinstance(devices, (list, tuple)) else devices
    try:
        count, nodes = int(count) if str(count).lstrip("-").isdigit() else 1, 1 if nodes is None else int(nodes)
    except (TypeError, ValueError):
        raise ConfigError(f"--num-nodes {nodes}: give a whole number of nodes") from None
    if count < 1 or nodes < 1:
        raise ConfigError(f"--devices {devices} --num-nodes {nodes}: give at least one device on one node")
    return Ranks(count, nodes, name)


@contextmanager
def fake_world(world: int) -> Iterator[Any]:
    """A one-dimensional device mesh of ``world`` ranks over a fake process group, this process being rank 0."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise ConfigError("a per-rank plan needs a process of its own: run `plan` outside a distributed run")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)
    try:
        yield init_device_mesh("cpu", (world,))
    finally:
        dist.destroy_process_group()


def shard_for_plan(module: Any, mesh: Any) -> None:
    """Shard the module's (fake) transformer as ``fit`` does under ``strategy: fsdp2``."""
    from glance_lightning import performance as perf_ops
    from glance_lightning import sharding

    blocks = perf_ops.repeated_blocks(module.transformer, module.repeated_blocks)
    sharding.shard_transformer(module.transformer, blocks, mesh)
    module.sharded = True


def full_bytes(module: torch.nn.Module) -> tuple[int, int]:
    """(all weights, LoRA weights) of ``module`` unsharded, in bytes (a DTensor counts its global shape)."""
    total = lora = 0
    for name, param in module.named_parameters():
        size = param.numel() * param.element_size()
        total += size
        lora += size if "lora_" in name else 0
    return total, lora


def link_gbs(gpu: Any, ranks: Ranks, network_gbs: float = NETWORK_GBS) -> float:
    """The slowest link a collective crosses: the network once there are several nodes, else the peer link."""
    peer = float(getattr(gpu, "peer_link_gbs", 20.0))
    return min(peer, network_gbs) if ranks.nodes > 1 else peer


def communication_s(weights: int, lora: int, blocks: int, ranks: Ranks, gpu: Any, compute_s: float,
                    network_gbs: float = NETWORK_GBS) -> tuple[float, str]:
    """Seconds per step of communication not hidden behind ``compute_s``, and how they were derived."""
    if ranks.world == 1:
        return 0.0, ""
    share = (ranks.world - 1) / ranks.world
    rate = link_gbs(gpu, ranks, network_gbs) * 1e9
    if ranks.sharded:
        gathered = 2 * weights * share / rate  # every weight all-gathered twice: forward and backward
        total = gathered + 2 * lora * share / rate  # and the fp32 LoRA gradients reduce-scattered
        exposed = max(0.0, total - compute_s) + gathered / max(blocks, 1)
        return exposed, (f"FSDP2 all-gathers {2 * weights * share / 1e9:.2f} GB per step at {rate / 1e9:.0f} GB/s "
                         f"({total:.3f} s with the gradients), overlapped with compute but for one block per "
                         f"pass: +{exposed:.3f} s")
    total = 2 * lora * share / rate  # the ring all-reduce of the LoRA gradients
    return total, (f"DDP all-reduces {2 * lora * share / 1e9:.3f} GB of LoRA gradients per step at "
                   f"{rate / 1e9:.0f} GB/s: +{total:.3f} s")
