"""Encode once: the latent and conditioning caches of a Glance module, on disk and in memory.

With one (or a few) training pairs, the prompt embeddings and VAE latents are the same every step, so they are
computed once in ``setup``, before the transformer is loaded and before the strategy moves anything to the
device: the text encoders and the transformer never share host or device memory. Sampling prompts are
registered before that and encoded with the captions; once the text encoders are freed, a prompt that was not
encoded is an error, not a reload. Entries also go to an ``EncodeStore`` on disk, so a second run on the same
data loads no text encoder. Mixed into ``GlanceModule``; calls the family hooks ``encode_condition`` (by
default ``encode_prompts``) and ``encode_images``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info

from glance_lightning import console
from glance_lightning.draws import TrainSample
from glance_lightning.encode_store import EncodeStore, tensor_digest
from glance_lightning.errors import ConfigError
from glance_lightning.families.hooks import Conditioning
from glance_lightning.models import TEXT_ENCODERS, cache_dir

ENCODER_NAMES = (*TEXT_ENCODERS, "vae")


class UnencodedPromptError(ConfigError):
    """A prompt asked for after the text encoders were freed, which was not registered before."""


def encoders_of(pipe: object) -> list[torch.nn.Module]:
    """The pipeline's text encoders and VAE (whichever it has)."""
    return [m for m in (getattr(pipe, n, None) for n in ENCODER_NAMES) if m is not None]


class EncodeOnce:
    """The caches (``latent_cache``, ``cond_cache``, ``dropout_cache``, ``prompt_cache``) and encoder placement."""

    def init_caches(self) -> None:
        self.latent_cache: list[torch.Tensor] = []
        self.cond_cache: list[Conditioning] = []
        self.dropout_cache: list[Conditioning] = []
        self.prompt_cache: dict[tuple[str, tuple[str, ...]], Conditioning] = {}
        self._requested_prompts: list[str] = []
        self._encoder_depth = 0
        self._store: EncodeStore | None = None
        self.encoders_freed = False

    def register_prompts(self, prompts: Sequence[str]) -> None:
        """Ask for prompts to be encoded together with the training captions (before encoders are freed)."""
        self._requested_prompts.extend(p for p in prompts if p not in self._requested_prompts)

    # ------------------------------------------------------------------ the disk store
    def encode_store(self) -> EncodeStore | None:
        """The on-disk cache for this model, family options and dtype (None when ``encode_cache`` is null)."""
        setting = self.hparams.encode_cache
        if setting is None:
            return None
        if self._store is None:
            root = cache_dir() / "encoded" if setting == "user" else Path(setting)
            model = self.resolve_model()
            encoders = [c for c in model.components() if c not in ("transformer", "scheduler")]
            context = {"model": model.fingerprint(encoders), "family": self.family, "dtype": self.dtype_name,
                       "options": self.family_options()}
            self._store = EncodeStore(root / self.family, context)
        return self._store

    def _condition_key(self, prompt: str, controls: Sequence[torch.Tensor]) -> tuple[str, tuple[str, ...]]:
        return prompt, tuple(tensor_digest(c) for c in controls)

    def all_encoded(self, samples: Sequence[TrainSample]) -> bool:
        """Whether every latent and conditioning a fit needs is in the disk store (then no text encoder loads)."""
        store = self.encode_store()
        if store is None:
            return False
        latents = [store.key("latents", image=tensor_digest(s.pixels)) for s in samples]
        return all(store.has(k) for k in latents) and self.conditions_stored(self._prompts_needed(samples))

    def conditions_stored(self, wanted: Sequence[tuple[str, Sequence[torch.Tensor]]]) -> bool:
        """Whether every (prompt, control images) conditioning is in the disk store."""
        store = self.encode_store()
        if store is None:
            return False
        keys = [store.key("condition", prompt=p, controls=d)
                for p, d in (self._condition_key(prompt, controls) for prompt, controls in wanted)]
        return all(store.has(k) for k in keys)

    @contextmanager
    def encoding_on(self, device: torch.device | str) -> Iterator[None]:
        """Let the encode hooks see ``device`` as ``self.device`` before the module itself is moved there."""
        previous, self._device = self._device, torch.device(device)  # what self.device reports to the hooks
        try:
            yield
        finally:
            self._device = previous

    def _prompts_needed(self, samples: Sequence[TrainSample]) -> list[tuple[str, tuple[torch.Tensor, ...]]]:
        wanted = [(s.caption, s.controls) for s in samples]
        if self.hparams.caption_dropout > 0:
            wanted += [(self.hparams.dropout_prompt, s.controls) for s in samples]
        for prompt in self._requested_prompts:  # edit families encode a prompt with each sample's controls
            wanted += [(prompt, s.controls) for s in samples]
        return wanted

    # ------------------------------------------------------------------ building the caches
    def encode_for_fit(self, samples: Sequence[TrainSample], trainer: Any) -> None:
        """Load what encoding needs and build the caches. With several processes and a disk store, each node's
        local rank 0 encodes and fills the store while the other ranks wait at a barrier, then read it back
        (loading the VAE only); without a store every rank encodes for itself."""
        shared = trainer.world_size > 1 and self.encode_store() is not None
        first = not shared or trainer.local_rank == 0
        if first:
            self._load_and_encode(samples, trainer.strategy.root_device)
        if shared:
            trainer.strategy.barrier("glance_lightning_encode")  # the store is complete on this node
        if not first:
            self._load_and_encode(samples, trainer.strategy.root_device)
            store = self.encode_store()
            console.info(f"read {store.hits} encoding(s) from {store.root} (written by local rank 0), encoded "
                         f"{store.misses}", every_rank=True)

    def _load_and_encode(self, samples: Sequence[TrainSample], device: torch.device) -> None:
        if self._pipe is None:
            self.load_encoders(text_encoders=not self.all_encoded(samples))
        self.encode_before_transformer_moves(samples, device)

    def encode_before_transformer_moves(self, samples: Sequence[TrainSample], device: torch.device) -> None:
        """Build the caches on the training device while nothing has been moved there yet (``setup`` runs before
        the strategy moves the module), so the fit's peak memory is training's, not encoder + transformer."""
        with self.encoding_on(device):
            self.build_cache(samples)

    @torch.no_grad()
    def build_cache(self, samples: Sequence[TrainSample]) -> None:
        """Encode (or read back) every training sample and requested prompt once."""
        started = time.perf_counter()
        rank_zero_info(f"glance_lightning: encoding {len(samples)} sample(s) and "
                       f"{len(self._requested_prompts)} sampling prompt(s) once ...")
        with self.timed("encode"), self.encoders_on_device():
            self.latent_cache = [self.encode_sample_latents(s) for s in samples]
            for prompt, controls in self._prompts_needed(samples):
                self.conditioning_for(prompt, controls)
            self.cond_cache = [self.conditioning_for(s.caption, s.controls) for s in samples]
            self.dropout_cache = [
                self.conditioning_for(self.hparams.dropout_prompt, s.controls) for s in samples
            ] if self.hparams.caption_dropout > 0 else []
        store = self.encode_store()
        reused = f" ({store.hits} read back from {store.root})" if store is not None and store.hits else ""
        rank_zero_info(f"glance_lightning: encoded in {time.perf_counter() - started:.1f}s{reused}; "
                       f"training {self.phase_steps['slow']} slow + {self.phase_steps['fast']} fast steps, "
                       f"{self.glance_timesteps.describe()}")

    def encode_sample_latents(self, item: TrainSample) -> torch.Tensor:
        store = self.encode_store()
        key = store.key("latents", image=tensor_digest(item.pixels)) if store is not None else None
        stored = store.get(key) if store is not None else None
        if stored is not None:
            return stored["latents"].to(self.device)
        pixels = item.pixels.unsqueeze(0).to(self.device, self.pipe.vae.dtype)
        latents = self.encode_images(pixels).float()
        if store is not None:
            store.put(key, {"latents": latents})
        return latents

    def conditioning_for(self, prompt: str, controls: Sequence[torch.Tensor] = ()) -> Conditioning:
        """Conditioning of a prompt (with control images [3, H, W] in [-1, 1] for edit families), cached in
        memory and in the disk store."""
        low, high = self.family_spec.control_images
        if not low <= len(controls) <= high:
            if high == 0:
                raise ConfigError(f"{self.family} takes no control images; use an edit family for image/ + control/")
            raise ConfigError(f"{self.family} takes {low} to {high} control image(s), got {len(controls)}")
        key = self._condition_key(prompt, controls)
        if key not in self.prompt_cache:
            self.prompt_cache[key] = self._encoded_condition(prompt, controls, key)
        return self.prompt_cache[key]

    def _encoded_condition(self, prompt: str, controls: Sequence[torch.Tensor],
                           key: tuple[str, tuple[str, ...]]) -> Conditioning:
        store = self.encode_store()
        store_key = store.key("condition", prompt=key[0], controls=key[1]) if store is not None else None
        stored = store.get(store_key) if store is not None else None
        if stored is not None:
            return {k: v if k in self.host_condition_keys else v.to(self.device) for k, v in stored.items()}
        if self.encoders_freed or not any(getattr(self.pipe, n, None) is not None for n in TEXT_ENCODERS):
            raise UnencodedPromptError(
                f"prompt {prompt!r} was not encoded before the text encoders were freed; list it among the "
                "ChainedSampleCallback prompts (or register_prompts before setup) so it is encoded with the captions"
            )
        with self.encoders_on_device(), torch.no_grad():
            cond = {k: v.detach() for k, v in self.encode_condition(prompt, controls).items()}
        if store is not None:
            store.put(store_key, cond)
        return cond

    def encode_condition(self, prompt: str, controls: Sequence[torch.Tensor]) -> Conditioning:
        """Family hook: the conditioning of one prompt (edit families override it to add their controls)."""
        return self.encode_prompts([prompt])

    # ------------------------------------------------------------------ placement
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
