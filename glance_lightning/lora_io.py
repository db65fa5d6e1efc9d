"""Writing and reading Glance LoRA files in the diffusers format.

A file is ``<dir>/pytorch_lora_weights.safetensors`` with "transformer.*" keys (what stock
``load_lora_weights`` and ComfyUI read), diffusers' ``lora_adapter_metadata`` (so rank and alpha load back
exactly instead of being guessed from shapes) and ``glance.*`` metadata: family, base model, phase, the
timestep lists, rank/alpha and resolution. Writes are atomic: a temporary file renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from safetensors import safe_open
from safetensors.torch import save_file

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
GLANCE_METADATA_KEY = "glance"


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file through a temporary sibling so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_lora(
    directory: str | os.PathLike,
    transformer_state: dict[str, torch.Tensor],
    peft_config: dict[str, Any],
    glance: dict[str, Any],
) -> Path:
    """Save one adapter (peft state dict without adapter names) as ``directory/pytorch_lora_weights.safetensors``."""
    tensors = {f"transformer.{k}": v for k, v in transformer_state.items()}
    adapter_metadata = {f"transformer.{k}": v for k, v in _jsonable(peft_config).items()}
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True),
        GLANCE_METADATA_KEY: json.dumps(_jsonable(glance), sort_keys=True),
    }
    path = Path(directory) / LORA_WEIGHT_NAME
    atomic_save_safetensors(tensors, path, metadata)
    return path


def lora_file(path: str | os.PathLike) -> Path:
    """Accept a LoRA directory (ours) or a single .safetensors file (e.g. the official releases)."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise FileNotFoundError(
            f"LoRA not found: {path}; give a directory holding {LORA_WEIGHT_NAME} or a .safetensors file"
        )
    return path


def read_glance_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``glance`` metadata of a LoRA file, or None for files written by other tools."""
    with safe_open(str(lora_file(path)), framework="pt") as f:
        raw = (f.metadata() or {}).get(GLANCE_METADATA_KEY)
    return json.loads(raw) if raw else None
