"""What to plan, read from a fit config through fit's own LightningCLI parser (nothing is instantiated but the module,
and no model is loaded).

Options that need a GPU or a package at construction are planned rather than built: the module is instantiated with a
bf16 base (``base_quantization`` is then emulated), torch AdamW (8-bit states by formula), SDPA attention (dispatcher
kernels such as flash-attn allocate as SDPA's flash kernel does), no compile (regional compile does not change what is
allocated between blocks; its fused kernels are timed from the same trace) and no offload (accounted for by formula in
``plan``).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from glance_lightning.planner.memory import LATENT_CHANNELS, StepPlan
from glance_lightning.planner.plan import PlanError, PlanRequest, find_architecture, vae_latent_channels
from glance_lightning.planner.ranks import Ranks, ranks_from
from glance_lightning.planner.runtime import GpuSpec, get_gpu
from glance_lightning.registry import family_of_module, load_ref
from glance_lightning.settings import AUTO_DEFAULTS, OPTIMIZER_DEFAULT

PLANNED_PERFORMANCE = ("base_quantization", "offload", "offload_blocks_per_group", "offload_stream",
                       "attention_backend", "compile_blocks")


def _parse(argv: list[str]) -> Any:
    import contextlib
    import io
    import logging

    from glance_lightning import console
    from glance_lightning.trainer_cli import run_lightning_cli

    err = io.StringIO()
    seed_log = logging.getLogger("lightning.fabric.utilities.seed")  # "Seed set to 0": no run is started
    level = seed_log.level
    seed_log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stderr(err), console.quiet_info(True):
            return run_lightning_cli(argv, run=False, instantiate=False).config
    except SystemExit as exit_info:
        lines = [line for line in err.getvalue().splitlines() if "error:" in line] or err.getvalue().splitlines()
        if exit_info.code in (0, None):
            raise
        raise PlanError(lines[-1].split("error:", 1)[-1].strip() if lines else "could not parse the config") \
            from None
    finally:
        seed_log.setLevel(level)


def _check_numbers(gpu_memory: float | None, text_tokens: int | None) -> None:
    if gpu_memory is not None and not (math.isfinite(gpu_memory) and gpu_memory > 0):
        raise PlanError(f"--gpu-memory {gpu_memory:g}: give the card's memory in GiB, a number > 0 (e.g. 24)")
    if text_tokens is not None and text_tokens < 1:
        raise PlanError(f"--text-tokens {text_tokens}: give a number of tokens > 0 (e.g. 512)")


def _check_model_folder(spec: Any, pretrained: str | None) -> None:
    """A local model folder is the family's, and its json files parse (as fit checks before loading it)."""
    from glance_lightning.models import ResolvedModel, check_model_family, check_model_files, is_tiny

    if not pretrained or is_tiny(pretrained) or not (Path(pretrained).expanduser() / "model_index.json").is_file():
        return
    model = ResolvedModel(pretrained, str(Path(pretrained).expanduser()))
    check_model_files(model)
    check_model_family(model, spec)


def _check_combination(perf: dict[str, Any]) -> None:
    """fit's refusals of combinations (offload with a quantised base, offload without checkpointing), before the
    GPU- and package-dependent settings are swapped for planning."""
    from glance_lightning import performance as perf_ops
    from glance_lightning.settings import PerformanceSettings

    check = getattr(perf_ops, "_check_offload", None)
    if check is not None and perf.get("offload", "none") != "none":
        check(PerformanceSettings(**perf))


def request_from_cli(argv: list[str], gpu: str | None, gpu_memory: float | None, text_tokens: int | None,
                     architecture: str | None, ranks: dict[str, Any] | None = None) -> PlanRequest:
    """``ranks``: ``plan``'s --devices/--num-nodes/--strategy (None each where not given: the config's trainer)."""
    config = _parse(argv)
    class_path = config.model.class_path
    cls = load_ref(":".join(class_path.rsplit(".", 1)))
    init = config.model.init_args.as_dict()
    data = config.data.init_args.as_dict() if config.get("data") and config.data.get("init_args") else {}
    trainer = config.trainer.as_dict() if config.get("trainer") else {}
    given = {k: v for k, v in (ranks or {}).items() if v is not None}
    chosen = ranks_from(given.get("devices", trainer.get("devices") if _several(trainer) else 1),
                        given.get("num_nodes", trainer.get("num_nodes") if _several(trainer) else 1),
                        given.get("strategy", trainer.get("strategy") if _several(trainer) else None))
    return build_request(cls, init, data, trainer, gpu, gpu_memory, text_tokens, architecture, chosen)


def _several(trainer: dict[str, Any]) -> bool:
    """Whether the config's trainer runs on several devices with a strategy a per-rank plan knows."""
    strategy = str(trainer.get("strategy") or "").lower()
    return strategy == "fsdp2" or strategy.startswith("ddp")


def build_request(cls: type, init: dict[str, Any], data: dict[str, Any], trainer: dict[str, Any],
                  gpu: str | GpuSpec | None = "h100", gpu_memory: float | None = None, text_tokens: int | None = None,
                  architecture: str | dict[str, Any] | None = None, ranks: Ranks | None = None) -> PlanRequest:
    """A plan request from the model's init args, the data's and the trainer's options (plain dicts); ``ranks``:
    the devices it runs on (one by default)."""
    _check_numbers(gpu_memory, text_tokens)
    ranks = ranks or Ranks()
    raw = {"cls": cls, "init": copy.deepcopy(init), "data": data, "trainer": trainer, "gpu": gpu,
           "gpu_memory": gpu_memory, "text_tokens": text_tokens, "ranks": ranks}
    init = copy.deepcopy(init)
    perf = dict(init.get("performance") or {})
    optimizer = dict(init.get("optimizer") or {})
    for key, default in AUTO_DEFAULTS.items():  # unset switches (performance.auto's to choose) as plain defaults
        if perf.get(key) is None:
            perf[key] = default
    settings = {
        "rank": (init.get("lora") or {}).get("rank", 16),
        "gradient_checkpointing": perf["gradient_checkpointing"],
        "checkpoint_policy": perf["checkpoint_policy"],
        "base_quantization": perf["base_quantization"],
        "optimizer": optimizer.get("name") or OPTIMIZER_DEFAULT,
        "offload": perf["offload"],
        "offload_blocks_per_group": perf.get("offload_blocks_per_group", 1),
        "offload_stream": perf.get("offload_stream", True),
        "compile_blocks": bool(perf["compile_blocks"]),
        "precision": str(trainer.get("precision") or "32-true"),
        "torch_dtype": init.get("torch_dtype", "float32"),
    }
    _check_combination(perf)
    for key in PLANNED_PERFORMANCE:
        perf.pop(key, None)
    perf["auto"] = False
    init["performance"] = perf
    init["optimizer"] = {**optimizer, "name": "adamw", "fused": None}
    resolution = int(data.get("resolution") or 1024)
    init["resolution"] = resolution
    module = cls(**init)
    spec = family_of_module(cls)
    _check_model_folder(spec, init.get("pretrained_model"))
    if isinstance(architecture, dict):
        arch, source = copy.deepcopy(architecture), "given"
    else:
        arch, source = find_architecture(spec, init.get("pretrained_model", ""), init.get("transformer"),
                                         architecture)
    tokens = text_tokens or int(getattr(module, "max_sequence_length", 512))
    settings.update(resolution=resolution, batch=int(data.get("batch_size") or 1), text_tokens=tokens)
    if ranks.world > 1:
        settings.update(devices=ranks.devices, num_nodes=ranks.nodes, strategy=ranks.strategy)
    card = gpu if isinstance(gpu, GpuSpec) else get_gpu(gpu) if gpu else None
    if card is None and gpu_memory is None:
        raise PlanError("give --gpu NAME or --gpu-memory GiB")
    step = StepPlan(
        architecture=arch, height=resolution, width=resolution, batch=settings["batch"], text_tokens=tokens,
        precision=settings["precision"], gradient_clip=trainer.get("gradient_clip_val"),
        quantization=settings["base_quantization"], optimizer=settings["optimizer"], gpu=card,
        latent_channels=vae_latent_channels(source, spec.extra.get("latent_channels", LATENT_CHANNELS)),
        compiled=settings["compile_blocks"], ranks=ranks,
    )
    raw["architecture"] = arch
    return PlanRequest(module, step, settings, card, gpu_memory, source, raw)
