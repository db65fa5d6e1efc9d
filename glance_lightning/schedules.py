"""Glance timestep lists derived from a base model's own inference schedule.

This module owns the schedule arithmetic of the project (GLANCE.md sections 2 and 3):

- ``full_schedule_sigmas``: the shifted sigma table (``num_steps`` entries plus the terminal 0) that the
  family's diffusers pipeline steps through at a given resolution. It is built by diffusers itself: the
  scheduler is ``FlowMatchEulerDiscreteScheduler.from_config(config)`` and ``mu`` comes from the family
  pipeline's own ``calculate_shift`` (FLUX.2: ``compute_empirical_mu``, which also takes the step count), called the
  way the pipeline calls it.
- ``derive_timesteps`` / ``derive_sigmas``: the Slow and Fast lists read off that table at given indices
  (the official lists are indices 0,2,4,6,8 and 10,20,30,40,49 of the 50-step table at 1024x1024).
- ``load_scheduler_config``: read a model's ``scheduler/scheduler_config.json``.

A pipeline may also declare ``sample_sigmas`` in its ``model_index.json`` (Qwen-Image 2.1 Turbo): a fixed grid it
samples instead of ``linspace(1, 1/N, N)``, whatever ``num_inference_steps`` says. Given, the table is that grid
(shifted by the scheduler as the pipeline does) and its length is the number of steps.

Who decides what: the *scheduler config* decides the shift (static ``shift``, or dynamic shifting with
``base_shift``/``max_shift``/``base_image_seq_len``/``max_image_seq_len``, ``shift_terminal``...); the
*family* (its registry entry) decides how the pipeline computes ``mu`` and which initial sigmas it hands the
scheduler (FLUX and Qwen-Image pass ``linspace(1, 1/N, N)``, SD3 passes none and lets the scheduler
interpolate its training range). So a family is always needed, also with an explicit config.

Timesteps are 0-1000 (t = 1000 * sigma); sigmas are in [0, 1]. Resolutions are ``(width, height)``.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glance_lightning.errors import ConfigError, MissingFileError
from glance_lightning.registry import FamilySpec, UnknownFamilyError, family_names, get_family

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler

TIMESTEP_SCALE = 1000.0
PIXELS_PER_TOKEN = 16  # VAE factor 8 x (2x2 packing for FLUX/Qwen, patch size 2 for SD3)
DEFAULT_SLOW_INDICES = (0, 2, 4, 6, 8)
DEFAULT_FAST_INDICES = (10, 20, 30, 40, 49)
DEFAULT_NUM_STEPS = 50
MAX_SIDE = 16_384  # pixels: far beyond what these models make; the dynamic shift overflows long before 1e9
MAX_NUM_STEPS = 10_000  # a sampling schedule's length; far beyond any pipeline's (and the table is built in memory)
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
_CONFIG_FILE = Path("scheduler") / "scheduler_config.json"


class ScheduleError(ConfigError):
    """A bad schedule setting; ``settings`` names the offending parameter(s) (Python names)."""

    def __init__(self, settings: str | Sequence[str], detail: str) -> None:
        self.settings = (settings,) if isinstance(settings, str) else tuple(settings)
        self.detail = detail
        super().__init__(f"{', '.join(self.settings)}: {detail}")


# ----------------------------------------------------------------------------------------------- inputs


def parse_resolution(resolution: int | str | Sequence[int]) -> tuple[int, int]:
    """Normalise ``1024``, ``"1024"``, ``"1024x768"`` (WIDTHxHEIGHT) or ``(width, height)``; validate it."""
    if isinstance(resolution, str):
        resolution = _parse_resolution_text(resolution)
    if isinstance(resolution, int) and not isinstance(resolution, bool):
        resolution = (resolution, resolution)
    if not isinstance(resolution, Sequence):
        raise ScheduleError("resolution", f"expected an int or (width, height) ints, got {resolution!r}")
    sides = tuple(resolution)
    if len(sides) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in sides):
        raise ScheduleError("resolution", f"expected an int or (width, height) ints, got {resolution!r}")
    for side in sides:
        if side > MAX_SIDE:
            raise ScheduleError("resolution", f"{sides[0]}x{sides[1]}: at most {MAX_SIDE} pixels a side")
        if side <= 0 or side % PIXELS_PER_TOKEN:
            raise ScheduleError(
                "resolution",
                f"{sides[0]}x{sides[1]}: each side must be a positive multiple of {PIXELS_PER_TOKEN} "
                f"(VAE factor 8 x 2x2 patches); use e.g. {_nearest_multiple(side)} instead of {side}",
            )
    return sides[0], sides[1]


def _parse_resolution_text(text: str) -> int | tuple[int, ...]:
    bad = ScheduleError("resolution", f"{text!r} is not SIZE or WIDTHxHEIGHT (e.g. 1024 or 1024x768)")
    try:
        values = tuple(int(p) for p in text.lower().replace(" ", "").split("x"))
    except ValueError:
        raise bad from None
    if len(values) not in (1, 2):
        raise bad
    return values[0] if len(values) == 1 else values


def _nearest_multiple(side: int) -> int:
    return max(PIXELS_PER_TOKEN, PIXELS_PER_TOKEN * round(side / PIXELS_PER_TOKEN))


def _check_family(family: str | None) -> FamilySpec:
    if family is None:
        raise ScheduleError(
            "family",
            "a family is needed (it decides how image tokens are counted and which sigmas the pipeline "
            f"starts from, also with an explicit scheduler config); pass one of {', '.join(family_names())}",
        )
    try:
        return get_family(family)
    except UnknownFamilyError as err:
        raise ScheduleError("family", str(err)) from None


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ScheduleError("num_steps", f"must be a positive int, got {num_steps!r}")
    if num_steps > MAX_NUM_STEPS:
        raise ScheduleError("num_steps", f"{num_steps} steps is beyond any sampling schedule; give at most "
                            f"{MAX_NUM_STEPS} ({DEFAULT_NUM_STEPS} is the pipelines' default)")


def check_sample_sigmas(sample_sigmas: Sequence[float]) -> list[float]:
    """A pipeline's declared ``sample_sigmas``: a non-empty, strictly descending list in (0, 1]."""
    values = list(sample_sigmas) if isinstance(sample_sigmas, Sequence) and not isinstance(sample_sigmas, str) else []
    if not values or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise ScheduleError("sample_sigmas", f"expected a non-empty list of numbers, got {sample_sigmas!r}")
    values = [float(v) for v in values]
    if not all(0.0 < v <= 1.0 for v in values) or any(b >= a for a, b in zip(values, values[1:])):
        raise ScheduleError("sample_sigmas", f"{values} must be strictly descending sigmas in (0, 1]")
    return values


def _steps_of(num_steps: int | None, sample_sigmas: Sequence[float] | None) -> int:
    """The table's length: ``num_steps`` (default 50), or the declared grid's, which a pipeline samples whatever
    ``num_inference_steps`` says (so another explicit ``num_steps`` is refused)."""
    if sample_sigmas is None:
        steps = DEFAULT_NUM_STEPS if num_steps is None else num_steps
        _check_num_steps(steps)
        return steps
    grid = len(check_sample_sigmas(sample_sigmas))
    if num_steps is not None and num_steps != grid:
        raise ScheduleError("num_steps", f"{num_steps} steps, but the model's pipeline samples its fixed "
                            f"{grid}-step sample_sigmas grid (model_index.json); leave the number of steps unset")
    return grid


def _check_indices(name: str, indices: Sequence[int], num_steps: int) -> list[int]:
    values = list(indices)
    if not values:
        raise ScheduleError(name, "is empty; give at least one index into the schedule")
    for index in values:
        if isinstance(index, bool) or not isinstance(index, int):
            raise ScheduleError(name, f"indices must be ints, got {index!r}")
        if not 0 <= index < num_steps:
            raise ScheduleError(
                name,
                f"index {index} is outside 0..{num_steps - 1} for a {num_steps}-step schedule; "
                "use a smaller index or more steps",
            )
    for previous, current in zip(values, values[1:], strict=False):
        if current <= previous:
            raise ScheduleError(
                name,
                f"indices must be strictly increasing, but {current} follows {previous}; sort them "
                "and drop duplicates",
            )
    return values


def _check_phase_order(slow: list[int], fast: list[int]) -> None:
    if slow[-1] >= fast[0]:
        raise ScheduleError(
            ("slow_indices", "fast_indices"),
            f"every slow index must be below every fast index (Slow runs the early, noisy steps), but "
            f"slow index {slow[-1]} >= fast index {fast[0]}; move the split point",
        )


def _resolve_config(spec: FamilySpec, config: dict | None) -> dict:
    if config is None:
        return spec.scheduler()
    if not isinstance(config, dict):
        raise ScheduleError("scheduler_config", f"expected a dict, got {type(config).__name__}")
    class_name = config.get("_class_name", _SCHEDULER_CLASS)
    if class_name != _SCHEDULER_CLASS:
        raise ScheduleError(
            "scheduler_config",
            f"_class_name is {class_name!r}; only {_SCHEDULER_CLASS} configs are supported",
        )
    if config.get("invert_sigmas"):
        raise ScheduleError("scheduler_config", "invert_sigmas=true (a Mochi setting) is not supported")
    if config.get("num_train_timesteps", 1000) != 1000:
        raise ScheduleError(
            "scheduler_config",
            f"num_train_timesteps is {config['num_train_timesteps']}; Glance timesteps assume 1000",
        )
    return dict(config)


# --------------------------------------------------------------------------------------------- schedule


def sigma_to_timestep(sigma: float) -> float:
    """``1000 * sigma`` in float32, as the scheduler computes its ``timesteps`` (so printed digits match)."""
    return float(np.float32(sigma) * np.float32(TIMESTEP_SCALE))


def image_seq_len(resolution: int | str | Sequence[int]) -> int:
    """Image tokens the pipelines count for ``mu``: (W/16) * (H/16) for every supported family (FLUX/Qwen
    pack 2x2 latents of an 8x VAE; SD3 patchifies 2x2). Qwen-Image-Edit counts target tokens only."""
    width, height = parse_resolution(resolution)
    return (width // PIXELS_PER_TOKEN) * (height // PIXELS_PER_TOKEN)


def _mu(spec: FamilySpec, scheduler: FlowMatchEulerDiscreteScheduler, seq_len: int, num_steps: int
        ) -> float | None:
    """``mu`` exactly as the family's pipeline computes it, or None when the config shifts statically. A shift
    function with a ``num_steps`` parameter (FLUX.2's ``compute_empirical_mu(image_seq_len, num_steps)``) gets the
    sequence length and the step count, as that pipeline calls it; others the config's shift bounds."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return None
    function = spec.shift_function()
    if "num_steps" in inspect.signature(function).parameters:
        return function(image_seq_len=seq_len, num_steps=num_steps)
    return function(
        seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def _stepped_scheduler(
    spec: FamilySpec, config: dict, seq_len: int, num_steps: int, sample_sigmas: Sequence[float] | None = None
) -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = None
    if sample_sigmas is not None:
        sigmas = np.array(sample_sigmas, dtype=np.float64)
    elif spec.linspace_sigmas:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=_mu(spec, scheduler, seq_len, num_steps))
    return scheduler


def full_schedule_sigmas(
    family: str | None = None,
    *,
    scheduler_config: dict | None = None,
    resolution: int | tuple[int, int] = 1024,
    num_steps: int | None = None,
    sample_sigmas: Sequence[float] | None = None,
) -> list[float]:
    """The shifted sigma table (``num_steps`` values, default 50, then the terminal 0) the family's pipeline steps
    through at ``resolution`` with ``scheduler_config`` (default: the family's published config), starting from the
    pipeline's declared ``sample_sigmas`` where given."""
    spec = _check_family(family)
    num_steps = _steps_of(num_steps, sample_sigmas)
    config = _resolve_config(spec, scheduler_config)
    scheduler = _stepped_scheduler(spec, config, image_seq_len(resolution), num_steps, sample_sigmas)
    return [float(s) for s in scheduler.sigmas.tolist()]


def derive_sigmas(
    family: str | None = None,
    *,
    scheduler_config: dict | None = None,
    resolution: int | tuple[int, int] = 1024,
    num_steps: int | None = None,
    slow_indices: Sequence[int] = DEFAULT_SLOW_INDICES,
    fast_indices: Sequence[int] = DEFAULT_FAST_INDICES,
    sample_sigmas: Sequence[float] | None = None,
) -> dict[str, list[float]]:
    """Like :func:`derive_timesteps` but in [0, 1] sigmas."""
    num_steps = _steps_of(num_steps, sample_sigmas)
    slow = _check_indices("slow_indices", slow_indices, num_steps)
    fast = _check_indices("fast_indices", fast_indices, num_steps)
    _check_phase_order(slow, fast)
    table = full_schedule_sigmas(
        family, scheduler_config=scheduler_config, resolution=resolution, num_steps=num_steps,
        sample_sigmas=sample_sigmas,
    )
    return {"slow": [table[i] for i in slow], "fast": [table[i] for i in fast]}


def derive_timesteps(
    family: str | None = None,
    *,
    scheduler_config: dict | None = None,
    resolution: int | tuple[int, int] = 1024,
    num_steps: int | None = None,
    slow_indices: Sequence[int] = DEFAULT_SLOW_INDICES,
    fast_indices: Sequence[int] = DEFAULT_FAST_INDICES,
    sample_sigmas: Sequence[float] | None = None,
) -> dict[str, list[float]]:
    """Slow and Fast timestep lists (0-1000) read off the base model's ``num_steps`` inference schedule.

    ``family`` is always required (token counting, initial sigmas); ``scheduler_config`` overrides the
    family's published config (the shift); ``sample_sigmas`` is the pipeline's declared fixed grid, if any.
    ``resolution`` is an int or ``(width, height)``.
    """
    sigmas = derive_sigmas(
        family,
        scheduler_config=scheduler_config,
        resolution=resolution,
        num_steps=num_steps,
        slow_indices=slow_indices,
        fast_indices=fast_indices,
        sample_sigmas=sample_sigmas,
    )
    return {phase: [sigma_to_timestep(s) for s in values] for phase, values in sigmas.items()}


# ------------------------------------------------------------------------------------------ config file


def load_scheduler_config(path: str | Path) -> dict:
    """Read a scheduler config from a model directory (``scheduler/scheduler_config.json``, or a
    ``scheduler_config.json`` directly inside it) or from a json file."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(
            f"scheduler config: {path} does not exist; pass a model directory or a json file"
        )
    file = path if path.is_file() else _config_file_in(path)
    try:
        config = json.loads(file.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ScheduleError("scheduler_config", f"{file} is not a json text file (byte {exc.start} is not "
                            "UTF-8); give a scheduler_config.json or the model folder") from None
    except json.JSONDecodeError as exc:
        raise ScheduleError("scheduler_config", f"{file} is not valid json: {exc}") from None
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise ScheduleError("scheduler_config", f"{file} must hold a json object, got a json {kind}")
    wrong = [f"{key}={config[key]!r}" for key in _NUMERIC_KEYS if key in config and not _number_or_null(config[key])]
    if wrong:
        raise ScheduleError("scheduler_config", f"{file}: {', '.join(wrong)} must be numbers")
    return config


_NUMERIC_KEYS = ("num_train_timesteps", "shift", "base_shift", "max_shift", "base_image_seq_len",
                 "max_image_seq_len", "shift_terminal")


def _number_or_null(value: object) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))


def _config_file_in(directory: Path) -> Path:
    for candidate in (directory / _CONFIG_FILE, directory / _CONFIG_FILE.name):
        if candidate.is_file():
            return candidate
    raise MissingFileError(
        f"scheduler config: {directory} has no {_CONFIG_FILE} (nor {_CONFIG_FILE.name}); pass the model's "
        "root directory (the one holding model_index.json) or the json file itself"
    )
