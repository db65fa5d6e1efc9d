"""Typed settings groups of a Glance module (what the YAML ``model.init_args`` sections hold)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from glance_lightning.timesteps import Unit


@dataclass
class ScheduleDerivation:
    """Read the Slow/Fast lists off the family's own inference schedule (see ``schedule`` command)."""

    resolution: int = 1024
    num_steps: int = 50
    slow_indices: list[int] = field(default_factory=lambda: [0, 2, 4, 6, 8])
    fast_indices: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 49])


@dataclass
class TimestepSettings:
    """Either both lists (0-1000 timesteps or [0, 1] sigmas) or a derivation; neither means derive at 1024."""

    slow: list[float] | None = None
    fast: list[float] | None = None
    unit: Unit = "auto"
    derive: ScheduleDerivation | None = None


@dataclass
class LoraSettings:
    """One LoRA shape shared by the Slow and the Fast adapter; ``targets`` None means the family default."""

    rank: int = 16
    alpha: float = 64.0
    targets: list[str] | None = None
    init: Literal["gaussian", "default"] = "gaussian"
    dropout: float = 0.0


@dataclass
class OptimizerSettings:
    """AdamW with a constant learning rate after a linear warm-up that restarts for each phase.

    ``name="adamw8bit"`` keeps the moment estimates in 8 bits (bitsandbytes), a quarter of AdamW's state.
    """

    name: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 10
    fused: bool | None = None  # None: the fused CUDA kernel on GPUs, the default implementation elsewhere


BaseQuantization = Literal["none", "int8-weight-only", "float8-weight-only", "float8-dynamic", "nf4"]


@dataclass
class PerformanceSettings:
    """Speed/memory switches of the training step (see ``glance_lightning.performance``)."""

    attention_backend: str = "sdpa"  # sdpa[-flash|-efficient|-math] or a diffusers dispatcher backend
    compile_blocks: bool = False  # regional torch.compile of the repeated transformer blocks
    compile_backend: str = "inductor"
    gradient_checkpointing: bool | float = False  # share of repeated blocks recomputed in backward; true = 1, false = 0
    checkpoint_policy: Literal["full", "save-matmuls"] = "full"
    base_quantization: BaseQuantization = "none"
