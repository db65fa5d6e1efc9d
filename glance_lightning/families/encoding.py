"""Encode once: the latent and conditioning caches of a Glance module, and where its encoders sit.

With one (or a few) training pairs, the prompt embeddings and VAE latents are the same every step, so they are
computed once in ``setup``, before the strategy moves the transformer to the device: the text encoders and the
transformer never share the accelerator. Sampling prompts are registered before that and encoded with the
captions. Mixed into ``GlanceModule``; uses only the family hooks ``encode_prompts``/``encode_images``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from lightning.pytorch.utilities import rank_zero_info

from glance_lightning.draws import TrainSample
from glance_lightning.families.hooks import Conditioning

ENCODER_NAMES = ("text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def encoders_of(pipe: object) -> list[torch.nn.Module]:
    """The pipeline's text encoders and VAE (whichever it has)."""
    return [m for m in (getattr(pipe, n, None) for n in ENCODER_NAMES) if m is not None]


class EncodeOnce:
    """The caches (``latent_cache``, ``cond_cache``, ``dropout_cache``, ``prompt_cache``) and encoder placement."""

    def init_caches(self) -> None:
        self.latent_cache: list[torch.Tensor] = []
        self.cond_cache: list[Conditioning] = []
        self.dropout_cache: list[Conditioning] = []
        self.prompt_cache: dict[str, Conditioning] = {}
        self._requested_prompts: list[str] = []
        self._encoder_depth = 0

    def register_prompts(self, prompts: Sequence[str]) -> None:
        """Ask for prompts to be encoded together with the training captions (before encoders go off-device)."""
        self._requested_prompts.extend(p for p in prompts if p not in self._requested_prompts)

    def encode_before_transformer_moves(self, samples: Sequence[TrainSample], device: torch.device) -> None:
        """Build the cache on the training device while the transformer is still on the CPU (``setup`` runs
        before the strategy moves the module), so the fit's peak memory is training's, not encoder + transformer."""
        previous, self._device = self._device, device  # what self.device reports to the encode hooks
        try:
            self.build_cache(samples)
        finally:
            self._device = previous

    @torch.no_grad()
    def build_cache(self, samples: Sequence[TrainSample]) -> None:
        """Encode every training sample and requested prompt once, then move the encoders off the device."""
        started = time.perf_counter()
        rank_zero_info(f"glance_lightning: encoding {len(samples)} sample(s) and "
                       f"{len(self._requested_prompts)} sampling prompt(s) once ...")
        with self.timed("encode"), self.encoders_on_device():
            self.latent_cache = [self.encode_sample_latents(s).to(self.device) for s in samples]
            for prompt in self._requested_prompts:  # edit families encode a prompt with each sample's controls
                for item in samples:
                    self.conditioning_for(prompt, item.controls)
            self.cond_cache = [self.conditioning_for(s.caption, s.controls) for s in samples]
            self.dropout_cache = [
                self.conditioning_for(self.hparams.dropout_prompt, s.controls) for s in samples
            ] if self.hparams.caption_dropout > 0 else []
        rank_zero_info(f"glance_lightning: encoded in {time.perf_counter() - started:.1f}s; "
                       f"training {self.phase_steps['slow']} slow + {self.phase_steps['fast']} fast steps, "
                       f"{self.glance_timesteps.describe()}")

    def encode_sample_latents(self, item: TrainSample) -> torch.Tensor:
        pixels = item.pixels.unsqueeze(0).to(self.device, self.pipe.vae.dtype)
        return self.encode_images(pixels).float()

    def conditioning_for(self, prompt: str, controls: Sequence[torch.Tensor] = ()) -> Conditioning:
        """Conditioning of a prompt, cached. Edit families override this to add their control images
        (pixels [3, H, W] in [-1, 1]); text-to-image families refuse control images."""
        if controls:
            raise ValueError(f"{self.family} takes no control images; use an edit family for image/ + control/")
        return self.encode_prompts_cached([prompt])[0]

    def encode_prompts_cached(self, prompts: Sequence[str]) -> list[Conditioning]:
        missing = [p for p in dict.fromkeys(prompts) if p not in self.prompt_cache]
        if missing:
            with self.encoders_on_device(), torch.no_grad():
                for prompt in missing:
                    cond = self.encode_prompts([prompt])
                    self.prompt_cache[prompt] = {k: v.detach() for k, v in cond.items()}
        return [self.prompt_cache[p] for p in prompts]

    def _encoders(self) -> list[torch.nn.Module]:
        return encoders_of(self.pipe)

    @contextmanager
    def encoders_on_device(self) -> Iterator[None]:
        """Bring text encoders and VAE to the training device for the duration of the block (re-entrant)."""
        self._encoder_depth += 1
        if self._encoder_depth == 1:
            for module in self._encoders():
                module.to(self.device)
        try:
            yield
        finally:
            self._encoder_depth -= 1
            if self._encoder_depth == 0 and self.hparams.offload_encoders and self.device.type != "cpu":
                for module in self._encoders():
                    module.to("cpu")
                torch.cuda.empty_cache() if self.device.type == "cuda" else None
