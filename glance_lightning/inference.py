"""Put a stock diffusers pipeline on the exact Glance chain.

``use_exact_chain(pipe)`` swaps in a FlowMatchEulerDiscreteScheduler that uses given sigmas unshifted
(no dynamic shift, shift 1, no terminal stretch); ``load_glance_loras`` loads a Slow/Fast pair as two named
adapters and reads the chain from their metadata; ``chained_call`` runs ONE pipeline call over
slow + fast sigmas (the pipeline appends the terminal 0) and switches adapters at the boundary.

LoRA files are read by ``glance_lightning.lora_layouts.read_lora_modules`` (our files and exports, ComfyUI, kohya,
OneTrainer, ai-toolkit and the official releases' layouts; any other layout through diffusers' own converters),
alpha/rank folded in, times ``lora_scale``, and handed to the pipeline's ``load_lora_weights``.

    pipe = FluxPipeline.from_pretrained(path)
    chain = load_glance_loras(pipe, "run/slow", "run/fast")
    image = chained_call(pipe, chain, prompt="a red ball", height=1024, width=1024).images[0]
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from glance_lightning.errors import ConfigError
from glance_lightning.lora_io import lora_file, read_glance_metadata
from glance_lightning.lora_layouts import (
    LoraFile,
    LoraLayoutError,
    ReadInfo,
    read_lora,
    read_lora_modules,
    to_diffusers_state_dict,
)
from glance_lightning.registry import FamilySpec, family_names, get_family
from glance_lightning.timesteps import GlanceTimesteps

EXACT_SCHEDULER_OVERRIDES = {
    "use_dynamic_shifting": False,
    "shift": 1.0,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "stochastic_sampling": False,
}


def exact_scheduler(config: Any) -> FlowMatchEulerDiscreteScheduler:
    """A scheduler that steps through exactly the sigmas it is given (then 0)."""
    return FlowMatchEulerDiscreteScheduler.from_config(config, **EXACT_SCHEDULER_OVERRIDES)


def use_exact_chain(pipe: Any) -> Any:
    """Reconfigure ``pipe.scheduler`` in place so given sigmas are used unshifted; returns the pipeline."""
    pipe.scheduler = exact_scheduler(pipe.scheduler.config)
    return pipe


@dataclass
class GlanceLoras:
    """A loaded Slow/Fast pair: the adapter names in the pipeline and the chain they were trained for."""

    timesteps: GlanceTimesteps
    family: str | None
    base_model: str | None
    adapters: tuple[str, str] = ("slow", "fast")
    metadata: dict[str, Any] = field(default_factory=dict)
    lora_scale: float = 1.0  # multiplies both LoRAs' weight change (folded into lora_B when loaded)
    read: dict[str, ReadInfo] = field(default_factory=dict)  # how each file was read ("slow", "fast")

    def sigmas(self) -> list[float]:
        return [*self.timesteps.slow, *self.timesteps.fast]


PAIR_KEYS = {"run_id": "run", "base_model": "base model", "schedule": "Slow/Fast lists"}
ALLOW_MIXED = "--allow-mixed-pair"  # the sample command's override, named in the refusal


def pair_differences(slow_meta: dict, fast_meta: dict) -> list[str]:
    """What says two LoRA files do not come from one run: another run id, base model or pair of lists (a key
    only one file records is not compared)."""
    return [f"{label} {slow_meta[key]!r} vs {fast_meta[key]!r}" for key, label in PAIR_KEYS.items()
            if key in slow_meta and key in fast_meta and slow_meta[key] != fast_meta[key]]


def read_pair_metadata(slow: str | os.PathLike, fast: str | os.PathLike,
                       allow_mixed: bool = False) -> tuple[dict | None, dict | None]:
    """Glance metadata of both files. Refuses a pair trained for different families or swapped, and one of two
    runs (another run id, base model or lists) unless ``allow_mixed``: then each file's own list is used."""
    slow_meta, fast_meta = read_glance_metadata(slow), read_glance_metadata(fast)
    if slow_meta and fast_meta:
        if slow_meta.get("family") != fast_meta.get("family"):
            raise ConfigError(
                f"the Slow LoRA {lora_file(slow)} was trained for family {slow_meta.get('family')!r} but the Fast "
                f"LoRA {lora_file(fast)} for {fast_meta.get('family')!r}; use two LoRAs from the same run"
            )
        phases = slow_meta.get("phase"), fast_meta.get("phase")
        if phases[0] is not None and phases[0] == phases[1]:
            raise ConfigError(f"the Slow LoRA {lora_file(slow)} and the Fast LoRA {lora_file(fast)} both hold the "
                              f"{phases[0]!r} adapter; give the run's slow/ and fast/ LoRAs, one each")
        for phase, meta in (("slow", slow_meta), ("fast", fast_meta)):
            if meta.get("phase") not in (None, phase):
                raise ConfigError(f"{phase} LoRA file holds the {meta.get('phase')!r} adapter; swap the two paths")
        differences = pair_differences(slow_meta, fast_meta)
        if differences and not allow_mixed:
            raise ConfigError(
                f"the Slow LoRA {lora_file(slow)} and the Fast LoRA {lora_file(fast)} are not from one run "
                f"({'; '.join(differences)}); use both LoRAs of one run, or sample the mixed pair anyway with "
                f"{ALLOW_MIXED} (each LoRA over its own list)")
    return slow_meta, fast_meta


def pair_timesteps(slow_meta: dict | None, fast_meta: dict | None, fallback: GlanceTimesteps | None) -> GlanceTimesteps:
    """The chain from the files' metadata, else ``fallback`` (for LoRAs written by other tools)."""
    if slow_meta and fast_meta:
        return GlanceTimesteps.from_lists(slow_meta["timesteps"], fast_meta["timesteps"], "timesteps")
    if fallback is None:
        raise ConfigError("these LoRAs carry no Glance timestep metadata; pass the slow/fast timestep lists")
    return fallback


def pipeline_class_name(spec: FamilySpec) -> str:
    """The family's diffusers pipeline class name, without importing it."""
    return spec.pipeline_name


def family_of_pipeline(pipe: Any) -> str | None:
    """The registered family whose pipeline class ``pipe`` is (or derives from), or None."""
    for cls in type(pipe).__mro__:
        for name in family_names():
            if pipeline_class_name(get_family(name)) == cls.__name__:
                return name
    return None


def family_of_model(model: str) -> tuple[str | None, str | None]:
    """(family, pipeline class) of a ``--model`` before anything is loaded: the family in a ``tiny:<family>`` name,
    else the registered family whose pipeline is the folder's ``model_index.json`` ``_class_name`` (family None when
    no family uses that class; both None when the folder has no readable model_index.json)."""
    from glance_lightning.models import TINY_PREFIX, is_tiny

    if is_tiny(model):
        family = model[len(TINY_PREFIX):]
        return family, pipeline_class_name(get_family(family)) if family in family_names() else None
    index = Path(model).expanduser() / "model_index.json"
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError):
        return None, None
    matches = [n for n in family_names() if pipeline_class_name(get_family(n)) == class_name]
    return (matches[0] if matches else None), class_name


def transformer_module_names(pipe: Any) -> set[str]:
    return {name for name, _ in pipe.transformer.named_modules() if name}


def load_lora_file(pipe: Any, path: str | os.PathLike, adapter_name: str, family: str,
                   lora_scale: float = 1.0) -> ReadInfo:
    """Load one LoRA file into ``pipe`` as ``adapter_name`` at ``lora_scale`` times its trained strength."""
    lora = read_lora(path)
    names = transformer_module_names(pipe)
    try:
        modules, info = read_lora_modules(lora, family, names)
    except LoraLayoutError as ours:
        try:  # another trainer's layout: diffusers' own converters (xlabs, BFL control, fal, ...)
            converted = type(pipe).lora_state_dict(dict(lora.tensors), return_alphas=True)
            state, alphas = converted if isinstance(converted, tuple) else (converted, None)
            state = {**state, **{k if k.endswith(".alpha") else f"{k}.alpha": v for k, v in (alphas or {}).items()}}
            modules, info = read_lora_modules(LoraFile(lora.path, state, {}), family, names)
        except Exception as theirs:  # any failure of a foreign converter: report both
            raise LoraLayoutError(f"cannot read {lora.path} as a {family} transformer LoRA: {ours}; diffusers' "
                                  f"converters: {theirs}") from None
        info = ReadInfo("diffusers converter", info.alpha)
    pipe.load_lora_weights(to_diffusers_state_dict(modules, lora_scale), adapter_name=adapter_name)
    return info


def load_glance_loras(
    pipe: Any, slow: str | os.PathLike, fast: str | os.PathLike, timesteps: GlanceTimesteps | None = None,
    adapters: tuple[str, str] = ("slow", "fast"), lora_scale: float = 1.0, family: str | None = None,
    allow_mixed: bool = False,
) -> GlanceLoras:
    """Load both LoRAs into ``pipe`` as named adapters (at ``lora_scale`` times their trained strength) and put
    the pipeline on the exact chain. ``family`` defaults to the LoRAs' metadata, else the pipeline's class; a pair
    of two runs is refused unless ``allow_mixed`` (``read_pair_metadata``)."""
    slow_meta, fast_meta = read_pair_metadata(slow, fast, allow_mixed)
    chain = pair_timesteps(slow_meta, fast_meta, timesteps)
    family = family or (slow_meta or {}).get("family") or family_of_pipeline(pipe)
    if family is None:
        raise ConfigError(f"{type(pipe).__name__} is no registered family's pipeline; pass family=")
    read = {}
    for name, path in zip(adapters, (slow, fast)):
        read[name] = load_lora_file(pipe, path, name, family, lora_scale)
    use_exact_chain(pipe)
    meta = slow_meta or {}
    metadata = {"slow": slow_meta, "fast": fast_meta}
    return GlanceLoras(chain, meta.get("family") or family, meta.get("base_model"), adapters, metadata, lora_scale,
                       dict(zip(("slow", "fast"), read.values())))


def chained_call(pipe: Any, loras: GlanceLoras, **kwargs: Any) -> Any:
    """One pipeline call over the whole chain; the Fast adapter takes over after the last Slow step."""
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) or pipe.scheduler.config.use_dynamic_shifting:
        use_exact_chain(pipe)
    for key in ("sigmas", "num_inference_steps", "timesteps"):
        if key in kwargs:
            raise ConfigError(f"chained_call sets {key} from the Glance chain; do not pass it")
    user_callback: Callable | None = kwargs.pop("callback_on_step_end", None)
    num_slow = len(loras.timesteps.slow)
    slow_name, fast_name = loras.adapters

    def switch(p: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if step == num_slow - 1:
            p.set_adapters(fast_name)
        return user_callback(p, step, timestep, callback_kwargs) if user_callback else {}

    if "use_kv_cache" in inspect.signature(pipe.__call__).parameters:
        # A pipeline that caches the prompt's keys and values after the first step (Qwen-Image 2.x) would keep the
        # Slow adapter's after the switch: the Fast steps must see their own.
        kwargs.setdefault("use_kv_cache", False)
    pipe.set_adapters(slow_name)
    sigmas = loras.sigmas()
    return pipe(sigmas=sigmas, num_inference_steps=len(sigmas), callback_on_step_end=switch, **kwargs)


