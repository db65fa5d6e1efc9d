"""Timestep lists: parsing (0-1000 timesteps or [0, 1] sigmas) and validation.

This module owns the one place where a configured Slow/Fast list becomes the exact sigmas that training
draws from (``glance_lightning.draws``) and that the sampling plans (``glance_lightning.sampling``) step
through. Lists are used exactly as given: no shift, no density, no loss weighting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from glance_lightning.errors import ConfigError

Unit = Literal["auto", "timesteps", "sigmas"]
NUM_TRAIN_TIMESTEPS = 1000


class TimestepListError(ConfigError):
    """A configured timestep list is unusable; the message names the setting and the fix."""


def detect_unit(values: Sequence[float]) -> Literal["timesteps", "sigmas"]:
    """A list whose entries all lie in [0, 1] is read as sigmas, anything larger as 0-1000 timesteps."""
    return "sigmas" if all(0.0 <= float(v) <= 1.0 for v in values) else "timesteps"


def to_sigmas(values: Sequence[float], unit: Unit = "auto", name: str = "timesteps") -> tuple[float, ...]:
    """Validate one list and return it as sigmas in (0, 1], strictly descending."""
    values = [float(v) for v in values]
    if not values:
        raise TimestepListError(f"{name}: the list is empty; give at least one timestep (0-1000) or sigma (0-1]")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise TimestepListError(f"{name}: non-finite entries {bad}; every entry must be a real number")
    understood = detect_unit(values) if unit == "auto" else unit
    if understood not in ("timesteps", "sigmas"):
        raise TimestepListError(f"{name}: unit must be 'auto', 'timesteps' or 'sigmas', got {unit!r}")
    top = NUM_TRAIN_TIMESTEPS if understood == "timesteps" else 1.0
    out_of_range = [v for v in values if not 0.0 < v <= top]
    if out_of_range:
        raise TimestepListError(
            f"{name}: entries {out_of_range} are outside (0, {top:g}] for a list of {understood}; "
            f"use 0-1000 timesteps or [0, 1] sigmas (0 itself is the end of sampling, not a training step)"
        )
    if any(b >= a for a, b in zip(values, values[1:])):
        raise TimestepListError(f"{name}: {values} must be strictly descending (noisiest first)")
    return tuple(v / top for v in values)


@dataclass(frozen=True)
class GlanceTimesteps:
    """The validated Slow and Fast lists, as sigmas, and the unit they were understood in."""

    slow: tuple[float, ...]
    fast: tuple[float, ...]
    unit: Literal["timesteps", "sigmas"]

    @classmethod
    def from_lists(cls, slow: Sequence[float], fast: Sequence[float], unit: Unit = "auto") -> GlanceTimesteps:
        if unit == "auto":
            finite = len(slow) and len(fast) and all(math.isfinite(float(v)) for v in [*slow, *fast])
            units = {detect_unit(slow), detect_unit(fast)} if finite else set()
            if len(units) > 1:
                raise TimestepListError(
                    f"model.timesteps: slow={list(slow)} reads as {detect_unit(slow)} but fast={list(fast)} as "
                    f"{detect_unit(fast)}; give both lists in one unit (0-1000 timesteps or [0, 1] sigmas)"
                )
            understood = "sigmas" if detect_unit(list(slow) + list(fast)) == "sigmas" else "timesteps"
        else:
            understood = unit
        slow_s = to_sigmas(slow, understood, "timesteps.slow")
        fast_s = to_sigmas(fast, understood, "timesteps.fast")
        if min(slow_s) <= max(fast_s):
            raise TimestepListError(
                f"timesteps: every Slow entry must be above every Fast entry, but min(slow)={min(slow_s):.4f} "
                f"<= max(fast)={max(fast_s):.4f} (as sigmas); the Slow LoRA owns the noisiest steps"
            )
        return cls(slow_s, fast_s, understood)

    def phase(self, name: str) -> tuple[float, ...]:
        if name not in ("slow", "fast"):
            raise ValueError(f"phase must be 'slow' or 'fast', got {name!r}")
        return self.slow if name == "slow" else self.fast

    def as_timesteps(self) -> dict[str, list[float]]:
        return {
            "slow": [s * NUM_TRAIN_TIMESTEPS for s in self.slow],
            "fast": [s * NUM_TRAIN_TIMESTEPS for s in self.fast],
        }

    def describe(self) -> str:
        lists = self.as_timesteps()
        return (
            f"timesteps understood as {self.unit}; slow={[round(t, 4) for t in lists['slow']]}, "
            f"fast={[round(t, 4) for t in lists['fast']]} (0-1000)"
        )

