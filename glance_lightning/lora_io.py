"""Writing, reading and exporting Glance LoRA files.

**The default file** is ``<dir>/pytorch_lora_weights.safetensors`` in the diffusers layout ("transformer.<module>"
keys, ``lora_A``/``lora_B``) with alpha/rank folded into ``lora_B`` and diffusers' ``lora_adapter_metadata`` saying
alpha = rank. So every loader applies exactly the weight change the adapter was trained with, whatever it does
with alpha: diffusers reads the metadata (scale alpha/rank = 1), ComfyUI ignores the metadata and uses alpha/rank
only where a ``<module>.alpha`` tensor exists, else 1.0 (comfy/weight_adapter/lora.py, ``LoRAAdapter
.calculate_weight``), kohya-style loaders default a missing alpha to the rank (1.0 again). An unfolded file
(rank 8, alpha 32) loads at 1/4 strength in ComfyUI; adding ``.alpha`` tensors instead breaks diffusers' FLUX
and Qwen loaders. The ``glance`` metadata (family, base model, phase, timestep lists, the trained rank/alpha,
resolution) is kept in every file. Writes are atomic (``glance_lightning.atomic``): a temporary file in the
same folder, fsynced and renamed into place.

Exports to other tools' key layouts and reading theirs live in ``glance_lightning.lora_layouts``.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
from safetensors import safe_open
from safetensors.torch import save

from glance_lightning.atomic import write_bytes
from glance_lightning.errors import ConfigError, MissingFileError

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
GLANCE_METADATA_KEY = "glance"
def jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple, list)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file all or nothing (``glance_lightning.atomic.write_bytes``): a failed write leaves
    the previous file intact and reports the write's own error."""
    write_bytes(path, save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata))


# ---------------------------------------------------------------------------------------------- scales


def _pattern_value(module: str, patterns: dict[str, Any] | None, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern`` lookup: a key matches a module name ending in ``.<key>``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_scale(module: str, rank: int, config: dict[str, Any]) -> float:
    """The scale peft gives ``module`` of ``rank`` under a LoraConfig dict: alpha/rank (alpha/sqrt(rank) with
    rsLoRA), alpha from ``alpha_pattern`` where it names the module."""
    alpha = float(_pattern_value(module, config.get("alpha_pattern"), config.get("lora_alpha", rank)))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def module_of(key: str) -> str:
    return key.split(".lora_", 1)[0]


# ---------------------------------------------------------------------------------------------- saving


def save_lora(
    directory: str | os.PathLike,
    transformer_state: dict[str, torch.Tensor],
    peft_config: dict[str, Any],
    glance: dict[str, Any],
) -> Path:
    """Save one adapter (peft state dict without adapter names, as trained) as
    ``directory/pytorch_lora_weights.safetensors``, its scale folded into lora_B (see the module docstring)."""
    config = jsonable(peft_config)
    folded, scales = {}, set()
    for key, value in transformer_state.items():
        if ".lora_B." in key:
            module = module_of(key)
            rank = transformer_state[f"{module}.lora_A.weight"].shape[0]
            scale = peft_scale(module, rank, config)
            scales.add(scale)
            value = value * scale if scale != 1.0 else value
        folded[f"transformer.{key}"] = value
    config = {**config, "lora_alpha": config.get("r"), "alpha_pattern": dict(config.get("rank_pattern") or {}),
              "use_rslora": False}
    adapter_metadata = {f"transformer.{k}": v for k, v in config.items()}
    folded_scale = scales.pop() if len(scales) == 1 else sorted(scales)
    metadata = {
        "format": "pt",
        LORA_ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True),
        GLANCE_METADATA_KEY: json.dumps(jsonable({**glance, "layout": "diffusers", "scale_folded": folded_scale}),
                                        sort_keys=True),
    }
    path = Path(directory) / LORA_WEIGHT_NAME
    atomic_save_safetensors(folded, path, metadata)
    return path


def lora_file(path: str | os.PathLike) -> Path:
    """Accept a LoRA directory (ours) or a single .safetensors file (e.g. the official releases)."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise MissingFileError(
            f"LoRA not found: {path}; give a directory holding {LORA_WEIGHT_NAME} or a .safetensors file"
        )
    return path


@contextmanager
def open_lora(path: str | os.PathLike) -> Iterator[Any]:
    """``safe_open`` of a LoRA file; a damaged or non-safetensors file is a message naming it."""
    file = lora_file(path)
    try:
        handle = safe_open(str(file), framework="pt")
    except Exception as err:  # noqa: BLE001 (safetensors raises its own error type, OSError or ValueError)
        raise ConfigError(f"LoRA {file}: not a readable .safetensors file ({str(err)[:100]}); it is damaged or of "
                          "another format: give the LoRA folder or its pytorch_lora_weights.safetensors") from None
    with handle as f:
        yield f


def check_lora_file(path: str | os.PathLike) -> Path:
    """The file of LoRA ``path``, refused (naming it) unless it opens and holds LoRA tensors: reads the header."""
    file = lora_file(path)
    with open_lora(file) as f:
        keys = list(f.keys())  # noqa: SIM118
    if not any("lora" in key.lower() or key.endswith((".down.weight", ".up.weight")) for key in keys):
        sample = ", ".join(keys[:3]) or "no tensors at all"
        raise ConfigError(f"LoRA {file}: holds no LoRA tensors (lora_A/B, lora_down/up, lora1.down/up), only "
                      f"{sample}...; it is not a LoRA (a model checkpoint?): give a LoRA file")
    return file


def read_glance_metadata(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``glance`` metadata of a LoRA file, or None for files written by other tools."""
    with open_lora(path) as f:
        raw = (f.metadata() or {}).get(GLANCE_METADATA_KEY)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        raise ConfigError(f"LoRA {lora_file(path)}: its glance metadata is not valid JSON; the file was "
                          "edited or damaged, re-export it") from None
