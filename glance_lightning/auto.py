"""``model.performance.auto``: on the card a fit runs on, the fastest performance switches the planner predicts to
fit, chosen in ``setup`` before the transformer is loaded. Fidelity comes first: a quantised base (or 8-bit AdamW
states) only where no more exact setting fits, and the line says when a less exact one would be clearly faster
and which setting chooses it (``search.fidelity``).

The switches left unset (None) are chosen; those given explicitly are kept (``settings.unset_switches``). What this
machine cannot run is left out: on a GPU, compile needs triton, int8 bases torchao, NF4 and 8-bit AdamW
bitsandbytes; under ``strategy: fsdp2`` only checkpointing is chosen (``sharding.check_sharding``); on a CPU nothing
is searched and the plain defaults apply. ``plan`` on a config with ``auto`` shows what a fit on ``--gpu`` would
pick. The planner's search simulates three steps of the model's own architecture on fake tensors (about 15 s
each at full size on a CPU core, at once where the machine has cores to spare: ``planner.anchors``), and the pick
itself only when it is near the card's limit; its anchors (peaks and op traces, which do not depend on the card)
are cached under ``$GLANCE_LIGHTNING_CACHE/plans``, so a later fit of the same model and settings chooses in well
under a second, on any card. ``plan`` on an auto config reads and fills the same cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from glance_lightning import console
from glance_lightning.errors import ConfigError
from glance_lightning.settings import AUTO_DEFAULTS, plain_data, with_defaults

PLANNER_FILES = ("memory.py", "trace.py", "timing.py", "compiled.py", "quant.py", "fake.py", "anchors.py", "search.py",
                 "plan.py", "request.py")


def machine_allows(device_type: str, sharded: bool) -> dict[str, tuple[Any, ...]]:
    """The values of each switch this machine can run (``search.Constraints.allowed``)."""
    if device_type != "cuda":
        return {"compile_blocks": (False,), "base_quantization": ("none",), "optimizer": ("adamw",),
                "offload": ("none",)}
    has = {name: importlib.util.find_spec(name) is not None for name in ("triton", "torchao", "bitsandbytes")}
    quants = ("none",) + (("int8-weight-only",) if has["torchao"] else ()) + (("nf4",) if has["bitsandbytes"] else ())
    allowed = {"compile_blocks": (False, True) if has["triton"] else (False,), "base_quantization": quants,
               "optimizer": ("adamw", "adamw8bit") if has["bitsandbytes"] else ("adamw",),
               "offload": ("none", "block")}
    if sharded:
        allowed.update(compile_blocks=(False,), base_quantization=("none",), optimizer=("adamw",), offload=("none",))
    return allowed


def fixed_switches(perf: dict[str, Any], optimizer: dict[str, Any]) -> dict[str, Any]:
    """The switches the user gave (``search.Constraints.fixed``), from ``model.performance`` and
    ``model.optimizer`` as plain dicts (unset switches are None or absent)."""
    fixed = {k: perf[k] for k in AUTO_DEFAULTS if perf.get(k) is not None}
    if optimizer.get("name") is not None:
        fixed["optimizer"] = optimizer["name"]
    return fixed


def choose(module: Any, trainer: Any) -> str:
    """Fill ``module``'s unset switches for the device it trains on; returns the one line said about it."""
    perf, optimizer = module.perf, module.optim_settings
    device = trainer.strategy.root_device
    if device.type != "cuda":
        module.perf, module.optim_settings = with_defaults(perf, optimizer)
        return (f"glance_lightning: performance auto on the {device.type.upper()}: nothing to choose (compile, "
                "quantised bases, 8-bit states and offload are for GPUs); the plain settings")
    from glance_lightning import sharding
    from glance_lightning.planner.runtime import detect_gpu
    from glance_lightning.planner.search import Constraints

    card = detect_gpu(device.index or 0)
    started = time.perf_counter()
    request = _request(module, trainer, card)
    constraints = Constraints(fixed_switches(asdict(perf), asdict(optimizer)),
                              machine_allows("cuda", sharding.is_sharded(trainer.strategy)))
    from glance_lightning.planner.anchors import available_cpus

    ranks_here = max(1, int(getattr(trainer, "num_devices", 1) or 1))  # each rank of this node plans too
    best, cached = cached_pick(request, constraints, card.memory_gib, max(1, available_cpus() // ranks_here))
    if best is None:
        raise ConfigError(f"model.performance.auto: no combination of the switches left unset is predicted to fit "
                          f"the {card.description or card.name} ({card.memory_gib:.0f} GiB); lower "
                          "data.resolution or model.lora.rank, or see python -m glance_lightning plan --search")
    module.perf, module.optim_settings = with_defaults(perf, optimizer, best.switches())
    how = "planned before, cached" if cached else f"planned in {time.perf_counter() - started:.0f} s, cached"
    derived = "simulated" if best.simulated else "interpolated"
    return (f"glance_lightning: performance auto on the {card.description or card.name} ({card.memory_gib:.0f} GiB): "
            f"{best.label()}, predicted peak {best.peak_gib:.1f} GiB, {best.step_s:.2f} s/step ({derived}; {how})"
            + (f"; {best.faster}" if best.faster else ""))


def planned_pick(request: Any) -> tuple[Any, bool]:
    """What a fit of ``request``'s config would pick on its card, every library assumed present (``plan`` on an
    auto config): the ``search.Candidate`` (None when nothing fits) and whether it came from the cache."""
    from glance_lightning.planner.search import Constraints

    init = request.raw["init"]
    constraints = Constraints(fixed_switches(init.get("performance") or {}, init.get("optimizer") or {}))
    card_gib = request.gpu_memory_gib or (request.gpu.memory_gib if request.gpu else 0.0)
    with console.quiet_info(True):
        return cached_pick(request, constraints, card_gib)


def _request(module: Any, trainer: Any, card: Any) -> Any:
    from glance_lightning.planner.plan import find_architecture
    from glance_lightning.planner.request import build_request

    init = plain_data(dict(module.hparams))
    init["performance"] = {**(init.get("performance") or {}), "auto": False}
    resolved = module.resolve_model()
    architecture, _ = find_architecture(module.family_spec, resolved.path, module.transformer_override, None)
    datamodule = getattr(trainer, "datamodule", None)
    data = {"resolution": getattr(datamodule, "resolution", None) or init.get("resolution") or 1024,
            "batch_size": getattr(datamodule, "batch_size", 1)}
    settings = {"precision": str(trainer.precision), "gradient_clip_val": trainer.gradient_clip_val}
    with console.quiet_info(True):
        return build_request(type(module), init, data, settings, card, architecture=architecture)


def _cache_key(request: Any) -> str:
    import glance_lightning

    planner = Path(__file__).parent / "planner"
    code = hashlib.sha256(b"".join((planner / name).read_bytes() for name in PLANNER_FILES)).hexdigest()
    step = request.step
    identity = {"module": f"{type(request.module).__module__}.{type(request.module).__qualname__}",
                "architecture": step.architecture, "resolution": [step.height, step.width], "batch": step.batch,
                "text_tokens": step.text_tokens, "precision": step.precision, "clip": step.gradient_clip,
                "latent_channels": step.latent_channels, "lora": _lora_identity(request.raw["init"].get("lora")),
                "ranks": [step.ranks.devices, step.ranks.nodes, step.ranks.strategy],
                "dtype": request.settings["torch_dtype"], "version": glance_lightning.__version__, "code": code}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _lora_identity(lora: Any) -> dict[str, Any]:
    """The LoRA settings with their defaults filled in and numbers as floats: a fit's hparams (as given) and
    ``plan``'s parsed config (defaults filled) of the same LoRA give the same key."""
    from glance_lightning.settings import LoraSettings, coerce_settings

    settings = asdict(coerce_settings(LoraSettings, lora))
    return {**settings, "alpha": float(settings["alpha"]), "dropout": float(settings["dropout"])}


def cached_pick(request: Any, constraints: Any, card_gib: float, cpus: int | None = None) -> tuple[Any, bool]:
    """``search.pick`` for ``request`` on a ``card_gib`` card, from the cache (the pick per card and constraints,
    and the search's anchors, which serve every card) or computed and written there; ``cpus``: how many the
    anchors' simulation may use (default: this process's). Shared by fit and ``plan``: a ``plan`` of an auto
    config fills the cache a later fit of it reads (and the other way round)."""
    from glance_lightning.planner import search
    from glance_lightning.planner.anchors import anchors_from_dict, anchors_to_dict

    key = _cache_key(request)
    folder = _cache_folder()
    gpu = getattr(request.gpu, "name", None)
    choice = hashlib.sha256(json.dumps([round(card_gib, 1), constraints.fixed, constraints.allowed, gpu],
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    try:  # a cache entry that does not read back (another version, a torn file) is planned again
        known = _read(folder / f"{key}-{choice}.pick.json")
        if known is not None:
            return (search.Candidate(**known) if known else None), True
        anchors = _read(folder / f"{key}.json")
        anchors = anchors_from_dict(anchors) if anchors is not None else None
    except (KeyError, TypeError, ValueError, AttributeError):
        anchors = None
    if anchors is None:
        console.info(f"performance auto: planning the switches for a {card_gib:.0f} GiB card on fake tensors (the "
                     "first time for this model and these settings: three steps of 15 s to 2 minutes each on a CPU "
                     "core, run at once with cores to spare; cached after)")
        with console.quiet_info(True):
            anchors = search.simulate_anchors(request, cpus)
        _write(folder / f"{key}.json", anchors_to_dict(anchors))
    with console.quiet_info(True):
        best = search.pick(request, anchors, constraints, card_gib)
    _write(folder / f"{key}-{choice}.pick.json", asdict(best) if best is not None else {})
    return best, False


def _cache_folder() -> Path:
    from glance_lightning.models import cache_dir

    return cache_dir() / "plans"


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, data: Any) -> None:
    from glance_lightning import atomic

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(data))
    except OSError:
        pass  # an unwritable cache costs the next fit the planning again, nothing else
