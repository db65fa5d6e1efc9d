"""Loading a family's base model and putting the two LoRA adapters on its frozen transformer.

In stages (``glance_lightning.models``), so host memory holds one large component at a time: the pipeline
without its transformer (VAE, text encoders unless every prompt is cached), the text encoders freed once the
data is encoded, then the frozen transformer (quantised on load where configured) with the attention backend,
gradient checkpointing and regional compile applied (``glance_lightning.performance``) and the "slow" and "fast"
peft adapters added with one LoRA shape.
Mixed into ``GlanceModule``.
"""

from __future__ import annotations

import dataclasses
import gc
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info
from peft import LoraConfig

from glance_lightning import console, lora_init, shard_loading, sharding
from glance_lightning import performance as perf_ops
from glance_lightning.errors import ConfigError
from glance_lightning.families.encoding import encoders_of
from glance_lightning.families.preflight import PHASES
from glance_lightning.model_schedule import ModelSchedule, read_model_schedule
from glance_lightning.models import (
    TEXT_ENCODERS,
    ModelNotFoundError,
    ResolvedModel,
    check_model_family,
    load_pipeline,
    load_transformer,
    read_json,
    resolve_pretrained,
    transformer_class,
    transformer_module_names,
)


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

    def resolve_model(self) -> ResolvedModel:
        """What ``pretrained_model`` names (fetched from the hub once, without an overridden transformer)."""
        if self._resolved is None:
            skip = ("transformer",) if self.transformer_override else ()
            self._resolved = resolve_pretrained(self.hparams.pretrained_model, skip=skip)
            check_model_family(self._resolved, self.family_spec)
            self.adopt_model_schedule(read_model_schedule(self._resolved.path, self.family))
        return self._resolved

    def adopt_model_schedule(self, schedule: ModelSchedule) -> None:
        """Derived lists are read off the loaded model's own schedule (``glance_lightning.model_schedule``); one
        line when it differs from the family's built-in one (also for given lists, which stay as given)."""
        builtin, self.model_schedule = self.model_schedule, schedule
        changed = schedule.differences(builtin)
        if not changed:
            return
        what = f"the model's scheduler differs from the built-in {self.family} one ({'; '.join(changed)})"
        if not self.timestep_settings.derived:
            if self.attached_trainer() is not None:
                console.info(f"{what}; model.timesteps gives the lists, used as given")
            return
        self.glance_timesteps = self.timestep_settings.resolve(self.family, self.hparams.get("resolution"), schedule)
        lists = {phase: [round(t, 4) for t in values] for phase, values in self.glance_timesteps.as_timesteps().items()}
        console.info(f"{what}; Slow/Fast lists derived from the model's: slow {lists['slow']} fast {lists['fast']}")

    def check_model_settings(self) -> None:
        """Before any weight is read: the transformer override exists and every LoRA target names modules of this
        transformer (its config built on the meta device)."""
        override = self.transformer_override
        if override and not Path(override).expanduser().exists():
            raise ModelNotFoundError(f"model.transformer={override!r}: no such folder or file; give a diffusers "
                                     "transformer folder or a single-file checkpoint (.safetensors)")
        if override and (Path(override).expanduser() / "config.json").is_file():
            read_json(Path(override).expanduser() / "config.json", "model.transformer")
        targets = self.lora_settings.targets
        if not targets:
            return
        names = transformer_module_names(self.resolve_model(), self.transformer_override)
        unknown = [t for t in targets if not any(n == t or n.endswith(f".{t}") for n in names)]
        if unknown:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in names if not n.rsplit(".", 1)[-1].isdigit()})
            raise ConfigError(f"model.lora.targets: {unknown} match no module of the {self.family} transformer; "
                              f"module names it has include {', '.join(leaves[:40])}")

    def load_base_model(self, with_adapters: bool = True) -> None:
        """The whole pipeline at once; adds the two adapters to the frozen transformer (``with_adapters=False``
        for sampling with LoRA files loaded by ``load_glance_loras``). ``fit`` loads in stages instead."""
        if self._pipe is None:
            self.load_encoders()
        if self.transformer is None:
            self.load_transformer(with_adapters)

    def load_for_sampling(self, prompts: Sequence[str], controls: Sequence[torch.Tensor] = (),
                          device: torch.device | str = "cpu") -> None:
        """Sampling in the same stages as ``fit``: encode every prompt (with the control images) on ``device``,
        free the text encoders, then load the transformer (without adapters: LoRA files are loaded into it)."""
        wanted = [(p, tuple(controls)) for p in prompts]
        self.load_encoders(text_encoders=not self.conditions_stored(wanted))
        with self.encoding_on(device), self.encoders_on_device(), torch.no_grad():
            for prompt, given in wanted:
                self.conditioning_for(prompt, given)
        self.free_text_encoders()
        self.load_transformer(with_adapters=False)

    def load_encoders(self, text_encoders: bool = True) -> None:
        """The pipeline without its transformer (and without its text encoders when ``text_encoders`` is
        False: every prompt is in the encode cache), all frozen."""
        started = time.perf_counter()
        rank_zero_info(f"glance_lightning: loading {self.hparams.pretrained_model} "
                       f"({'VAE and text encoders' if text_encoders else 'VAE only: prompts are cached'}) ...")
        skip = ("transformer",) if text_encoders else ("transformer", *TEXT_ENCODERS)
        with self.timed("load"):
            pipe = load_pipeline(self.family_spec, self.resolve_model(), getattr(torch, self.dtype_name), skip)
        for module in encoders_of(pipe):
            module.requires_grad_(False).eval()
        self._pipe = pipe
        rank_zero_info(f"glance_lightning: loaded {type(pipe).__name__} without its transformer in "
                       f"{time.perf_counter() - started:.1f}s")

    def free_text_encoders(self) -> None:
        """Drop the text encoders entirely (host and device memory); later prompts must come from the caches."""
        for name in TEXT_ENCODERS:
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.encoders_freed = True

    def load_transformer(self, with_adapters: bool = True) -> None:
        """The frozen transformer (quantised on load where configured), then the two adapters."""
        started = time.perf_counter()
        if torch.cuda.is_available():
            # cuDNN's SDPA backward fails for FLUX-sized shapes on H100 (mha_graph.execute / CUBLAS errors);
            # flash / memory-efficient SDPA are as fast there, so it is never selected.
            torch.backends.cuda.enable_cudnn_sdp(False)
        dtype = getattr(torch, self.dtype_name)
        with self.timed("load"):
            transformer = self.empty_for_shards(dtype) if with_adapters else None
            if transformer is None:
                transformer = load_transformer(self.resolve_model(), dtype,
                                               perf_ops.quantization_config(self.perf.base_quantization, dtype),
                                               self.transformer_override, self.direct_load_device())
        self.pipe.register_modules(transformer=transformer)
        how = "built on the meta device (each rank reads its shard once sharded)" if self.shard_files else "loaded"
        rank_zero_info(f"glance_lightning: {how} {type(transformer).__name__} in "
                       f"{time.perf_counter() - started:.1f}s")
        self.adapt_transformer(transformer, with_adapters)

    def empty_for_shards(self, dtype: torch.dtype) -> torch.nn.Module | None:
        """Under sharding, the transformer with its weights on the meta device when its folder's safetensors hold
        every one of them (``glance_lightning.shard_loading``; ``configure_model`` reads each rank's rows once
        FSDP2 has sharded it); None where every rank reads it whole (no fit, not sharded, a single file)."""
        trainer = self.attached_trainer()
        if trainer is None or not sharding.is_sharded(trainer.strategy):
            return None
        override = Path(self.transformer_override).expanduser() if self.transformer_override else None
        folder = override if override is not None else Path(self.resolve_model().path) / "transformer"
        files = shard_loading.weight_files(folder) if folder.is_dir() else []
        if not files:
            rank_zero_info(f"glance_lightning: model.transformer {override} is one checkpoint file: every rank "
                           "reads it whole before FSDP2 keeps its shard (a diffusers folder is read per shard)")
            return None
        cls = transformer_class(self.resolve_model())
        transformer = shard_loading.empty_transformer(cls, cls.load_config(str(folder)), dtype)
        missing = shard_loading.missing_weights(transformer, shard_loading.file_keys(files))
        if missing:
            rank_zero_info(f"glance_lightning: {folder} has no {missing[0]} ({len(missing)} weight(s) named "
                           "otherwise): every rank reads the transformer whole before FSDP2 keeps its shard")
            return None
        self.shard_files = files
        return transformer

    def load_shards(self, device: torch.device) -> None:
        """After FSDP2 sharded the meta transformer: each rank's rows of every weight, then the LoRAs' starting
        values (``glance_lightning.lora_init``), on ``device``."""
        with self.timed("load"):
            report = shard_loading.materialize(self.transformer, self.shard_files, device)
            lora_init.reset_loras(self.transformer, self.seed, self.lora_settings.init)
        console.info(report.line(), every_rank=True)

    def direct_load_device(self) -> str | None:
        """The CUDA device a fit's transformer is read straight onto (so that Lightning's move to the device costs
        nothing and host memory never holds the whole base); None where the weights must stay on the host first:
        no fit, a CPU run, FSDP2 (which shards from the host) and block offload (which keeps them there)."""
        trainer = self.attached_trainer()
        if trainer is None or self.perf.offload not in (None, "none"):
            return None
        device = trainer.strategy.root_device
        if device.type != "cuda" or sharding.is_sharded(trainer.strategy):
            return None
        return str(device)

    def adapt_transformer(self, transformer: torch.nn.Module, with_adapters: bool = True) -> None:
        """Freeze a loaded transformer, set its attention backend and (``with_adapters``) add the two adapters with
        checkpointing and compile as configured; it becomes ``self.transformer``. The planner calls this on a
        full-size transformer of fake tensors, so training is planned on exactly this code."""
        transformer.requires_grad_(False)
        perf_ops.set_dispatcher_backend(transformer, self.perf.attention_backend)
        self.transformer = transformer
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
        if self.shard_files:
            shard_loading.adapters_on_meta(transformer)
        lora_init.reset_loras(transformer, self.seed, self.lora_settings.init)  # the same on any world size
        self._active_adapter = None

    def _speed_up_training(self, transformer: torch.nn.Module) -> None:
        perf = self.perf
        chosen: list[torch.nn.Module] = []
        if perf.gradient_checkpointing:
            chosen = perf_ops.enable_checkpointing(transformer, self.repeated_blocks,
                                                      float(perf.gradient_checkpointing), perf.checkpoint_policy)
            rank_zero_info(f"glance_lightning: gradient checkpointing ({perf.checkpoint_policy}) on {len(chosen)} "
                           "transformer blocks")
        if perf.offload == "block":
            self._offload_blocks(transformer, chosen)
        if perf.compile_blocks:
            count = perf_ops.compile_blocks(transformer, self.repeated_blocks, perf.compile_backend)
            rank_zero_info(f"glance_lightning: {count} transformer blocks compiled ({perf.compile_backend})")

    def _offload_blocks(self, transformer: torch.nn.Module, recomputed: list[torch.nn.Module]) -> None:
        """Frozen weights of the recomputed blocks to host memory (``glance_lightning.offload``), before the
        strategy moves the module to the device; DDP is told not to broadcast them."""
        from glance_lightning.offload import offload_blocks, offloaded_names

        if not recomputed:
            share = self.perf.gradient_checkpointing
            raise ConfigError(f"model.performance.offload=block: gradient_checkpointing={share} recomputes none of "
                              "the transformer's blocks, so none can be offloaded; raise it")
        offloader = offload_blocks(transformer, recomputed, int(self.perf.offload_blocks_per_group),
                                   self.perf.offload_stream)
        self._ddp_params_and_buffers_to_ignore = offloaded_names(self)
        rank_zero_info(f"glance_lightning: {len(recomputed)} transformer blocks offloaded to host memory in "
                       f"{len(offloader.groups)} groups{' with prefetch' if self.perf.offload_stream else ''}")

    def velocity_or_eager(self, *args: Any) -> torch.Tensor:
        """``predict_velocity``; where regional compile fails (a backend or compiler error, at the first step or
        a recompilation), the blocks run eagerly from then on, said in one line."""
        if not self.perf.compile_blocks:
            return self.predict_velocity(*args)
        try:
            return self.predict_velocity(*args)
        except Exception as err:  # noqa: BLE001 (only torch.compile's own failures are handled)
            if not perf_ops.is_compile_failure(err):
                raise
            perf_ops.uncompile_blocks(self.transformer, self.repeated_blocks)
            self.perf = dataclasses.replace(self.perf, compile_blocks=False)
            first = (str(err).strip().splitlines() or [""])[0][:160]
            rank_zero_info(f"glance_lightning: regional compile failed ({type(err).__name__}: {first}); the "
                           "transformer blocks run eagerly (set model.performance.compile_blocks: false to skip)")
            return self.predict_velocity(*args)

    def attention(self) -> Any:
        """Context every transformer forward runs in (the configured SDPA kernels)."""
        return perf_ops.attention_context(self.perf.attention_backend)

    def set_phase(self, phase: str) -> None:
        """Activate one adapter (peft also makes only it trainable). Sharded, both stay trainable: FSDP2 fixes
        which gathered weights need gradients at its first forward pass; the inactive adapter is left out of the
        forward pass, so it still gets no gradient and AdamW skips it."""
        if phase != self._active_adapter:
            self.transformer.set_adapter(phase)
            self._active_adapter = phase
            if getattr(self, "sharded", False):
                for other in PHASES:
                    for param in self.adapter_parameters(other):
                        param.requires_grad_(True)

    def adapter_parameters(self, phase: str) -> list[torch.nn.Parameter]:
        return [p for n, p in self.transformer.named_parameters() if f".{phase}." in n and "lora_" in n]
