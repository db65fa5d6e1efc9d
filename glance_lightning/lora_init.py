"""The LoRA adapters' starting values: a pure function of (run seed, parameter name), whatever device or world size.

peft draws them from the global generator while it adds the adapters, so they depend on everything that used it
before (and are not drawn at all when the base is built on the meta device to be loaded per shard, as
``glance_lightning.shard_loading`` does). Redrawing them here makes a sharded run, a replicated run and a
single-device run start from the same LoRAs. The distributions are peft's: ``gaussian``: A ~ N(0, 1/r^2);
``default``: A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a = sqrt(5)); B = 0 for both. A sharded (DTensor)
weight gets its rows of the same full tensor (``local_rows``).
"""

from __future__ import annotations

import math
import zlib

import torch


def local_rows(param: torch.Tensor) -> slice:
    """The rows of the full tensor a rank holds: all of a plain tensor, and for an FSDP2 (``Shard(0)``) DTensor
    the ``torch.chunk`` rows of its mesh rank."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(param, DTensor):
        return slice(0, param.shape[0] if param.dim() else None)
    (placement,) = param.placements
    if not isinstance(placement, Shard) or placement.dim != 0:
        raise ValueError(f"expected a tensor sharded on its first dimension, got {param.placements}")
    rows, world = param.shape[0], param.device_mesh.size()
    chunk = -(-rows // world)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    return slice(start, start + param.to_local().shape[0])


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.to_local() if isinstance(param, DTensor) else param


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))


def starting_value(name: str, shape: torch.Size, seed: int, init: str) -> torch.Tensor:
    """The full float32 starting value of the LoRA weight ``name`` (``...lora_A.<adapter>.weight``: [r, in])."""
    if ".lora_B." in name:
        return torch.zeros(shape)
    if init == "gaussian":
        return torch.randn(shape, generator=_generator(seed, name)) / shape[0]
    bound = 1.0 / math.sqrt(shape[1])
    return (torch.rand(shape, generator=_generator(seed, name)) * 2 - 1) * bound


@torch.no_grad()
def reset_loras(module: torch.nn.Module, seed: int, init: str) -> int:
    """Set every LoRA weight of ``module`` to its starting value (each rank its rows); weights still on the meta
    device (or fake, the planner's) are left alone. Returns how many were set."""
    from torch._subclasses.fake_tensor import FakeTensor

    count = 0
    for name, param in module.named_parameters():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        local = local_tensor(param)
        if local.is_meta or isinstance(local, FakeTensor):  # materialised later; the planner's fake weights
            continue
        full = starting_value(name.replace("._orig_mod", ""), param.shape, seed, init)
        local.copy_(full[local_rows(param)])
        count += 1
    return count
