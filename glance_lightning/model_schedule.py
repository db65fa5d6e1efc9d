"""The schedule of the model the user loads: its scheduler config and its pipeline's declared sample grid.

Derived Slow/Fast lists come from the loaded model's own ``scheduler/scheduler_config.json`` (and the
``sample_sigmas`` its ``model_index.json`` may declare), not from the copy of the published config in the family's
registry entry: a fine-tune with another shift, or a variant with a fixed grid, trains on its own schedule. The
built-in copy serves only where no model is read (``plan``, ``schedule`` without ``--scheduler-config``, a module
before its model is resolved).

This module owns reading that schedule (``read_model_schedule``), saying how it differs from the built-in one
(``ModelSchedule.differences``), the record kept in the LoRA metadata (``ModelSchedule.as_metadata``) and the line
``sample`` prints when the loaded model would derive other lists than the LoRAs were trained on
(``schedule_notice``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glance_lightning.registry import get_family
from glance_lightning.schedules import (
    ScheduleError,
    check_sample_sigmas,
    derive_timesteps,
    load_scheduler_config,
)

BUILT_IN = "built-in"
MODEL = "model"


@dataclass(frozen=True)
class ModelSchedule:
    """A scheduler config, the pipeline's fixed ``sample_sigmas`` (None: it declares none) and where they came from
    (``"model"``: the loaded model's files; ``"built-in"``: the family's published copy)."""

    config: Mapping[str, Any]
    sample_sigmas: tuple[float, ...] | None = None
    source: str = BUILT_IN

    def differences(self, other: ModelSchedule) -> list[str]:
        """``key: ours vs theirs`` for every setting that differs (``_``-prefixed bookkeeping keys ignored)."""
        mine, theirs = _settings(self), _settings(other)
        return [f"{key} {_short(mine.get(key))} vs {_short(theirs.get(key))}"
                for key in sorted(set(mine) | set(theirs)) if mine.get(key) != theirs.get(key)]

    def derive(self, family: str, **derivation: Any) -> dict[str, list[float]]:
        """The Slow/Fast lists (0-1000) this schedule gives with ``derivation`` (resolution, num_steps, indices)."""
        return derive_timesteps(family, scheduler_config=dict(self.config), sample_sigmas=self.sample_sigmas,
                                **derivation)

    def as_metadata(self) -> dict[str, Any]:
        return {"source": self.source, "config": dict(self.config),
                "sample_sigmas": None if self.sample_sigmas is None else list(self.sample_sigmas)}


def _settings(schedule: ModelSchedule) -> dict[str, Any]:
    """The scheduler's effective settings (diffusers fills in what a config leaves out) and the declared grid."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    effective = FlowMatchEulerDiscreteScheduler.from_config(dict(schedule.config)).config
    settings = {k: v for k, v in effective.items() if not k.startswith("_")}
    if schedule.sample_sigmas is not None:
        settings["sample_sigmas"] = list(schedule.sample_sigmas)
    return settings


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        return f"[{len(value)} values: {value[0]:g} .. {value[-1]:g}]"
    return "unset" if value is None else json.dumps(value)


def builtin_schedule(family: str) -> ModelSchedule:
    """The family's published scheduler config, as copied into its registry entry."""
    return ModelSchedule(get_family(family).scheduler(), None, BUILT_IN)


def read_model_schedule(folder: str | Path, family: str) -> ModelSchedule:
    """The schedule of the diffusers model in ``folder``: its ``scheduler/scheduler_config.json`` and any
    ``sample_sigmas`` in its ``model_index.json``. A folder without a scheduler config keeps the built-in one."""
    folder = Path(folder)
    if not (folder / "scheduler" / "scheduler_config.json").is_file():
        return builtin_schedule(family)
    config = load_scheduler_config(folder)
    return ModelSchedule(config, declared_sample_sigmas(folder), MODEL)


def declared_sample_sigmas(folder: Path) -> tuple[float, ...] | None:
    """The ``sample_sigmas`` a model folder's ``model_index.json`` declares (its pipeline samples that grid)."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        return None
    try:
        declared = json.loads(index_file.read_text(encoding="utf-8")).get("sample_sigmas")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None  # the model check names a broken model_index.json
    if declared is None:
        return None
    try:
        return tuple(check_sample_sigmas(declared))
    except ScheduleError as err:
        raise ScheduleError("sample_sigmas", f"{index_file}: {err.detail}") from None


def schedule_notice(family: str, loaded: ModelSchedule, chain: Mapping[str, Sequence[float]],
                    record: Mapping[str, Any] | None) -> str | None:
    """The line ``sample`` prints when the loaded model's schedule would derive other lists than ``chain`` (the
    lists the LoRAs were trained on), or None. ``record``: the LoRA metadata's ``scheduler`` entry (how the lists
    were derived, and from which schedule), if any."""
    derivation = (record or {}).get("derivation")
    if derivation is None:  # lists given by hand (or files of other tools): only a model unlike its family counts
        changed = loaded.differences(builtin_schedule(family))
        if not changed:
            return None
        derivation = {}
    else:
        trained = ModelSchedule(record.get("config") or {}, _tuple(record.get("sample_sigmas")), MODEL)
        changed = loaded.differences(trained)
    try:
        would = loaded.derive(family, **derivation)
    except ScheduleError as err:
        return f"the loaded model's scheduler ({'; '.join(changed) or 'as trained'}) cannot derive lists: {err}"
    if _same(would, chain):
        return None
    rounded = {phase: [round(t, 4) for t in would[phase]] for phase in ("slow", "fast")}
    why = f" ({'; '.join(changed)})" if changed else ""
    return (f"the loaded model's scheduler{why} would derive slow {rounded['slow']} fast {rounded['fast']}; "
            "sampling uses the lists the LoRAs were trained on (from their metadata)")


def _tuple(values: Sequence[float] | None) -> tuple[float, ...] | None:
    return None if values is None else tuple(float(v) for v in values)


def _same(a: Mapping[str, Sequence[float]], b: Mapping[str, Sequence[float]], tolerance: float = 1e-3) -> bool:
    return all(len(a[p]) == len(b[p]) and all(abs(x - y) <= tolerance for x, y in zip(a[p], b[p], strict=True))
               for p in ("slow", "fast"))
