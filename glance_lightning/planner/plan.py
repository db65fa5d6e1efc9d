"""A fit config -> a plan: predicted peak GPU memory (with its breakdown), encode-stage peak, host RAM per stage,
s/step on a named GPU (the step's op trace priced by ``timing``), and whether it fits.

The config is parsed by fit's own LightningCLI parser (``PlanRequest.from_cli``); the module is instantiated
from it (no model is loaded) with the options that need a GPU or a library at construction (a quantised base,
8-bit AdamW, a dispatcher attention backend, compile) swapped for plain ones, and those options are planned by
``simulate_step`` instead. What is not simulated is stated in ``Plan.notes``.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glance_lightning import sharding
from glance_lightning.errors import ConfigError
from glance_lightning.planner.memory import GIB, StepMemory, StepPlan, simulate_step
from glance_lightning.planner.runtime import GpuSpec
from glance_lightning.registry import FamilySpec

CUDA_CONTEXT_GIB = 0.5  # the CUDA context and cuBLAS/cuDNN workspaces, outside the caching allocator
HOST_BASELINE_GIB = 0.5  # a process with torch and the libraries (BENCHMARKS.md, host memory: 0.4-0.5 GiB)
ENCODE_ACTIVATIONS_GIB = 1.5  # VAE encoder at 1024x1024 in bf16 (scales with pixels) plus the text encoder's
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PlanError(ConfigError):
    """A user error in what was asked (the command line reports it in one line, without a traceback)."""


@dataclass
class PlanRequest:
    """A module instantiated from a fit config plus what the step simulation needs."""

    module: Any
    step: StepPlan
    settings: dict[str, Any]
    gpu: GpuSpec | None
    gpu_memory_gib: float | None
    source: str  # where the architecture came from
    raw: dict[str, Any] = field(default_factory=dict)  # build_request's arguments, for variants (search)


@dataclass
class Plan:
    request: PlanRequest
    memory: StepMemory
    encode_peak_gib: float
    host_gib: dict[str, float]
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.memory.peak / GIB

    @property
    def card_gib(self) -> float | None:
        if self.request.gpu_memory_gib is not None:
            return self.request.gpu_memory_gib
        return self.request.gpu.memory_gib if self.request.gpu is not None else None

    @property
    def fits(self) -> bool | None:
        """Whether the training step fits the card (with the CUDA context)."""
        card = self.card_gib
        return None if card is None else self.peak_gib + CUDA_CONTEXT_GIB <= card

    @property
    def encode_fits(self) -> bool | None:
        """Whether the encode stage fits too; when not, the encode cache can be filled on the CPU first
        (``cache --config ... --trainer.accelerator cpu``) and the fit then loads no text encoder."""
        card = self.card_gib
        return None if card is None else self.encode_peak_gib + CUDA_CONTEXT_GIB <= card

    def as_dict(self) -> dict[str, Any]:
        gpu = self.request.gpu
        return {
            "predicted": True,
            "family": self.request.module.family,
            "settings": self.request.settings,
            "architecture": self.request.source,
            "peak_gib": round(self.peak_gib, 3),
            "peak_bytes": self.memory.peak,
            "breakdown_gib": {k: round(v, 3) for k, v in self.memory.breakdown_gib().items()},
            "encode_peak_gib": round(self.encode_peak_gib, 3),
            "host_ram_gib": {k: round(v, 2) for k, v in self.host_gib.items()},
            "gpu": gpu.name if gpu else None,
            "per_rank": self.request.step.ranks.label() if self.request.step.ranks.world > 1 else None,
            "gpu_memory_gib": self.card_gib,
            "step_s": None if self.memory.step_s is None else float(f"{self.memory.step_s:.4g}"),
            "step_time": None if self.memory.time is None else
            {"parts_s": {k: round(v, 6) for k, v in self.memory.time.parts.items()},
             "kernels": self.memory.time.kernels, "compiled": self.memory.time.compiled,
             "derivation": self.memory.time.derivation()},
            "step_tflop": round(self.memory.flops / 1e12, 1),
            "fits": self.fits,
            "encode_fits": self.encode_fits,
            "cuda_context_gib": CUDA_CONTEXT_GIB,
            "simulation_s": round(self.memory.wall_s, 1),
            "notes": self.notes + self.memory.notes,
        }


def encode_stage_gib(spec: FamilySpec, dtype: str, pixels: int) -> tuple[float, float]:
    """(device peak, encoder weights) of the encode stage, by formula: the text encoders and VAE on the device in
    ``dtype`` plus a modest activation allowance; (0, 0) for a family whose spec gives no ``encoder_params``."""
    if not spec.encoder_params:
        return 0.0, 0.0
    weights = sum(spec.encoder_params.values()) * DTYPE_BYTES.get(dtype, 4) / GIB
    return weights + ENCODE_ACTIVATIONS_GIB * pixels / 1024**2, weights


def host_ram_gib(transformer_gib: float, encoders_gib: float) -> dict[str, float]:
    """Host RAM per fit stage, by formula (the stages load one large component at a time)."""
    return {"encoders_load_and_encode": HOST_BASELINE_GIB + encoders_gib,
            "transformer_load": HOST_BASELINE_GIB + transformer_gib,
            "training": HOST_BASELINE_GIB + 0.5}  # + the caches and Lightning's bookkeeping


def make_plan(request: PlanRequest) -> Plan:
    memory = simulate_step(request.module, request.step)
    offload_notes = apply_offload(memory, request)
    spec = request.module.family_spec
    pixels = request.step.height * request.step.width
    encode, encoders = encode_stage_gib(spec, request.module.dtype_name, pixels)
    tiny = str(request.module.hparams.pretrained_model).startswith("tiny:")
    if tiny:  # the published encoders' sizes say nothing about a tiny model's
        encode, encoders = 0.0, 0.0
    notes = [
        "predicted on fake tensors (no weights, no GPU); time: each kernel of the simulated step priced on the card "
        "(planner/timing.py); the steps measured on an H200 (GLANCE.md section 8) are within 15% (+-11% so far)",
        "encode stage and host RAM are analytic (parameter counts of the published encoders)",
    ]
    if encode == 0.0:
        notes.append("tiny model: encode stage not planned" if tiny else
                     f"family {spec.name} gives no encoder sizes (FamilySpec.encoder_params): encode stage not "
                     "planned")
    ranks = request.step.ranks
    if ranks.world > 1:
        notes.append(f"{ranks.label()}: the step of one rank" + (
            ", FSDP2's own sharding run over a fake process group of "
            f"{ranks.world} ranks (planner/ranks.py); host RAM is per rank" if ranks.sharded else ""))
    elif str((request.raw.get("trainer") or {}).get("strategy") or "").lower() == sharding.STRATEGY_NAME:
        notes.append(f"trainer.strategy {sharding.STRATEGY_NAME} on one device: for a per-rank plan give --devices N")
    bf16_transformer = memory.base / GIB if request.step.quantization == "none" else \
        _bf16_params(request.step.architecture) * 2 / GIB
    if ranks.sharded:  # each rank reads only its shard of the base (shard_loading)
        dtype_bytes = DTYPE_BYTES.get(request.module.dtype_name, 2) if request.step.quantization == "none" else 2
        bf16_transformer = _bf16_params(request.step.architecture) * dtype_bytes / GIB / ranks.world
    host = host_ram_gib(bf16_transformer, encoders)
    if request.settings.get("offload", "none") != "none":  # the offloaded blocks live in pinned host memory
        host["training"] += sum(memory.recomputed_block_bytes) / GIB
    return Plan(request, memory, encode, host, notes + offload_notes)


def offloaded_bytes(block_bytes: list[int], per_group: int) -> int:
    """Bytes that leave the device with block offloading: every recomputed block's frozen weights but the two
    groups in flight (the one computing and the one prefetched) and one more block (autograd's, in backward)."""
    if not block_bytes:
        return 0
    resident = 2 * per_group + 1
    return max(0, sum(block_bytes) - resident * max(block_bytes))


def apply_offload(memory: StepMemory, request: PlanRequest) -> list[str]:
    """``performance.offload: block`` by formula on the simulated step: the recomputed blocks' frozen weights
    are resident only for the groups in flight; each step moves them host->device twice (forward pass and
    recomputation), overlapped with compute when ``offload_stream``."""
    settings = request.settings
    if settings.get("offload", "none") == "none":
        return []
    moved = offloaded_bytes(memory.recomputed_block_bytes, int(settings.get("offload_blocks_per_group", 1)))
    memory.peak -= moved
    memory.base -= moved
    notes = [f"offload=block by formula: {moved / GIB:.2f} GiB of frozen block weights resident only while in flight"]
    if memory.step_s is not None and request.gpu is not None:
        transfer = 2 * sum(memory.recomputed_block_bytes) / (request.gpu.host_link_gbs * 1e9)
        overlapped = bool(settings.get("offload_stream", True))
        hidden = memory.step_s if overlapped else 0.0  # copies on the side stream overlap the compute
        if memory.time is not None:
            memory.time.offload_s = max(0.0, transfer - hidden)
        memory.step_s += max(0.0, transfer - hidden)
        notes.append(f"offload transfers {transfer:.2f} s/step at {request.gpu.host_link_gbs:.0f} GB/s host link"
                     f"{', overlapped with compute' if overlapped else ''}")
    return notes


def _bf16_params(architecture: dict[str, Any]) -> float:
    """Parameter count of the transformer (built on the meta device: no memory)."""
    import torch

    from glance_lightning.planner.memory import build_transformer

    with torch.device("meta"):
        model = build_transformer(architecture, torch.bfloat16)
    return float(sum(p.numel() for p in model.parameters()))


# ------------------------------------------------------------------------------------------- from the config
def find_architecture(spec: FamilySpec, pretrained: str, transformer: str | None,
                      given: str | None) -> tuple[dict[str, Any], str]:
    """The transformer config to plan: ``given`` (a config.json), a local model's ``transformer/config.json``,
    one in the Hugging Face cache (read offline), else the registry's full-size config."""
    if given:
        return _own_class(spec, _read_config(Path(given)), f"--architecture {given}"), given
    for folder in (transformer, pretrained and str(Path(pretrained) / "transformer")):
        if folder and (Path(folder) / "config.json").is_file():
            file = Path(folder) / "config.json"
            return _own_class(spec, _read_config(file), str(file)), str(file)
    cached = _hub_cached_config(pretrained)
    if cached is not None:
        return _own_class(spec, _read_config(cached), str(cached)), str(cached)
    variants = dict(spec.extra.get("architectures", {}))
    for key, arch in variants.items():
        if key in (pretrained or ""):
            return copy.deepcopy(dict(arch)), f"registry ({spec.name}, {key})"
    if spec.architecture is None:
        raise PlanError(f"family {spec.name!r} declares no full-size architecture; give --architecture "
                        "path/to/transformer/config.json")
    return copy.deepcopy(dict(spec.architecture)), f"registry ({spec.name})"


def _own_class(spec: FamilySpec, config: dict[str, Any], where: str) -> dict[str, Any]:
    """``config`` if it is the family's transformer (the class its full-size architecture or pipeline names)."""
    from glance_lightning.models import annotated_transformer

    own = (spec.architecture or {}).get("_class_name") or annotated_transformer(spec)
    if own and config["_class_name"] != own:
        raise PlanError(f"{where}: a {config['_class_name']} config, not {spec.name}'s {own}; give a {spec.name} "
                        f"transformer config, or plan with that model's family (model.class_path)")
    return config


def vae_latent_channels(architecture_source: str, default: int) -> int:
    """The latent channels of the VAE beside a model's ``transformer/config.json`` (its ``vae/config.json``), else
    ``default`` (the published VAEs' 16)."""
    source = Path(architecture_source)
    vae = source.parent.parent / "vae" / "config.json"
    if source.name != "config.json" or source.parent.name != "transformer" or not vae.is_file():
        return default
    try:
        config = json.loads(vae.read_text())
    except (OSError, json.JSONDecodeError):
        return default
    return int(config.get("latent_channels") or config.get("z_dim") or default)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PlanError(f"--architecture {path}: {err}") from None
    if "_class_name" not in config:
        raise PlanError(f"{path}: not a diffusers transformer config (no _class_name)")
    return {k: v for k, v in config.items() if not k.startswith("_") or k == "_class_name"}


def _hub_cached_config(pretrained: str) -> Path | None:
    if not pretrained or pretrained.startswith("tiny:") or Path(pretrained).exists() or "/" not in pretrained:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(pretrained, "transformer/config.json")
    return Path(found) if isinstance(found, str) else None
