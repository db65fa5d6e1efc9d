"""Full-size training and sampling without downloads, for the benchmarks: the registry's real transformer
architecture (``FamilySpec.architecture``, what ``plan`` simulates) built once with random weights and handed to
every run from memory, with training inputs at its real widths.

The rest of the pipeline (VAE, text encoders, tokenizers) stays the tiny model's; in a run, the family's own
planner hooks stand in for them, exactly as in ``plan``: latents of ``latent_shape`` with the published VAEs'
16 channels and factor 8, prompt embeddings of ``planned_prompt_embeds`` (the real text widths and token counts).
``shrunk`` keeps the architecture's kind but makes it CPU-sized (the dry runs and tests).
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from glance_lightning.families import loading
from glance_lightning.planner.memory import LATENT_CHANNELS, VAE_FACTOR
from glance_lightning.registry import get_family

# Widths and depths of a CPU-sized stand-in for any registered architecture (keys a config lacks are left out).
SHRUNK = {"num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
          "axes_dims_rope": [4, 6, 6], "joint_attention_dim": 48, "pooled_projection_dim": 40,
          "caption_projection_dim": 32, "pos_embed_max_size": 32}


def architecture(family: str, shrunk: bool = False) -> dict[str, Any]:
    """The family's full-size transformer config from the registry (``shrunk``: CPU-sized, same class)."""
    arch = get_family(family).architecture
    if arch is None:
        raise SystemExit(f"family {family!r} declares no full-size architecture (FamilySpec.architecture)")
    arch = dict(arch)
    if shrunk:
        arch.update({k: v for k, v in SHRUNK.items() if k in arch})
        arch.update({k: [] for k in ("dual_attention_layers",) if k in arch})
    return arch


def _class_and_config(arch: Mapping[str, Any]) -> tuple[type, dict[str, Any]]:
    import diffusers

    config = dict(arch)
    return getattr(diffusers, config.pop("_class_name")), config


class KeptTransformer:
    """One transformer of ``arch`` with random weights, built once on ``device`` in ``dtype``; ``fresh()`` gives
    each run its own module over the same weight tensors (no copy, no disk), so that adapters, checkpointing and
    compile of one run never reach the next. The frozen weights are shared: runs only train LoRAs."""

    def __init__(self, arch: Mapping[str, Any], device: str, dtype: torch.dtype, seed: int = 0) -> None:
        self.arch, self.dtype = dict(arch), dtype
        self.cls, self.config = _class_and_config(arch)
        torch.manual_seed(seed)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(device):
                model = self.cls(**self.config)
        finally:
            torch.set_default_dtype(previous)
        self.state: dict[str, torch.Tensor] = model.state_dict()
        self.parameters = sum(p.numel() for p in model.parameters())
        self._folder: Path | None = None

    def fresh(self, device: str | torch.device | None = None) -> torch.nn.Module:
        """A new module of the kept architecture whose weights are the kept tensors (moved to ``device`` if
        they live elsewhere; computed non-persistent buffers in the kept dtype, as ``from_pretrained`` gives)."""
        from accelerate import init_empty_weights

        with init_empty_weights():
            model = self.cls(**self.config)
        model.load_state_dict(self.state, strict=True, assign=True)
        place = device or next(iter(self.state.values())).device
        return torch.nn.Module.to(model, device=place, dtype=self.dtype).eval()  # diffusers' .to warns on dtype

    def to_host(self) -> None:
        """Move the kept weights to host memory (before runs that quantise or offload the base, so that the
        device holds only what the run itself keeps)."""
        self.state = {k: v.to("cpu") for k, v in self.state.items()}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def folder(self, root: Path) -> Path:
        """The kept transformer written once as a diffusers folder under ``root``: for a quantised base, which
        diffusers quantises while reading (``from_pretrained(quantization_config=...)``)."""
        if self._folder is None:
            self._folder = root / "full-size-transformer"
            self.fresh("cpu").save_pretrained(self._folder)
        return self._folder

    def release(self) -> None:
        self.state = {}
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@contextlib.contextmanager
def serving(kept: KeptTransformer, scratch: Path) -> Iterator[None]:
    """Every module loading its transformer inside this block gets ``kept.fresh()`` on the device it asks for
    (a fit's CUDA device), else where the kept weights are; or, with a quantised base, the kept weights read
    through diffusers' quantising loader from ``kept.folder(scratch)``."""
    real = loading.load_transformer

    def load(model: Any, dtype: torch.dtype, quantization: Any = None, override: str | None = None,
             device: str | None = None) -> torch.nn.Module:
        if quantization is not None:
            return real(model, dtype, quantization, str(kept.folder(scratch)), device)
        if dtype != kept.dtype:
            raise SystemExit(f"the kept transformer is {kept.dtype}; the run asks for {dtype}")
        return kept.fresh(device)

    loading.load_transformer = load
    try:
        yield
    finally:
        loading.load_transformer = real


def real_width_inputs(module: Any, arch: Mapping[str, Any], text_tokens: int, seed: int = 0) -> None:
    """Make ``module`` (a GlanceModule, before it encodes anything) encode at the full-size widths: latents of the
    published VAEs' shape, prompt embeddings of ``planned_prompt_embeds`` with ``text_tokens`` tokens (seeded,
    random: timing and memory do not depend on the values)."""
    generator = torch.Generator().manual_seed(seed)

    def latent_shape(height: int, width: int) -> tuple[int, int, int]:
        return (LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR)

    # On the module's device, as the real encoders answer inside ``encoders_on_device``.
    def encode_images(pixels: torch.Tensor) -> torch.Tensor:
        shape = (pixels.shape[0], *latent_shape(pixels.shape[-2], pixels.shape[-1]))
        return torch.randn(shape, generator=generator).to(module.device)

    def encode_prompts(prompts: Any) -> dict[str, torch.Tensor]:
        count = 1 if isinstance(prompts, str) else len(prompts)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            one = module.planned_prompt_embeds(text_tokens, arch)
        return {k: torch.cat([v] * count).to(module.device) for k, v in one.items()}

    module.latent_shape, module.encode_images, module.encode_prompts = latent_shape, encode_images, encode_prompts
