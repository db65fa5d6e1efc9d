"""The ``python -m glance_lightning validate-data`` command: every problem of a dataset, before any model loads."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from glance_lightning.datamodules.glance import data_rules
from glance_lightning.datamodules.images import ImageRules
from glance_lightning.datamodules.validation import LAYOUTS, PROG, scan_dataset
from glance_lightning.errors import ConfigError, MissingFileError
from glance_lightning.registry import family_names, family_of_module, get_family


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Check a training dataset (images, captions, control images) before training; "
        "lists every problem at once. Exit status: 0 usable, 1 dataset has errors, 2 bad arguments.",
    )
    parser.add_argument("--path", type=Path, default=None, help="dataset folder (default: the --config's data.path)")
    parser.add_argument("--config", type=Path, default=None,
                        help="a fit config: its data settings (path, resolution, size_multiple, resize, "
                        "max_aspect_ratio, alpha) and its model's family are checked against")
    parser.add_argument("--resolution", type=int, default=None, help="as data.resolution (default 1024)")
    parser.add_argument("--size-multiple", type=int, default=None, help="as data.size_multiple")
    parser.add_argument(
        "--layout", choices=LAYOUTS, default="auto",
        help="flat: images + same-name .txt captions; edit: image/ + control/ (+ control_2/, control_3/); "
        "auto: edit when image/ and control/ exist (default)",
    )
    parser.add_argument("--allow-empty-captions", action="store_true", default=None,
                        help="as data.allow_empty_captions: empty caption files are trained without a caption")
    parser.add_argument(
        "--family", choices=family_names(), default=None,
        help="also check that every sample has as many control images as this family takes",
    )
    return parser


_RULES = {f.name for f in dataclasses.fields(ImageRules)}


def _from_config(path: Path) -> tuple[dict[str, Any], str | None]:
    """The data settings and the model family of a fit config (relative data paths as fit reads them)."""
    import yaml

    if not path.is_file():
        raise MissingFileError(f"--config {path}: no such file")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]})") from None
    data, model = _section(config, "data", path), _section(config, "model", path)
    data = _section(data, "init_args", path, "data.")
    class_path = str(model.get("class_path", "") or "")
    return data, _family_of_class_path(class_path, path) if class_path else None


def _section(config: Any, key: str, path: Path, prefix: str = "") -> dict[str, Any]:
    """``config[key]`` as a mapping ({} when absent), or one line naming the config and the key."""
    if not isinstance(config, dict):
        what = "the file" if not prefix else prefix.rstrip(".")
        raise ConfigError(f"--config {path}: {what} holds a {type(config).__name__}, not fit settings (see configs/)")
    value = config.get(key) or {}
    if not isinstance(value, dict):
        raise ConfigError(f"--config {path}: {prefix}{key} should be a mapping of settings, not {value!r} "
                          "(see configs/)")
    return dict(value)


def _family_of_class_path(class_path: str, config: Path) -> str:
    """The registered family whose module the config's ``model.class_path`` names (a spec's module may be a
    "module:Class" string or the class itself); else the class is imported and asked for its ``family``."""
    for name in family_names():
        if get_family(name).module_path == class_path:
            return name
    module, _, attribute = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attribute)
        return family_of_module(cls).name
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"--config {config}: model.class_path {class_path} is no registered family's module "
                          f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); give --family NAME or "
                          "fix model.class_path") from None


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    return exc.code if isinstance(exc.code, int) else 2


def run_validate_data_command(argv: Iterable[str] | None = None) -> int:
    """``python -m glance_lightning validate-data``: print the report, return the exit status."""
    parser = _build_parser()
    try:
        args = parser.parse_args(None if argv is None else list(argv))
        if args.path is None and args.config is None:
            parser.error("give --path DIR, or --config FILE (a fit config: its data.init_args.path)")
    except SystemExit as exc:  # argparse already printed usage / help
        return _exit_code(exc)
    settings, family = _from_config(args.config) if args.config else ({}, None)
    family = args.family or family
    path = args.path or settings.pop("path", None)
    settings.pop("path", None)
    if path is None:
        raise ConfigError(f"--config {args.config}: it sets no data.init_args.path; give --path DIR")
    if not isinstance(path, (str, Path)):
        raise ConfigError(f"--config {args.config}: data.init_args.path={path!r} is not a folder name")
    for name in ("resolution", "size_multiple", "allow_empty_captions"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    rules = data_rules(**{k: v for k, v in settings.items() if k in _RULES})
    num_controls = get_family(family).control_images if family else None
    report = scan_dataset(Path(path), args.layout, num_controls, rules=rules)
    print(report.format())
    if report.ok:
        print(f"OK: {report.root} ({report.layout} layout) is ready for training.")
        return 0
    print(f"FAILED: {report.root} ({report.layout} layout) is not usable; fix the errors above and re-run.")
    return 1
