"""Loading a family's base model and putting the two LoRA adapters on its frozen transformer.

One ``from_pretrained`` of the family's pipeline (``glance_lightning.models``), text encoders, VAE and
transformer frozen, the attention backend, gradient checkpointing and regional compile applied
(``glance_lightning.performance``), then the "slow" and "fast" peft adapters added with one LoRA shape.
Mixed into ``GlanceModule``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from peft import LoraConfig

from glance_lightning import performance as perf_ops
from glance_lightning.families.encoding import encoders_of
from glance_lightning.families.preflight import PHASES
from glance_lightning.models import load_pipeline, resolve_pretrained


class AdaptedBaseModel:
    """``load_base_model``, the adapters and the switches around the transformer's forward pass."""

    def lora_config(self) -> LoraConfig:
        s = self.lora_settings
        return LoraConfig(
            r=s.rank,
            lora_alpha=s.alpha,
            lora_dropout=s.dropout,
            init_lora_weights="gaussian" if s.init == "gaussian" else True,
            target_modules=list(s.targets or self.default_lora_targets),
        )

    def load_base_model(self, with_adapters: bool = True) -> None:
        """One ``from_pretrained`` of the whole pipeline; adds the two adapters to the frozen transformer
        (``with_adapters=False`` for sampling with LoRA files loaded by ``load_glance_loras``)."""
        if self._pipe is not None:
            return
        with self.timed("load"):
            self._load_base_model(with_adapters)

    def _load_base_model(self, with_adapters: bool) -> None:
        started = time.perf_counter()
        rank_zero_info(f"glance_lightning: loading {self.hparams.pretrained_model} ...")
        path = resolve_pretrained(self.hparams.pretrained_model)
        if torch.cuda.is_available():
            # cuDNN's SDPA backward fails for FLUX-sized shapes on H100 (mha_graph.execute / CUBLAS errors);
            # flash / memory-efficient SDPA are as fast there, so it is never selected.
            torch.backends.cuda.enable_cudnn_sdp(False)
        dtype = getattr(torch, self.dtype_name)
        quantization = perf_ops.quantization_config(self.perf.base_quantization, dtype)
        pipe = load_pipeline(self.family_spec, path, dtype, quantization)
        for module in encoders_of(pipe):
            module.requires_grad_(False).eval()
        transformer = pipe.transformer
        transformer.requires_grad_(False)
        perf_ops.set_dispatcher_backend(transformer, self.perf.attention_backend)
        self._pipe, self.transformer = pipe, transformer
        rank_zero_info(f"glance_lightning: loaded {type(pipe).__name__} in {time.perf_counter() - started:.1f}s")
        if not with_adapters:
            return
        config = self.lora_config()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config`")
            for phase in PHASES:
                transformer.add_adapter(config, adapter_name=phase)
        transformer.train()
        self._speed_up_training(transformer)
        # Both adapters stay trainable until the first step so that DDP registers (and all-reduces) both;
        # set_phase then lets peft freeze the inactive one.
        for phase in PHASES:
            for param in self.adapter_parameters(phase):
                param.requires_grad_(True)
        self._active_adapter = None

    def _speed_up_training(self, transformer: torch.nn.Module) -> None:
        perf = self.perf
        if perf.gradient_checkpointing:
            chosen = perf_ops.enable_checkpointing(transformer, self.repeated_blocks,
                                                      float(perf.gradient_checkpointing), perf.checkpoint_policy)
            rank_zero_info(f"glance_lightning: gradient checkpointing ({perf.checkpoint_policy}) on {len(chosen)} "
                           "transformer blocks")
        if perf.compile_blocks:
            count = perf_ops.compile_blocks(transformer, self.repeated_blocks, perf.compile_backend)
            rank_zero_info(f"glance_lightning: {count} transformer blocks compiled ({perf.compile_backend})")

    def attention(self) -> Any:
        """Context every transformer forward runs in (the configured SDPA kernels)."""
        return perf_ops.attention_context(self.perf.attention_backend)

    def set_phase(self, phase: str) -> None:
        """Activate one adapter (peft also makes only it trainable)."""
        if phase != self._active_adapter:
            self.transformer.set_adapter(phase)
            self._active_adapter = phase

    def adapter_parameters(self, phase: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.transformer.named_parameters() if f".{phase}." in n and "lora_" in n]
