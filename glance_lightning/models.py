"""Resolving ``pretrained_model`` to something ``from_pretrained`` opens, and loading a family's pipeline.

Today a name is a local diffusers folder (with ``model_index.json``) or ``tiny:<family>``, a tiny model
built locally once (``glance_lightning.tiny``, imported only for such names). Errors name the setting and
the fix and are raised before anything is loaded.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from glance_lightning.registry import FamilySpec

TINY_PREFIX = "tiny:"


def is_tiny(name: str) -> bool:
    """Whether ``name`` names a tiny model (``tiny:<family>``)."""
    return name.startswith(TINY_PREFIX)


class ModelNotFoundError(FileNotFoundError):
    """``pretrained_model`` names nothing that can be opened; the message says what to give instead."""


def resolve_pretrained(name: str, setting: str = "model.pretrained_model") -> str:
    """The folder ``from_pretrained`` should open for ``name`` (building a ``tiny:`` model if needed)."""
    if is_tiny(name):
        from glance_lightning.tiny import tiny_model_path

        return tiny_model_path(name)
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelNotFoundError(
            f"{setting}={name!r}: no such directory; give a local diffusers model folder (with "
            "model_index.json) or tiny:<family>"
        )
    if not (path / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"{setting}={name!r}: {path} has no model_index.json; give the diffusers model's root folder"
        )
    return str(path)


def load_pipeline(spec: FamilySpec, path: str, dtype: torch.dtype, quantization: Any = None) -> Any:
    """One ``from_pretrained`` of the family's pipeline from a resolved folder, progress bars off."""
    pipeline_class = spec.pipeline_class()
    if "processor" in inspect.signature(pipeline_class.__init__).parameters:
        from glance_lightning.compat import allow_qwen2vl_processor_without_torchvision

        allow_qwen2vl_processor_without_torchvision()  # the edit pipelines' Qwen2-VL processor
    pipe = pipeline_class.from_pretrained(path, dtype=dtype, quantization_config=quantization)
    pipe.set_progress_bar_config(disable=True)
    return pipe
