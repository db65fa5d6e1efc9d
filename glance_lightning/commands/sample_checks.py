"""What ``sample`` checks before anything is read or loaded: option values (sizes, seeds, device, guidance) and
that ``--model`` is a model of the LoRAs' family. Each mistake is a ``ConfigError`` naming the option."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from glance_lightning import errors
from glance_lightning.errors import ConfigError
from glance_lightning.lora_io import check_lora_file
from glance_lightning.registry import FamilySpec, family_names, get_family


def _warn(message: str) -> None:
    print(f"sample: warning: {message}", file=sys.stderr, flush=True)


def check_model(model: str, family: str, metadata: dict[str, dict | None]) -> None:
    """Before anything is loaded: refuse a ``--model`` of another family than the LoRAs' (``tiny:<family>`` names it,
    a folder's model_index.json names its pipeline class); warn when it is not the LoRAs' base model and about a
    phase trained for 0 steps."""
    from glance_lightning.inference import family_of_model, pipeline_class_name
    from glance_lightning.models import is_tiny

    model_family, class_name = family_of_model(model)
    own = pipeline_class_name(get_family(family))
    if is_tiny(model) and model_family not in family_names():
        raise ConfigError(f"--model {model}: no tiny model of that name; give tiny:{family} (the LoRAs' family) or a "
                          "model folder or hub id")
    if model_family is not None and model_family != family and class_name != own:
        raise ConfigError(f"--model {model} is a {class_name or model_family} ({model_family}) but the LoRAs were "
                         f"trained for {family} ({own}); give a {family} model")
    if model_family is None and class_name is not None and class_name != own:
        _warn(f"--model {model} holds a {class_name}, which is no registered family's pipeline; loading it as "
              f"{pipeline_class_name(get_family(family))} for the {family} LoRAs")
    base = next((m.get("base_model") for m in metadata.values() if m and m.get("base_model")), None)
    if base is not None and not _same_model(base, model):
        _warn(f"the LoRAs were trained on {base}, sampling with --model {model}: they may not fit this base model")
    for phase, meta in metadata.items():
        if meta and meta.get("trained_steps") == 0:
            _warn(f"the {phase.capitalize()} LoRA was trained for 0 steps: it is its initialisation (lora_B = 0) and "
                  "changes nothing; train that phase (model.init_args." + phase + "_steps) for a Glance chain")


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's range
MAX_SIDE = 8192  # pixels: 4x the 2-megapixel sizes these models are trained for; beyond is a typo, not an image
DTYPES = ("float32", "bfloat16", "float16")


def check_size(height: int, width: int, multiple: int) -> None:
    """Image sides the family can make: positive multiples of its latent patch size in pixels."""
    for name, side in (("--height", height), ("--width", width)):
        if side <= 0 or side % multiple:
            near = max(multiple, round(side / multiple) * multiple)
            raise ConfigError(f"{name} {side}: give a positive multiple of {multiple} (e.g. {near})")
        if side > MAX_SIDE:
            raise ConfigError(f"{name} {side}: at most {MAX_SIDE} pixels (these models are trained near 1024)")


def check_device(device: str) -> None:
    """``--device`` names a device this machine has."""
    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"--device {device}: not a device name; give cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and (not torch.cuda.is_available() or (parsed.index or 0) >= torch.cuda.device_count()):
        have = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise errors.SetupError(f"--device {device}: this machine has {have}; give --device cpu or an existing one")
    if parsed.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ConfigError(f"--device {device}: give cpu, cuda or cuda:N")


def check_options(args: argparse.Namespace) -> None:
    """What can be checked before anything is read or loaded."""
    for seed in args.seed or ():
        if not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"--seed {seed}: give a whole number from 0 to {MAX_SEED}")
    if not math.isfinite(args.lora_scale):
        raise ConfigError(f"--lora-scale {args.lora_scale}: give a finite number (1 = the trained strength)")
    for name in ("guidance", "guidance_scale"):
        value = getattr(args, name, None)
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: give a finite number")
    check_device(args.device)
    for name in ("slow", "fast"):
        check_lora_file(getattr(args, name))


GUIDANCE_OPTIONS = {"embedded": "--guidance (its guidance embedding)",
                    "cfg": "--guidance-scale (classifier-free guidance)", "none": "neither guidance option"}


def check_guidance(args: argparse.Namespace, spec: FamilySpec) -> None:
    """``--guidance`` only for a family with a guidance embedding, ``--guidance-scale`` (other than 1) and
    ``--negative-prompt`` only for one with classifier-free guidance: never silently ignored."""
    use = GUIDANCE_OPTIONS[spec.guidance_kind or "none"]
    scale = getattr(args, "guidance_scale", None)
    unused = spec.unused_guidance(args.guidance, scale, getattr(args, "negative_prompt", None))
    if unused == "guidance":
        raise ConfigError(f"--guidance sets a guidance embedding, which {spec.name} has none of; it takes {use}")
    if unused == "guidance_scale":
        raise ConfigError(f"--guidance-scale {scale:g}: {spec.name} has no classifier-free guidance; it takes {use}")
    if unused == "negative_prompt":
        raise ConfigError(f"--negative-prompt: {spec.name} has no classifier-free guidance; it takes {use}")
