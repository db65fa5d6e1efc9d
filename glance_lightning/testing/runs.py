"""Running what the contract checks: a quick-start fit once per config, its module and data as objects, and the
commands as a user runs them (exit status and output captured).

Used by ``FamilyContract`` and by this repository's own tests; public so that a family package's tests can use
the same helpers for checks of their own.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

_RUNS: dict[tuple[str, ...], Path] = {}


@contextlib.contextmanager
def working_directory(path: str | os.PathLike[str] | None) -> Iterator[None]:
    """Run the block in ``path`` (the folder a config's relative data paths are relative to); None: stay."""
    if path is None:
        yield
        return
    previous = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def run_command(argv: list[str], workdir: str | os.PathLike[str] | None = None) -> tuple[int, str, str]:
    """``python -m glance_lightning ARGV`` in this process: (exit status, stdout, stderr)."""
    from glance_lightning.cli import main

    out, err = io.StringIO(), io.StringIO()
    with working_directory(workdir), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(argv))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    return code, out.getvalue(), err.getvalue()


def fit_once(config: str | os.PathLike[str], root: Path, *overrides: str,
             workdir: str | os.PathLike[str] | None = None) -> Path:
    """``fit --config CONFIG [OVERRIDES]`` into a new run folder under ``root``, once per process for the same
    config, overrides and working folder (later calls return the first run's folder: read it, never write)."""
    from glance_lightning.cli import main

    key = (str(Path(workdir or os.getcwd()).resolve()), str(config), *overrides)
    if key not in _RUNS:
        with working_directory(workdir):
            code = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root), *overrides])
        if code != 0:
            raise AssertionError(f"fit --config {config} {' '.join(overrides)} exited with {code}")
        runs = sorted(root.glob("version_*"))
        if len(runs) != 1:
            raise AssertionError(f"fit --config {config}: expected one run folder in {root}, found {runs}")
        _RUNS[key] = runs[0]
    return _RUNS[key]


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in, nested dicts key by key."""
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


def read_config(config: str | os.PathLike[str], workdir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """A fit config as a dict, its data path made absolute (relative to ``workdir``, as fit reads it there)."""
    base = Path(workdir or os.getcwd())
    path = Path(config) if Path(config).is_absolute() else base / config
    loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
    data = (loaded.get("data") or {}).get("init_args") or {}
    if data.get("path") and not Path(data["path"]).is_absolute():
        data["path"] = str(base / data["path"])
    return loaded


def config_objects(config: dict[str, Any], model: dict[str, Any] | None = None,
                   data: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """A fresh (unloaded) module and data module of a fit config (``read_config``), changed by model/data, built
    by jsonargparse as fit builds them."""
    from jsonargparse import ArgumentParser
    from lightning import LightningDataModule

    from glance_lightning.families.base import GlanceModule

    merged = deep_merge(config, {"model": {"init_args": model or {}}, "data": {"init_args": data or {}}})
    parser = ArgumentParser()
    parser.add_subclass_arguments(GlanceModule, "model")
    parser.add_subclass_arguments(LightningDataModule, "data")
    objects = parser.instantiate_classes(parser.parse_object({"model": merged["model"], "data": merged["data"]}))
    return objects.model, objects.data


def lora_deltas(tensors: dict[str, torch.Tensor], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """module -> scale * B @ A of a LoRA file's state dict (``<module>.lora_A.weight`` keys; conv kernels
    flattened): the weight change each module applies."""
    suffix = ".lora_A.weight"
    return {key.removesuffix(suffix): scale * (tensors[key.replace(".lora_A.", ".lora_B.")].flatten(1).float()
                                                 @ tensors[key].flatten(1).float())
            for key in tensors if key.endswith(suffix)}


def pipeline_parameters(pipe: Any) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the pipeline's models (transformer, text encoders, VAE), by component."""
    return {f"{name}.{n}": p for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module) for n, p in component.named_parameters()}
