"""The ``python -m glance_lightning schedule`` command: Slow/Fast lists read off a family's own schedule."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from glance_lightning.model_schedule import declared_sample_sigmas
from glance_lightning.registry import family_names
from glance_lightning.schedules import (
    DEFAULT_FAST_INDICES,
    DEFAULT_NUM_STEPS,
    DEFAULT_SLOW_INDICES,
    ScheduleError,
    derive_sigmas,
    derive_timesteps,
    load_scheduler_config,
    parse_resolution,
)

_OPTION_NAMES = {
    "family": "--family",
    "resolution": "--resolution",
    "num_steps": "--steps",
    "slow_indices": "--slow-indices",
    "fast_indices": "--fast-indices",
    "scheduler_config": "--scheduler-config",
    "sample_sigmas": "--scheduler-config (model_index.json sample_sigmas)",
}


def _step_count(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of steps; give an integer such as "
                                         f"{DEFAULT_NUM_STEPS}") from None


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
        choices=family_names(),
        help="model family; always required: it decides how image tokens are counted for the dynamic shift "
        "and which sigmas the pipeline starts from. Its published scheduler config is used unless "
        "--scheduler-config is given.",
    )
    parser.add_argument(
        "--scheduler-config",
        metavar="PATH",
        help="a model directory (reads scheduler/scheduler_config.json, and the sample_sigmas grid its "
        "model_index.json may declare) or a scheduler config json file; overrides the family's published config "
        "(the shift settings), as fit and sample read the model they load",
    )
    parser.add_argument(
        "--resolution",
        type=_resolution_arg,
        default=(1024, 1024),
        metavar="SIZE|WIDTHxHEIGHT",
        help="image size, multiples of 16 (default 1024)",
    )
    parser.add_argument("--steps", type=_step_count, default=None,
                        help=f"schedule length (default {DEFAULT_NUM_STEPS}, or the length of the sample_sigmas "
                        "grid the model directory declares)")
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
        config, grid = None, None
        if args.scheduler_config is not None:
            config = load_scheduler_config(args.scheduler_config)
            folder = Path(args.scheduler_config)
            grid = declared_sample_sigmas(folder) if folder.is_dir() else None
        derive = derive_sigmas if args.sigmas else derive_timesteps
        result = derive(
            args.family,
            scheduler_config=config,
            sample_sigmas=grid,
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
