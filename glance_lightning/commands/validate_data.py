"""The ``python -m glance_lightning validate-data`` command: every problem of a dataset, before any model loads."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

from glance_lightning.datamodules.validation import LAYOUTS, PROG, scan_dataset
from glance_lightning.registry import family_names, get_family


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check a training dataset (images, captions, control images) before training; "
        "lists every problem at once. Exit status: 0 usable, 1 dataset has errors, 2 bad arguments.",
    )
    parser.add_argument("--path", required=True, type=Path, help="dataset folder")
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="auto",
        help="flat: images + same-name .txt captions; edit: image/ + control/ (+ control_2/, control_3/); "
        "auto: edit when image/ and control/ exist (default)",
    )
    parser.add_argument(
        "--family", choices=family_names(), default=None,
        help="also check that every sample has as many control images as this family takes",
    )
    return parser


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 2


def run_validate_data_command(argv: Iterable[str] | None = None) -> int:
    """``python -m glance_lightning validate-data``: print the report, return the exit status."""
    try:
        args = _build_parser().parse_args(None if argv is None else list(argv))
    except SystemExit as exc:  # argparse already printed usage / help
        return _exit_code(exc)
    num_controls = get_family(args.family).control_images if args.family else None
    report = scan_dataset(args.path, args.layout, num_controls)
    print(report.format())
    if report.ok:
        print(f"OK: {report.root} ({report.layout} layout) is ready for training.")
        return 0
    print(f"FAILED: {report.root} ({report.layout} layout) is not usable; fix the errors above and re-run.")
    return 1
