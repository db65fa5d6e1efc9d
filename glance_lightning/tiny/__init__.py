"""Tiny models of every family that has a tiny builder, in real diffusers on-disk format: building them, and
finding them again in the cache.

Each family's builder (its registry entry's ``tiny_builder``; the built-in ones are in ``builders``) uses the
pipeline class and component classes of its real checkpoint, the real published scheduler config and
tokenizers generated here (``tokenizers``), so ``<Pipeline>.from_pretrained(path)`` loads one exactly as it
loads the real checkpoint, with no model hub involved. Every dimension is tiny and the weights are random
(seeded), except the VAE's: it is trained at build time (``vae``; deterministically, ~10 s on one CPU core,
once per process for the FLUX/SD3 design and once for the Qwen one) into a crude but real autoencoder. A 2-step
64x64 text-to-image generation takes a small fraction of a second on a CPU (the edit pipelines also VAE-encode
each control image at ~1 megapixel, whatever the output size; that costs about a second per image even with
the tiny VAE).

``tiny_model_path("tiny:<family>")`` builds a family once into ``cache_dir()/tiny/<family>-<TINY_VERSION>``
(atomically: readers never see a partial build) and reuses it; the quick start and the test suite pass such
names wherever a real model id would go.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from glance_lightning import console
from glance_lightning.errors import ConfigError, ExistingFileError, SetupError
from glance_lightning.models import CACHE_ENV, TINY_PREFIX, cache_dir, is_tiny
from glance_lightning.registry import FamilySpec, UnknownFamilyError, family_names, get_family

__all__ = [
    "CACHE_ENV",
    "TINY_PREFIX",
    "TINY_VERSION",
    "build_tiny_model",
    "cache_dir",
    "is_tiny",
    "tiny_model_path",
]

TINY_VERSION = "v2"  # bump whenever what gets built changes, so stale cached builds are not reused


def _tiny_spec(family: str) -> FamilySpec:
    """The registry entry of `family`, which must have a tiny builder."""
    try:
        spec = get_family(family)
    except UnknownFamilyError:
        spec = None
    if spec is None or not spec.tiny_builder:
        with_builders = [name for name in family_names() if get_family(name).tiny_builder]
        problem = "has no tiny builder" if spec is not None else "is not a registered family"
        raise ConfigError(
            f"no tiny model of family {family!r}: it {problem}; families with one: {', '.join(with_builders)}"
        )
    return spec


def build_tiny_model(family: str, path: str | os.PathLike[str], seed: int = 0) -> Path:
    """Build a tiny model of `family` (seeded random weights, a VAE trained from `seed`) in diffusers format at
    `path` (must not exist or be empty)."""
    spec = _tiny_spec(family)
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise ExistingFileError(f"cannot build a tiny {family} model into non-empty {path}")
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        pipeline = spec.build_tiny(seed)
    pipeline.save_pretrained(path, safe_serialization=True)
    _use_real_class_names(path)
    if (path / "processor").is_dir():
        _add_video_processor_config(path)
    return path


def tiny_model_path(name: str) -> str:
    """'tiny:<family>' -> path of a tiny model built once into the cache dir and reused."""
    if not is_tiny(name):
        raise ConfigError(f"{name!r} is not a tiny model name; expected {TINY_PREFIX}<family>")
    family = name[len(TINY_PREFIX) :]
    _tiny_spec(family)
    target = cache_dir() / "tiny" / f"{family}-{TINY_VERSION}"
    if not (target / "model_index.json").is_file():
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            raise SetupError(
                f"{name}: not built yet, and rank {torch.distributed.get_rank()} cannot build it (transformers "
                "saves weights on rank 0 only); build it before launching, or let GlanceModule.prepare_data do it"
            )
        _build_into_place(family, target)
    return str(target)


def _build_into_place(family: str, target: Path) -> None:
    """Build into a private sibling directory, then rename it to `target` in one step, so readers never see
    a partial model; if a concurrent builder got there first, keep theirs and discard ours."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    started = time.perf_counter()
    console.info(f"building the tiny {family} model once into {target} (random weights and a VAE trained for a "
                 "few seconds; later runs reuse it) ...")
    try:
        build_tiny_model(family, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    console.info(f"built the tiny {family} model in {time.perf_counter() - started:.1f}s")


def _use_real_class_names(path: Path) -> None:
    """transformers 5 saves ``T5TokenizerFast`` under its alias ``T5Tokenizer``, a sentencepiece class in
    transformers 4; record the name the real checkpoints' model_index.json uses."""
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    for name, entry in index.items():
        if entry == ["transformers", "T5Tokenizer"]:
            index[name] = ["transformers", "T5TokenizerFast"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _add_video_processor_config(path: Path) -> None:
    """Give the saved processor the video processor entry real ones have: where torchvision is installed,
    transformers requires one to load a Qwen2-VL / Qwen3-VL processor (the pipelines never pass videos)."""
    if json.loads((path / "model_index.json").read_text())["processor"][-1] == "Qwen3VLProcessor":
        from glance_lightning.tiny.qwen_image21 import QWEN3VL_VIDEO_PROCESSOR as entry
    else:
        from glance_lightning.tiny.tokenizers import QWEN_MAX_PIXELS, QWEN_MIN_PIXELS  # imports transformers

        entry = {
            "video_processor_type": "Qwen2VLVideoProcessor",
            "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
            "patch_size": 14,
            "temporal_patch_size": 2,
            "merge_size": 2,
        }
    config_file = path / "processor" / "processor_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    config["video_processor"] = entry
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
