"""Typed settings groups of a Glance module (what the YAML ``model.init_args`` sections hold)."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from jsonargparse.typing import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)

from glance_lightning.errors import ConfigError, explain_restriction
from glance_lightning.timesteps import GlanceTimesteps, Unit

if typing.TYPE_CHECKING:
    from glance_lightning.model_schedule import ModelSchedule

# [0, 1): a probability that must leave some steps to the real value (caption and LoRA dropout).
Probability = restricted_number_type("Probability", float, [(">=", 0), ("<", 1)])

DEFAULT_RESOLUTION = 1024  # what the official lists were derived at (4096 image tokens)


@dataclass
class ScheduleDerivation:
    """Read the Slow/Fast lists off the loaded model's own inference schedule (see ``schedule`` command)."""

    resolution: PositiveInt | None = None  # None: the training resolution (model.resolution), else 1024
    num_steps: PositiveInt | None = None  # None: 50, or the length of the grid the model's pipeline declares
    slow_indices: list[int] = field(default_factory=lambda: [0, 2, 4, 6, 8])
    fast_indices: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 49])

    def __post_init__(self) -> None:
        check_restricted_fields(self, "model.timesteps.derive")


@dataclass
class TimestepSettings:
    """Either both lists (0-1000 timesteps or [0, 1] sigmas) or a derivation; neither means derive at 1024."""

    slow: list[float] | None = None
    fast: list[float] | None = None
    unit: Unit = "auto"
    derive: ScheduleDerivation | None = None

    @property
    def derived(self) -> bool:
        """Whether the lists are read off a schedule (not given)."""
        return self.slow is None and self.fast is None

    def derivation(self, resolution: int | None = None) -> dict[str, Any]:
        """The derivation's arguments (``schedules.derive_timesteps``): resolution, num_steps, indices."""
        derivation = dataclasses.asdict(self.derive or ScheduleDerivation())
        derivation["resolution"] = derivation["resolution"] or resolution or DEFAULT_RESOLUTION
        return derivation

    def resolve(self, family: str, resolution: int | None = None, schedule: ModelSchedule | None = None
                ) -> GlanceTimesteps:
        """The validated lists: as given, or read off ``schedule`` (default: ``family``'s built-in one) at
        ``derive.resolution``, else the training ``resolution``, else 1024."""
        if (self.slow is None) != (self.fast is None):
            raise ConfigError("model.timesteps: give both `slow` and `fast` lists, or neither to derive them")
        if self.slow is not None and self.derive is not None:
            raise ConfigError("model.timesteps: give lists or `derive`, not both")
        if self.slow is not None:
            return GlanceTimesteps.from_lists(self.slow, self.fast, self.unit)
        from glance_lightning.model_schedule import builtin_schedule
        from glance_lightning.schedules import ScheduleError

        schedule = schedule or builtin_schedule(family)
        try:
            lists = schedule.derive(family, **self.derivation(resolution))
        except ScheduleError as err:
            grid = schedule.sample_sigmas
            if grid is None or not {"slow_indices", "fast_indices", "num_steps"} & set(err.settings):
                raise
            raise ConfigError(
                f"model.timesteps.derive: {err.detail}. The model's pipeline declares a fixed {len(grid)}-step "
                f"sample_sigmas grid (model_index.json): set model.timesteps.derive.slow_indices and fast_indices "
                f"within 0..{len(grid) - 1} (e.g. slow [0, 1], fast [{len(grid) // 2}, {len(grid) - 1}]), or give "
                "the lists (model.timesteps.slow/fast)") from None
        return GlanceTimesteps.from_lists(lists["slow"], lists["fast"], "timesteps")


@dataclass
class LoraSettings:
    """One LoRA shape shared by the Slow and the Fast adapter; ``targets`` None means the family default."""

    rank: PositiveInt = 16
    alpha: PositiveFloat = 64.0
    targets: list[str] | None = None
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: Probability = 0.0

    def __post_init__(self) -> None:
        check_restricted_fields(self, "model.lora")
        if self.targets is not None and (not self.targets or not all(isinstance(t, str) and t for t in self.targets)):
            raise ConfigError(f"model.lora.targets={self.targets!r}: give module names such as [to_q, to_k, to_v], "
                              "or leave it unset for the family's default")


@dataclass
class OptimizerSettings:
    """AdamW with a constant learning rate after a linear warm-up that restarts for each phase.

    ``name="adamw8bit"`` keeps the moment estimates in 8 bits (bitsandbytes), a quarter of AdamW's state; with
    ``weight_decay=0`` it is bitsandbytes' Adam8bit, the official Qwen-Image optimizer (the two differ only in how
    weight decay is applied). ``warmup_steps=0`` is no warm-up, what the official runs do: their
    ``get_scheduler("constant", num_warmup_steps=10)`` ignores the warm-up.
    """

    name: Literal["adamw", "adamw8bit"] | None = None  # None: AdamW, or chosen by performance.auto
    lr: PositiveFloat = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.01
    eps: PositiveFloat = 1e-8
    warmup_steps: NonNegativeInt = 10  # per phase; 0: the full lr from the first step (the official runs)
    fused: bool | None = None  # None: the fused CUDA kernel on GPUs, the default implementation elsewhere

    def __post_init__(self) -> None:
        check_restricted_fields(self, "model.optimizer")
        if len(self.betas) != 2 or not all(0.0 <= float(b) < 1.0 for b in self.betas):
            raise ConfigError(f"model.optimizer.betas={list(self.betas)}: give two numbers in [0, 1), "
                              "e.g. [0.9, 0.999]")


BaseQuantization = Literal["none", "int8-weight-only", "float8-weight-only", "float8-dynamic", "nf4"]
Offload = Literal["none", "block"]


@dataclass
class PerformanceSettings:
    """Speed/memory switches of the training step (see ``glance_lightning.performance``). The five that ``auto``
    chooses (with ``model.optimizer.name``) default to None: unset, then their plain value (``AUTO_DEFAULTS``)."""

    auto: bool = False
    """Choose, on the card the fit runs on, the fastest combination of the unset switches (compile_blocks,
    gradient_checkpointing and checkpoint_policy, base_quantization, offload, model.optimizer.name) that the planner
    predicts to fit, and say what was picked; a switch given explicitly always wins (``glance_lightning.auto``)."""
    attention_backend: str = "sdpa"  # sdpa[-flash|-efficient|-math] or a diffusers dispatcher backend
    compile_blocks: bool | None = None  # regional torch.compile of the repeated transformer blocks
    compile_backend: str = "inductor"
    gradient_checkpointing: bool | float | None = None  # share of blocks recomputed in backward; true = 1, false = 0
    checkpoint_policy: Literal["full", "save-matmuls"] | None = None
    base_quantization: BaseQuantization | None = None
    offload: Offload | None = None
    """``block``: the frozen base weights of the recomputed blocks (``gradient_checkpointing`` > 0, which it needs)
    live in host memory (pinned) and visit the device one group at a time, in the forward pass and in the backward
    pass's recomputation (``glance_lightning.offload``). On the device stay: every module outside the repeated
    blocks (embeddings, final norm and projection), the blocks that are not recomputed, all LoRA parameters with
    their gradients and optimizer state, and the frozen weights of at most two groups of recomputed blocks with
    ``offload_stream`` (the one computing, the next one being prefetched), one without. Host memory holds every
    offloaded weight once, pinned. Refused before loading with gradient_checkpointing=0, compile_blocks or a
    quantised base; on a CPU it runs, but host and device are one and nothing moves."""
    offload_blocks_per_group: PositiveInt = 1
    """Recomputed blocks moved together per transfer (one group); fewer, larger transfers for more device memory."""
    offload_stream: bool = True
    """Copy the next group on a side CUDA stream while the current one computes (prefetch); false: each group is
    copied when first needed and copied back to the host after use (diffusers' synchronous path)."""


AUTO_DEFAULTS = {"compile_blocks": False, "gradient_checkpointing": False, "checkpoint_policy": "full",
                 "base_quantization": "none", "offload": "none"}
OPTIMIZER_DEFAULT = "adamw"


def unset_switches(perf: PerformanceSettings, optimizer: OptimizerSettings) -> list[str]:
    """The switches left unset (None): what ``performance.auto`` may choose."""
    unset = [k for k in AUTO_DEFAULTS if getattr(perf, k) is None]
    return unset + (["optimizer"] if optimizer.name is None else [])


def with_defaults(perf: PerformanceSettings, optimizer: OptimizerSettings,
                  chosen: dict[str, Any] | None = None) -> tuple[PerformanceSettings, OptimizerSettings]:
    """Unset switches filled from ``chosen`` (``performance.auto``'s pick), else their plain defaults."""
    chosen = chosen or {}
    filled = {k: chosen.get(k, v) for k, v in AUTO_DEFAULTS.items() if getattr(perf, k) is None}
    name = optimizer.name if optimizer.name is not None else chosen.get("optimizer", OPTIMIZER_DEFAULT)
    return dataclasses.replace(perf, **filled), dataclasses.replace(optimizer, name=name)


def plain_data(value: Any) -> Any:
    """Dataclasses as dicts and the command line's restricted numbers as plain int/float, recursively: what
    checkpoints hold, so that they load with ``torch.load(weights_only=True)``."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(plain_data(v) for v in value)
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return value


def coerce_settings(kind: type, value: Any) -> Any:
    """A settings dataclass of plain values from None (defaults), a dict (as stored in checkpoints) or an
    instance."""
    value = plain_data(kind() if value is None else value)
    if kind is TimestepSettings and isinstance(value.get("derive"), dict):
        value = {**value, "derive": ScheduleDerivation(**value["derive"])}
    return kind(**value)


def check_restricted_fields(settings: Any, prefix: str) -> None:
    """Every field annotated with a restricted number type (PositiveInt, Probability...) checked as the command line
    checks it, so that Python callers get the same one-line errors."""
    for name, kind in typing.get_type_hints(type(settings)).items():
        value = getattr(settings, name)
        options = [k for k in typing.get_args(kind) if k is not type(None)]
        if len(options) == 1 and value is not None:  # Optional[restricted]: checked when set
            kind = options[0]
        if isinstance(kind, type) and issubclass(kind, (int, float)) and kind not in (int, float, bool):
            checked(kind, value, f"{prefix}.{name}")


def checked(kind: type, value: Any, setting: str) -> Any:
    """``value`` as the restricted number type ``kind`` (the CLI checks it the same way), or an error naming
    the setting; for calls from Python, which bypass the command line's checks."""
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{setting}={value!r}: {explain_restriction(str(err))}") from None


def checked_text_tokens(value: Any, maximum: int) -> int:
    """``model.max_sequence_length``: a whole number of text tokens in 1..``maximum`` (the pipeline's limit)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= maximum:
        raise ConfigError(f"model.max_sequence_length={value!r}: give 1 to {maximum} text tokens (the pipeline's "
                          "limit)")
    return value
