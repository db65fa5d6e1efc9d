"""Put a stock diffusers pipeline on the exact Glance chain.

``use_exact_chain(pipe)`` swaps in a FlowMatchEulerDiscreteScheduler that uses given sigmas unshifted
(no dynamic shift, shift 1, no terminal stretch); ``load_glance_loras`` loads a Slow/Fast pair as two named
adapters and reads the chain from their metadata; ``chained_call`` runs ONE pipeline call over
slow + fast sigmas (the pipeline appends the terminal 0) and switches adapters at the boundary.

    pipe = FluxPipeline.from_pretrained(path)
    chain = load_glance_loras(pipe, "run/slow", "run/fast")
    image = chained_call(pipe, chain, prompt="a red ball", height=1024, width=1024).images[0]
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler

from glance_lightning.lora_io import lora_file, read_glance_metadata
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

    def sigmas(self) -> list[float]:
        return [*self.timesteps.slow, *self.timesteps.fast]


def read_pair_metadata(slow: str | os.PathLike, fast: str | os.PathLike) -> tuple[dict | None, dict | None]:
    """Glance metadata of both files; refuses a pair trained for different families or base models."""
    slow_meta, fast_meta = read_glance_metadata(slow), read_glance_metadata(fast)
    if slow_meta and fast_meta:
        for key in ("family", "base_model"):
            if slow_meta.get(key) != fast_meta.get(key):
                raise ValueError(
                    f"the Slow LoRA {lora_file(slow)} was trained for {key} {slow_meta.get(key)!r} but the Fast "
                    f"LoRA {lora_file(fast)} for {fast_meta.get(key)!r}; use two LoRAs from the same run"
                )
        for phase, meta in (("slow", slow_meta), ("fast", fast_meta)):
            if meta.get("phase") not in (None, phase):
                raise ValueError(f"{phase} LoRA file holds the {meta.get('phase')!r} adapter; swap the two paths")
    return slow_meta, fast_meta


def pair_timesteps(slow_meta: dict | None, fast_meta: dict | None, fallback: GlanceTimesteps | None) -> GlanceTimesteps:
    """The chain from the files' metadata, else ``fallback`` (for LoRAs written by other tools)."""
    if slow_meta and fast_meta:
        return GlanceTimesteps.from_lists(slow_meta["timesteps"], fast_meta["timesteps"], "timesteps")
    if fallback is None:
        raise ValueError("these LoRAs carry no Glance timestep metadata; pass the slow/fast timestep lists")
    return fallback


def load_glance_loras(
    pipe: Any, slow: str | os.PathLike, fast: str | os.PathLike, timesteps: GlanceTimesteps | None = None,
    adapters: tuple[str, str] = ("slow", "fast"),
) -> GlanceLoras:
    """Load both LoRAs into ``pipe`` as named adapters and put the pipeline on the exact chain."""
    slow_meta, fast_meta = read_pair_metadata(slow, fast)
    chain = pair_timesteps(slow_meta, fast_meta, timesteps)
    for name, path in zip(adapters, (slow, fast)):
        file = lora_file(path)
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    use_exact_chain(pipe)
    meta = slow_meta or {}
    metadata = {"slow": slow_meta, "fast": fast_meta}
    return GlanceLoras(chain, meta.get("family"), meta.get("base_model"), adapters, metadata)


def chained_call(pipe: Any, loras: GlanceLoras, **kwargs: Any) -> Any:
    """One pipeline call over the whole chain; the Fast adapter takes over after the last Slow step."""
    if not isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler) or pipe.scheduler.config.use_dynamic_shifting:
        use_exact_chain(pipe)
    for key in ("sigmas", "num_inference_steps", "timesteps"):
        if key in kwargs:
            raise ValueError(f"chained_call sets {key} from the Glance chain; do not pass it")
    user_callback: Callable | None = kwargs.pop("callback_on_step_end", None)
    num_slow = len(loras.timesteps.slow)
    slow_name, fast_name = loras.adapters

    def switch(p: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
        if step == num_slow - 1:
            p.set_adapters(fast_name)
        return user_callback(p, step, timestep, callback_kwargs) if user_callback else {}

    pipe.set_adapters(slow_name)
    sigmas = loras.sigmas()
    return pipe(sigmas=sigmas, num_inference_steps=len(sigmas), callback_on_step_end=switch, **kwargs)


