"""The cards the planner knows: memory, dense bf16 tensor-core peak, memory bandwidth, SM count and generation.

What a step costs on one of them is ``planner.timing``'s (from the op trace of the simulated step).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class GpuSpec:
    """A card: usable memory (GiB), dense bf16 tensor-core TFLOP/s (fp32 accumulate), memory bandwidth GB/s,
    streaming multiprocessors, and its generation (which attention kernels it runs well: ``timing``)."""

    name: str
    memory_gib: float
    bf16_tflops: float
    bandwidth_gbs: float
    sms: int
    generation: str
    description: str = ""
    host_link_gbs: float = 25.0  # achieved host->device copy rate (PCIe 4.0 x16 ~25, PCIe 5.0 x16 ~50)
    peer_link_gbs: float = 15.0  # achieved all-gather bandwidth between the cards of one node (NVLink; else PCIe)


GPUS: dict[str, GpuSpec] = {g.name: g for g in (  # memory: nvidia-smi's total (MiB / 1024)
    GpuSpec("h200", 140.4, 989.0, 4800.0, 132, "hopper", "H200 SXM 141 GB", 50.0, 360.0),
    GpuSpec("h100", 79.6, 989.0, 3350.0, 132, "hopper", "H100 SXM 80 GB", 50.0, 360.0),
    GpuSpec("h100-pcie", 79.6, 756.0, 2000.0, 114, "hopper", "H100 PCIe 80 GB", 50.0, 40.0),
    GpuSpec("a100-80", 79.2, 312.0, 2039.0, 108, "ampere", "A100 SXM 80 GB", 25.0, 230.0),
    GpuSpec("a100-40", 39.4, 312.0, 1555.0, 108, "ampere", "A100 40 GB", 25.0, 230.0),
    GpuSpec("l40s", 45.0, 362.0, 864.0, 142, "ada", "L40S 48 GB", 25.0, 20.0),
    GpuSpec("a6000", 48.0, 155.0, 768.0, 84, "ampere", "RTX A6000 48 GB"),
    GpuSpec("5090", 31.8, 209.5, 1792.0, 170, "blackwell", "GeForce RTX 5090 32 GB", 50.0),
    GpuSpec("4090", 24.0, 165.2, 1008.0, 128, "ada", "GeForce RTX 4090 24 GB"),
    GpuSpec("3090", 24.0, 71.0, 936.0, 82, "ampere", "GeForce RTX 3090 24 GB"),
    GpuSpec("4080", 16.0, 97.5, 717.0, 76, "ada", "GeForce RTX 4080 16 GB"),
    GpuSpec("4060ti-16", 16.0, 44.0, 288.0, 34, "ada", "GeForce RTX 4060 Ti 16 GB"),
    GpuSpec("3060", 12.0, 25.5, 360.0, 28, "ampere", "GeForce RTX 3060 12 GB"),
)}

def get_gpu(name: str) -> GpuSpec:
    key = name.lower().replace("rtx", "").replace("_", "-").strip("- ")
    if key not in GPUS:
        from glance_lightning.errors import ConfigError

        raise ConfigError(f"--gpu {name}: unknown GPU; known: {', '.join(GPUS)} (or give --gpu-memory GiB)")
    return GPUS[key]


_NAMES = (("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("a100", "a100"), ("l40s", "l40s"),
          ("a6000", "a6000"), ("5090", "5090"), ("4090", "4090"), ("3090", "3090"), ("4080", "4080"),
          ("4060 ti", "4060ti-16"), ("3060", "3060"))
_BY_GENERATION = {"hopper": "h100", "ampere": "a100-80", "ada": "4090", "blackwell": "5090"}


def detect_gpu(index: int = 0) -> GpuSpec:
    """The CUDA device ``index`` as a card of the table (its own memory and SM count), or, for a card the table
    lacks, its generation's reference scaled by the SM count."""
    import torch

    props = torch.cuda.get_device_properties(index)
    name, memory = props.name.lower(), props.total_memory / 2**30
    for pattern, key in _NAMES:
        if pattern in name:
            key = ("a100-80" if memory > 50 else "a100-40") if key == "a100" else key
            return replace(GPUS[key], memory_gib=memory, sms=props.multi_processor_count, description=props.name)
    major = props.major
    generation = {9: "hopper", 8: "ada" if props.minor == 9 else "ampere"}.get(major, "blackwell" if major >= 10
                                                                                 else "ampere")
    like = GPUS[_BY_GENERATION[generation]]
    scale = props.multi_processor_count / like.sms
    return replace(like, name=props.name, memory_gib=memory, sms=props.multi_processor_count,
                   bf16_tflops=like.bf16_tflops * scale, description=f"{props.name} (rated like the {like.name})")
