"""Glance timestep lists derived from a base model's own inference schedule.

This module owns the schedule arithmetic of the project (GLANCE.md sections 2 and 3):

- ``full_schedule_sigmas``: the shifted sigma table (``num_steps`` entries plus the terminal 0) that the
  family's diffusers pipeline steps through at a given resolution. It is built by diffusers itself: the
  scheduler is ``FlowMatchEulerDiscreteScheduler.from_config(config)`` and ``mu`` comes from the family
  pipeline's own ``calculate_shift``, called the way the pipeline calls it.
- ``derive_timesteps`` / ``derive_sigmas``: the Slow and Fast lists read off that table at given indices
  (the official lists are indices 0,2,4,6,8 and 10,20,30,40,49 of the 50-step table at 1024x1024).
- ``official_qwen_compat_plan``: what the official Glance Qwen pipelines actually step through (a named
  compatibility mode; the exact chained schedule is the project default).
- ``load_scheduler_config``: read a model's ``scheduler/scheduler_config.json``.
- ``run_schedule_command``: the ``python -m glance_lightning schedule`` command.

Who decides what: the *scheduler config* decides the shift (static ``shift``, or dynamic shifting with
``base_shift``/``max_shift``/``base_image_seq_len``/``max_image_seq_len``, ``shift_terminal``...); the
*family* decides how the pipeline counts image tokens for ``mu`` and which initial sigmas it hands the
scheduler (FLUX and Qwen-Image pass ``linspace(1, 1/N, N)``, SD3 passes none and lets the scheduler
interpolate its training range). So a family is always needed, also with an explicit config.

Timesteps are 0-1000 (t = 1000 * sigma); sigmas are in [0, 1]. Resolutions are ``(width, height)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from glance_lightning.scheduler_configs import FAMILIES
from glance_lightning.scheduler_configs import scheduler_config as published_scheduler_config

if TYPE_CHECKING:
    from diffusers import FlowMatchEulerDiscreteScheduler

TIMESTEP_SCALE = 1000.0
PIXELS_PER_TOKEN = 16  # VAE factor 8 x (2x2 packing for FLUX/Qwen, patch size 2 for SD3)
DEFAULT_SLOW_INDICES = (0, 2, 4, 6, 8)
DEFAULT_FAST_INDICES = (10, 20, 30, 40, 49)
DEFAULT_NUM_STEPS = 50
OFFICIAL_QWEN_SLOW_TABLE_STEPS = 50
OFFICIAL_QWEN_PHASE_STEPS = 5
_SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
_CONFIG_FILE = Path("scheduler") / "scheduler_config.json"


@dataclass(frozen=True)
class _FamilyLayout:
    """How a family's diffusers pipeline prepares its timesteps."""

    pipeline_module: str  # the module whose calculate_shift the pipeline calls
    passes_linspace_sigmas: bool  # FLUX/Qwen: sigmas=linspace(1, 1/N, N); SD3: sigmas=None


_LAYOUTS = {
    "flux": _FamilyLayout("diffusers.pipelines.flux.pipeline_flux", True),
    "sd3": _FamilyLayout("diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3", False),
    "qwen-image": _FamilyLayout("diffusers.pipelines.qwenimage.pipeline_qwenimage", True),
    "qwen-image-edit": _FamilyLayout("diffusers.pipelines.qwenimage.pipeline_qwenimage_edit", True),
    "qwen-image-edit-plus": _FamilyLayout("diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus", True),
}


class ScheduleError(ValueError):
    """A bad schedule setting; ``settings`` names the offending parameter(s) (Python names)."""

    def __init__(self, settings: str | Sequence[str], detail: str) -> None:
        self.settings = (settings,) if isinstance(settings, str) else tuple(settings)
        self.detail = detail
        super().__init__(f"{', '.join(self.settings)}: {detail}")


@dataclass(frozen=True)
class PhasePlan:
    """One phase of a sampling run: ``step_sigmas[i] -> step_sigmas[i + 1]`` is step i, conditioned on
    ``condition_timesteps[i]`` (0-1000)."""

    step_sigmas: list[float]
    condition_timesteps: list[float]


@dataclass(frozen=True)
class CompatPlan:
    """The official Glance Qwen two-call behaviour: a Slow call then a Fast call."""

    slow: PhasePlan
    fast: PhasePlan


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


def _check_family(family: str | None) -> str:
    if family is None:
        raise ScheduleError(
            "family",
            "a family is needed (it decides how image tokens are counted and which sigmas the pipeline "
            f"starts from, also with an explicit scheduler config); pass one of {', '.join(FAMILIES)}",
        )
    if family not in _LAYOUTS:
        raise ScheduleError("family", f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return family


def _check_num_steps(num_steps: int) -> None:
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ScheduleError("num_steps", f"must be a positive int, got {num_steps!r}")


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


def _resolve_config(family: str, config: dict | None) -> dict:
    if config is None:
        return published_scheduler_config(family)
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


def _mu(family: str, scheduler: FlowMatchEulerDiscreteScheduler, seq_len: int) -> float | None:
    """``mu`` exactly as the family's pipeline computes it, or None when the config shifts statically."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return None
    calculate_shift = importlib.import_module(_LAYOUTS[family].pipeline_module).calculate_shift
    return calculate_shift(
        seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )


def _stepped_scheduler(
    family: str, config: dict, seq_len: int, num_steps: int
) -> FlowMatchEulerDiscreteScheduler:
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = None
    if _LAYOUTS[family].passes_linspace_sigmas:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=_mu(family, scheduler, seq_len))
    return scheduler


def full_schedule_sigmas(
    family: str | None = None,
    *,
    scheduler_config: dict | None = None,
    resolution: int | tuple[int, int] = 1024,
    num_steps: int = DEFAULT_NUM_STEPS,
) -> list[float]:
    """The shifted sigma table (``num_steps`` values, then the terminal 0) the family's pipeline steps
    through at ``resolution`` with ``scheduler_config`` (default: the family's published config)."""
    family = _check_family(family)
    _check_num_steps(num_steps)
    config = _resolve_config(family, scheduler_config)
    scheduler = _stepped_scheduler(family, config, image_seq_len(resolution), num_steps)
    return [float(s) for s in scheduler.sigmas.tolist()]


def derive_sigmas(
    family: str | None = None,
    *,
    scheduler_config: dict | None = None,
    resolution: int | tuple[int, int] = 1024,
    num_steps: int = DEFAULT_NUM_STEPS,
    slow_indices: Sequence[int] = DEFAULT_SLOW_INDICES,
    fast_indices: Sequence[int] = DEFAULT_FAST_INDICES,
) -> dict[str, list[float]]:
    """Like :func:`derive_timesteps` but in [0, 1] sigmas."""
    _check_num_steps(num_steps)
    slow = _check_indices("slow_indices", slow_indices, num_steps)
    fast = _check_indices("fast_indices", fast_indices, num_steps)
    _check_phase_order(slow, fast)
    table = full_schedule_sigmas(
        family, scheduler_config=scheduler_config, resolution=resolution, num_steps=num_steps
    )
    return {"slow": [table[i] for i in slow], "fast": [table[i] for i in fast]}


def derive_timesteps(
    family: str | None = None,
    *,
    scheduler_config: dict | None = None,
    resolution: int | tuple[int, int] = 1024,
    num_steps: int = DEFAULT_NUM_STEPS,
    slow_indices: Sequence[int] = DEFAULT_SLOW_INDICES,
    fast_indices: Sequence[int] = DEFAULT_FAST_INDICES,
) -> dict[str, list[float]]:
    """Slow and Fast timestep lists (0-1000) read off the base model's ``num_steps`` inference schedule.

    ``family`` is always required (token counting, initial sigmas); ``scheduler_config`` overrides the
    family's published config (the shift). ``resolution`` is an int or ``(width, height)``.
    """
    sigmas = derive_sigmas(
        family,
        scheduler_config=scheduler_config,
        resolution=resolution,
        num_steps=num_steps,
        slow_indices=slow_indices,
        fast_indices=fast_indices,
    )
    return {phase: [sigma_to_timestep(s) for s in values] for phase, values in sigmas.items()}


# ----------------------------------------------------------------------------------- official Qwen mode


def _check_compat_timesteps(name: str, timesteps: Sequence[float]) -> list[float]:
    values = [float(t) for t in timesteps]
    if len(values) != OFFICIAL_QWEN_PHASE_STEPS:
        raise ScheduleError(
            name,
            f"the official Qwen compatibility mode only works at exactly {OFFICIAL_QWEN_PHASE_STEPS} + "
            f"{OFFICIAL_QWEN_PHASE_STEPS} steps, got {len(values)}; use the exact chained schedule instead",
        )
    if any(not 0.0 <= t <= TIMESTEP_SCALE for t in values):
        raise ScheduleError(name, f"timesteps must be in 0..1000, got {values}")
    if max(values) <= 1.0:
        raise ScheduleError(name, f"{values} look like [0, 1] sigmas; pass 0-1000 timesteps (sigma * 1000)")
    return values


def official_qwen_compat_plan(
    slow_timesteps: Sequence[float],
    fast_timesteps: Sequence[float],
    resolution: int | tuple[int, int] = 1024,
    *,
    scheduler_config: dict | None = None,
) -> CompatPlan:
    """What GlanceQwenSlowPipeline / GlanceQwenFastPipeline step through (GLANCE.md section 3).

    Slow: the first 5 intervals of the shifted 50-step table (1.0 -> ... -> ~0.946 at 1024), conditioned on
    the 5 Slow timesteps. Fast: the whole shifted 5-step table (1.0, 0.837, 0.633, 0.370, 0.02, 0 at 1024),
    conditioned on the 5 Fast timesteps. Only defined for exactly 5 + 5 timesteps.
    """
    slow = _check_compat_timesteps("slow_timesteps", slow_timesteps)
    fast = _check_compat_timesteps("fast_timesteps", fast_timesteps)
    common = {"scheduler_config": scheduler_config, "resolution": resolution}
    slow_table = full_schedule_sigmas("qwen-image", num_steps=OFFICIAL_QWEN_SLOW_TABLE_STEPS, **common)
    fast_table = full_schedule_sigmas("qwen-image", num_steps=OFFICIAL_QWEN_PHASE_STEPS, **common)
    return CompatPlan(
        slow=PhasePlan(step_sigmas=slow_table[: OFFICIAL_QWEN_PHASE_STEPS + 1], condition_timesteps=slow),
        fast=PhasePlan(step_sigmas=fast_table, condition_timesteps=fast),
    )


# ------------------------------------------------------------------------------------------ config file


def load_scheduler_config(path: str | Path) -> dict:
    """Read a scheduler config from a model directory (``scheduler/scheduler_config.json``, or a
    ``scheduler_config.json`` directly inside it) or from a json file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"scheduler config: {path} does not exist; pass a model directory or a json file"
        )
    file = path if path.is_file() else _config_file_in(path)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ScheduleError("scheduler_config", f"{file} is not valid json: {exc}") from None
    if not isinstance(config, dict):
        kind = type(config).__name__
        raise ScheduleError("scheduler_config", f"{file} must hold a json object, got a json {kind}")
    return config


def _config_file_in(directory: Path) -> Path:
    for candidate in (directory / _CONFIG_FILE, directory / _CONFIG_FILE.name):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"scheduler config: {directory} has no {_CONFIG_FILE} (nor {_CONFIG_FILE.name}); pass the model's "
        "root directory (the one holding model_index.json) or the json file itself"
    )


# ----------------------------------------------------------------------------------------------- command

_OPTION_NAMES = {
    "family": "--family",
    "resolution": "--resolution",
    "num_steps": "--steps",
    "slow_indices": "--slow-indices",
    "fast_indices": "--fast-indices",
    "scheduler_config": "--scheduler-config",
}


def _index_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        detail = f"{text!r} is not a comma-separated list of ints (e.g. 0,2,4,6,8)"
        raise argparse.ArgumentTypeError(detail) from None


def _resolution_arg(text: str) -> tuple[int, int]:
    try:
        return parse_resolution(text)
    except ScheduleError as exc:
        raise argparse.ArgumentTypeError(exc.detail) from None


def build_schedule_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m glance_lightning schedule",
        description="Print the Glance Slow/Fast timestep lists read off a base model's own inference "
        'schedule, as one JSON object {"slow": [...], "fast": [...]}.',
    )
    parser.add_argument(
        "--family",
        required=True,
        choices=FAMILIES,
        help="model family; always required: it decides how image tokens are counted for the dynamic shift "
        "and which sigmas the pipeline starts from. Its published scheduler config is used unless "
        "--scheduler-config is given.",
    )
    parser.add_argument(
        "--scheduler-config",
        metavar="PATH",
        help="a model directory (reads scheduler/scheduler_config.json) or a scheduler config json file; "
        "overrides the family's published config (the shift settings)",
    )
    parser.add_argument(
        "--resolution",
        type=_resolution_arg,
        default=(1024, 1024),
        metavar="SIZE|WIDTHxHEIGHT",
        help="image size, multiples of 16 (default 1024)",
    )
    parser.add_argument("--steps", type=int, default=DEFAULT_NUM_STEPS, help="schedule length (default 50)")
    parser.add_argument(
        "--slow-indices",
        type=_index_list,
        default=list(DEFAULT_SLOW_INDICES),
        metavar="I,J,...",
        help="schedule indices for the Slow LoRA (default 0,2,4,6,8)",
    )
    parser.add_argument(
        "--fast-indices",
        type=_index_list,
        default=list(DEFAULT_FAST_INDICES),
        metavar="I,J,...",
        help="schedule indices for the Fast LoRA (default 10,20,30,40,49)",
    )
    parser.add_argument(
        "--sigmas", action="store_true", help="print [0, 1] sigmas instead of 0-1000 timesteps"
    )
    return parser


def _command_error(parser: argparse.ArgumentParser, exc: Exception, settings: Sequence[str]) -> int:
    options = "/".join(_OPTION_NAMES.get(s, s) for s in settings)
    detail = exc.detail if isinstance(exc, ScheduleError) else str(exc)
    parser.print_usage(sys.stderr)
    print(f"{parser.prog}: error: {options}: {detail}", file=sys.stderr)
    return 2


def run_schedule_command(argv: list[str] | None = None) -> int:
    """Run ``python -m glance_lightning schedule``; prints one JSON object, returns the exit code."""
    parser = build_schedule_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the error (or the help)
        return int(exc.code or 0)
    try:
        config = None if args.scheduler_config is None else load_scheduler_config(args.scheduler_config)
        derive = derive_sigmas if args.sigmas else derive_timesteps
        result = derive(
            args.family,
            scheduler_config=config,
            resolution=args.resolution,
            num_steps=args.steps,
            slow_indices=args.slow_indices,
            fast_indices=args.fast_indices,
        )
    except ScheduleError as exc:
        return _command_error(parser, exc, exc.settings)
    except FileNotFoundError as exc:
        return _command_error(parser, exc, ("scheduler_config",))
    digits = 6 if args.sigmas else 4
    print(json.dumps({phase: [round(v, digits) for v in values] for phase, values in result.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(run_schedule_command())
