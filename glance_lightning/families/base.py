"""The family-independent Glance LightningModule.

``GlanceModule`` owns loading the base pipeline (one ``from_pretrained``), freezing it, the two named LoRA
adapters ("slow", "fast"), the training step (the flow-matching loss at the drawn timesteps) and the per-phase
optimisation schedule. Pre-flight checks live in ``preflight``, the encode-once cache in ``encoding``, sampling in
``generation``, writing the LoRAs and checkpoints in ``saving``; what a family is (pipeline, scheduler, controls)
in its registry entry. A family subclass implements only what differs: prompt encoding, latent
encoding/decoding and velocity prediction.

Phases run one after the other in a single fit: optimizer steps ``[0, slow_steps)`` train "slow", the next
``fast_steps`` train "fast". Both adapters sit in one AdamW with one parameter group each; the inactive
group gets no gradient (peft freezes inactive adapters), so AdamW skips it entirely.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning as L
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics import MeanMetric

from glance_lightning import auto, dashboard, flow, sharding, startup
from glance_lightning import performance as perf_ops
from glance_lightning.atomic import install_checkpoint_io
from glance_lightning.draws import Draws, DrawSpec, GlanceData
from glance_lightning.errors import ConfigError, UserError
from glance_lightning.families import preflight
from glance_lightning.families.encoding import EncodeOnce
from glance_lightning.families.generation import GenerationMixin
from glance_lightning.families.hooks import Conditioning, FamilyHooks
from glance_lightning.families.latents import ShiftScaleLatents
from glance_lightning.families.loading import AdaptedBaseModel
from glance_lightning.families.saving import SavesLoras
from glance_lightning.model_schedule import builtin_schedule
from glance_lightning.models import ResolvedModel
from glance_lightning.registry import FamilySpec, get_family
from glance_lightning.run_folder import check_cache_folder
from glance_lightning.settings import (
    LoraSettings,
    OptimizerSettings,
    PerformanceSettings,
    Probability,
    TimestepSettings,
    checked,
    coerce_settings,
    plain_data,
    with_defaults,
)

log = logging.getLogger(__name__)

PHASES = preflight.PHASES
__all__ = ["Conditioning", "GlanceModule", "NonFiniteLossError", "ShiftScaleLatents"]


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN/inf: training stops before the bad step touches the adapters."""


class GlanceModule(FamilyHooks, AdaptedBaseModel, EncodeOnce, GenerationMixin, SavesLoras, L.LightningModule):
    """Base class of every family. Subclasses set the class attributes and the four family hooks; the family's
    registry entry (``family_spec``) says which pipeline it loads, its scheduler and its control images."""

    family: ClassVar[str]  # the registry name (written into the LoRA metadata)
    default_lora_targets: ClassVar[tuple[str, ...]]
    size_multiple: ClassVar[int] = 16
    timestep_scale: ClassVar[float] = 1.0  # what the transformer takes as timestep: sigma * timestep_scale
    repeated_blocks: ClassVar[tuple[str, ...]] = ()  # block classes to compile/checkpoint; () = diffusers' list

    def __init__(
        self,
        pretrained_model: str,
        timesteps: TimestepSettings | None = None,
        slow_steps: NonNegativeInt = 60,
        fast_steps: NonNegativeInt = 60,
        lora: LoraSettings | None = None,
        optimizer: OptimizerSettings | None = None,
        torch_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        performance: PerformanceSettings | None = None,
        caption_dropout: Probability = 0.0,
        dropout_prompt: str = " ",
        offload_encoders: bool = True,
        output_dir: str | None = None,
        resolution: PositiveInt | None = None,
        transformer: str | None = None,
        encode_cache: str | None = "user",
    ) -> None:
        """
        Args:
            pretrained_model: diffusers model directory, or ``tiny:<family>`` for a tiny random model built
                locally once.
            timesteps: the Slow/Fast lists, or how to derive them from the family's scheduler.
            slow_steps: optimizer steps of the Slow phase (0 skips the phase).
            fast_steps: optimizer steps of the Fast phase (0 skips the phase).
            lora: rank, alpha, target modules and init of both adapters.
            optimizer: AdamW settings and the per-phase warm-up.
            torch_dtype: dtype the frozen base weights are loaded in (float32, bfloat16, float16).
            performance: attention kernels, regional compile, (selective) gradient checkpointing and a
                quantised frozen base; see ``glance_lightning.performance``.
            caption_dropout: probability of training a sample on ``dropout_prompt`` instead of its caption.
            dropout_prompt: the prompt used for caption dropout (the official Qwen recipe uses " ").
            offload_encoders: keep text encoders and the VAE on the CPU once the data is encoded.
            output_dir: where ``slow/`` and ``fast/`` LoRAs go; default the run folder. An existing
                LoRA there is never overwritten by a new run.
            resolution: the training resolution, which derived lists are read off unless ``timesteps.derive``
                names another; the command line sets it from ``data.init_args.resolution`` (default 1024).
            transformer: the transformer from elsewhere than ``pretrained_model``: a diffusers transformer folder
                or a single-file checkpoint (ComfyUI / original key layout); the rest comes from
                ``pretrained_model``.
            encode_cache: where encoded prompts and latents are kept between runs: ``user`` (the glance_lightning
                cache dir, ``$GLANCE_LIGHTNING_CACHE/encoded``), a folder, or null for none. A run whose every
                prompt is cached never loads its text encoders.
        """
        super().__init__()
        self.save_hyperparameters()
        for key, value in list(self.hparams.items()):  # plain data, so checkpoints load with weights_only
            self.hparams[key] = plain_data(value)
        slow_steps = checked(NonNegativeInt, slow_steps, "model.slow_steps")
        fast_steps = checked(NonNegativeInt, fast_steps, "model.fast_steps")
        if slow_steps + fast_steps == 0:
            raise ConfigError("model.slow_steps and model.fast_steps are both 0; train at least one phase")
        checked(Probability, caption_dropout, "model.caption_dropout")
        if encode_cache not in (None, "user"):
            check_cache_folder(Path(encode_cache).expanduser(), "model.encode_cache")
        self.dtype_name = torch_dtype
        if not isinstance(getattr(torch, torch_dtype, None), torch.dtype):
            raise ConfigError(f"model.torch_dtype={torch_dtype!r} is not a torch dtype; use float32 or bfloat16")
        self.phase_steps = {"slow": slow_steps, "fast": fast_steps}
        self.lora_settings = coerce_settings(LoraSettings, lora)
        self.optim_settings = coerce_settings(OptimizerSettings, optimizer)
        self.perf = coerce_settings(PerformanceSettings, performance)
        if not self.perf.auto:  # else unset switches stay None until setup chooses them on the card (auto.py)
            self.perf, self.optim_settings = with_defaults(self.perf, self.optim_settings)
        perf_ops.check_performance_settings(self.perf, self.optim_settings)
        self.timestep_settings = coerce_settings(TimestepSettings, timesteps)
        self.model_schedule = builtin_schedule(self.family)  # until the model is resolved (resolve_model)
        self.glance_timesteps = self.timestep_settings.resolve(self.family, resolution, self.model_schedule)
        log.info("%s: %s", type(self).__name__, self.glance_timesteps.describe())
        self.strict_loading = False  # checkpoints hold only the LoRA weights
        self.transformer: torch.nn.Module | None = None
        self._pipe: Any = None
        self._resolved: ResolvedModel | None = None
        self.transformer_override = transformer
        self._active_adapter: str | None = None
        self.init_caches()
        self.lora_dir: Path | None = Path(output_dir) if output_dir else None
        self.claimed_run_dir: Path | None = None  # claimed by the command line (run_folder)
        self.run_dir: Path | None = None  # this fit's run folder, resolved in setup on every rank
        self.seed = 0
        self.run_id = uuid.uuid4().hex  # in both LoRA files; a resume continues the checkpoint's
        self.allow_other_data = False  # resume on other data than the checkpoint's (--allow_other_data)
        self.step_metrics: dict[str, torch.Tensor | float] = {}  # this step's dashboard values (TrainingMonitor)
        # nan_strategy="disable": torchmetrics would otherwise read every update back (a device sync); non-finite
        # losses are caught once per optimizer step in on_before_optimizer_step.
        self.loss_means = torch.nn.ModuleDict({p: MeanMetric(nan_strategy="disable") for p in PHASES})
        self._finite: torch.Tensor | None = None
        self._last_draw: tuple[str, list[float]] = ("", [])
        self.fit_timings: dict[str, float] = {}  # seconds spent outside the training steps, by part
        self._setup_ended: float | None = None
        self._fetch_s = 0.0
        self.fit_started: float | None = None
        self.sharded = False  # the transformer's weights are FSDP2 shards (configure_model)
        self.shard_files: list[Path] = []  # the transformer's files, read per shard in configure_model

    # ------------------------------------------------------------------ configuration
    @property
    def family_spec(self) -> FamilySpec:
        return get_family(self.family)

    @property
    def pipe(self) -> Any:
        if self._pipe is None:
            raise RuntimeError("the base model is not loaded yet; call setup('fit') or load_base_model()")
        return self._pipe

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps.values())

    def phase_at(self, step: int) -> str:
        return "slow" if step < self.phase_steps["slow"] else "fast"

    def phase_start(self, phase: str) -> int:
        """The global step at which ``phase`` starts (Slow first, then Fast)."""
        return 0 if phase == "slow" else self.phase_steps["slow"]

    def draw_spec(self) -> DrawSpec:
        """What the DataModule's draws depend on (``glance_lightning.draws``)."""
        t = self.glance_timesteps
        return DrawSpec(self.seed, (self.phase_steps["slow"], self.phase_steps["fast"]), (len(t.slow), len(t.fast)),
                        self.hparams.caption_dropout)

    @contextmanager
    def timed(self, part: str) -> Iterator[None]:
        """Add the block's wall time to ``fit_timings[part]`` (load, encode, samples, save)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.fit_timings[part] = self.fit_timings.get(part, 0.0) + time.perf_counter() - started

    # ------------------------------------------------------------------ lightning hooks
    def prepare_data(self) -> None:
        """Download a hub model's components, or build a ``tiny:`` model, once per node before any rank loads it
        (Lightning runs this on local rank 0 and holds the others at a barrier). transformers writes weights on
        rank 0 only once torch.distributed is up, so a tiny build on another rank would be incomplete."""
        started = time.perf_counter()
        self.resolve_model()
        self._fetch_s = time.perf_counter() - started  # the fit breakdown's "fetch"

    def attached_trainer(self) -> L.Trainer | None:
        """The trainer, or None when the module is used on its own (sampling, tests)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    @property
    def data(self) -> GlanceData:
        datamodule = self.trainer.datamodule
        if not isinstance(datamodule, GlanceData):
            raise TypeError(f"data: {type(datamodule).__name__} does not provide train_samples/resolution; use "
                            "glance_lightning.datamodules.GlanceDataModule or meet glance_lightning.draws.GlanceData")
        return datamodule

    def setup(self, stage: str) -> None:
        if stage != "fit":
            self.load_base_model()
            return
        trainer = self.trainer
        self.fit_started, self.fit_timings = time.perf_counter() - self._fetch_s, {}
        if startup.command_started() is not None:  # the seconds before this hook: interpreter, imports, config
            self.fit_timings["start"] = self.fit_started - startup.command_started()
            self.fit_started = startup.command_started()
        if self._fetch_s:  # prepare_data, just before: a hub model's download, or building a tiny model
            self.fit_timings["fetch"], self._fetch_s = self._fetch_s, 0.0
        install_checkpoint_io(trainer.strategy)  # checkpoints written all or nothing (glance_lightning.atomic)
        # on every rank: without the command line's folder, trainer.log_dir is a collective (a broadcast)
        self.run_dir = self.claimed_run_dir or preflight.trainer_run_dir(trainer)
        self.lora_dir = preflight.output_dir(trainer, self.lora_dir, trainer.ckpt_path)
        if trainer.is_global_zero:  # the folders exist, hold nothing a killed save left, before anything is written
            preflight.check_output_dir(self.lora_dir)
            preflight.remove_leftovers(trainer, self.run_dir, self.lora_dir, whole_run=self.claimed_run_dir is not None)
        preflight.set_max_steps(trainer, self.total_steps)
        preflight.check_strategy(trainer.strategy, self)
        samples = self.data.train_samples
        self.check_samples(samples)
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", torch.initial_seed())) % (2**31)
        self.resolve_model()
        if self.perf.auto:  # the switches left unset, chosen for this device before anything large is loaded
            rank_zero_info(auto.choose(self, trainer))
            perf_ops.check_performance_settings(self.perf, self.optim_settings)
        self.check_model_settings()
        # Staged, so host memory holds one large component at a time: encoders, encode, free, transformer.
        self.encode_for_fit(samples, trainer)
        self.free_text_encoders()
        if self.transformer is None:
            self.load_transformer()
        if trainer.is_global_zero:
            weights = sum(p.numel() * p.element_size() for phase in PHASES for p in self.adapter_parameters(phase))
            preflight.check_free_space(self.lora_dir, 2 * weights,
                                       preflight.checkpoint_needs(trainer, weights, self.total_steps))
        self._setup_ended = time.perf_counter()

    def configure_model(self) -> None:
        """Under ``strategy: fsdp2`` (``glance_lightning.sharding``): shard the frozen transformer and both adapters
        per repeated block over the data-parallel ranks, after ``setup`` loaded it and before the strategy moves it
        to the device. Other strategies keep the whole module on every rank."""
        trainer = self.attached_trainer()
        if trainer is None or not sharding.is_sharded(trainer.strategy) or self.sharded:
            return
        blocks = perf_ops.repeated_blocks(self.transformer, self.repeated_blocks)
        count = sharding.shard_transformer(self.transformer, blocks, self.device_mesh["data_parallel"])
        self.sharded = True
        if self.shard_files:  # built on the meta device: each rank now reads its rows (shard_loading)
            self.load_shards(trainer.strategy.root_device)
        rank_zero_info(f"glance_lightning: transformer sharded over {trainer.world_size} ranks ({count} blocks, "
                       "FSDP2)")

    def refuse_overwrite(self, resuming: bool) -> None:
        preflight.refuse_overwrite(self.lora_dir, resuming)

    def check_samples(self, samples: Sequence[Any]) -> None:
        """What this family needs of the loaded data, checked before the model is loaded."""
        preflight.check_samples(samples, self.family, self.size_multiple, self.family_spec.control_images)

    def configure_callbacks(self) -> list[L.Callback]:
        from glance_lightning.callbacks.monitor import TrainingMonitor
        from glance_lightning.callbacks.progress import use_phase_progress_bar
        from glance_lightning.callbacks.safety import KeepLorasOnFailure

        use_phase_progress_bar(self.trainer)  # Lightning's default bar -> phase, step in phase, loss, s/step
        return [KeepLorasOnFailure(), TrainingMonitor()]

    def on_fit_start(self) -> None:
        if self._setup_ended is not None:  # Lightning's strategy setup: the module to the device, the optimizer
            self.fit_timings["to device"] = time.perf_counter() - self._setup_ended
            self._setup_ended = None
        self.refuse_overwrite(resuming=self.trainer.ckpt_path is not None)

    def training_step(self, batch: Draws, batch_idx: int) -> torch.Tensor:
        phase = self.phase_at(self.global_step)
        self.set_phase(phase)
        indices, drop, choice = batch["index"], batch["drop"], batch["choice"]
        if batch["step"] != self.global_step:
            raise RuntimeError(f"the batch holds the draws of step {batch['step']} at step {self.global_step}; "
                               "a DataModule must return glance_lightning.draws.draws_dataloader(...)")
        sigmas = self.glance_timesteps.phase(phase)
        sigma = torch.tensor([sigmas[c] for c in choice]).to(self.device, non_blocking=True)
        x0 = torch.cat([self.latent_cache[i] for i in indices])
        noise = torch.cat([
            torch.randn(self.latent_cache[i].shape, generator=torch.Generator().manual_seed(seed))
            for i, seed in zip(indices, batch["noise_seed"])
        ]).to(self.device, non_blocking=True)
        cond = self.collate_conditions(
            [self.dropout_cache[i] if d else self.cond_cache[i] for i, d in zip(indices, drop)]
        )
        with self.attention():
            pred = self.velocity_or_eager(flow.noisy_latents(x0, noise, sigma), sigma, cond)
        per_sample = flow.per_sample_loss(pred, x0, noise)
        loss = per_sample.mean()
        # Checked once per optimizer step in on_before_optimizer_step, so the host waits for the device there
        # (after the backward pass is queued) and not here between forward and backward.
        finite = torch.isfinite(loss.detach())
        self._finite = finite if batch_idx % max(1, self.trainer.accumulate_grad_batches) == 0 or \
            self._finite is None else self._finite & finite
        self._last_draw = (phase, [sigmas[c] for c in choice])  # formatted only if the loss fails
        self._log_losses(phase, loss, per_sample, choice)
        return loss

    def diagnostics_due(self) -> bool:
        """Whether this step's extra metrics reach the loggers (every ``trainer.log_every_n_steps``); they are
        only computed then, since Lightning writes on-step values to the loggers at those steps alone."""
        every = self.trainer.log_every_n_steps  # the loggers' own test, from public attributes
        return every > 0 and ((self.global_step + 1) % every == 0 or self.trainer.should_stop)

    def _log_losses(self, phase: str, loss: torch.Tensor, per_sample: torch.Tensor, choice: list[int]) -> None:
        """The progress bar's loss every step; the dashboards' (``step_metrics``) at logging steps only."""
        size = len(choice)
        self.loss_means[phase].update(loss.detach())
        self.log(f"train/loss_{phase}", loss, prog_bar=True, logger=False, on_step=True, batch_size=size)
        self.log(f"train/loss_{phase}_mean", self.loss_means[phase], logger=False, on_step=False, on_epoch=True,
                 batch_size=size)  # the loggers get it at the phase's end (TrainingMonitor)
        if self.diagnostics_due():
            timesteps = self.glance_timesteps.as_timesteps()[phase]
            self.step_metrics.update(dashboard.loss_metrics(phase, timesteps, loss, per_sample, choice))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # the step's one host-device sync; all ranks agree (one all-reduce), so all stop together
        if self._finite is not None and not sharding.on_every_rank(self.trainer, self._finite):
            raise NonFiniteLossError(
                f"loss is not finite at step {self.global_step} ({self._last_draw[0]} phase, sigmas "
                f"{[round(s, 4) for s in self._last_draw[1]]}); training stopped and the last "
                f"good LoRAs kept in {self.lora_dir}. Lower model.optimizer.lr, or use float32/bf16-mixed instead "
                "of float16"
            )
        if not self.diagnostics_due():
            return
        grads = [p.grad for p in self.adapter_parameters(self._active_adapter) if p.grad is not None]
        if grads:  # DTensor shards under sharding: the norm is reduced over the ranks
            norm = sharding.local_value(torch.nn.utils.get_total_norm(grads))
            self.step_metrics[f"train/grad_norm_{self._active_adapter}"] = norm.detach()
        self.step_metrics[f"train/lr_{self._active_adapter}"] = optimizer.param_groups[
            PHASES.index(self._active_adapter)]["lr"]

    def optimizer_groups(self) -> list[dict[str, Any]]:
        """AdamW's parameter groups: one per adapter, in phase order (checkpoints name them, optimizer_state)."""
        return [{"params": self.adapter_parameters(p), "name": p} for p in PHASES]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.optimizer_groups()
        optimizer = perf_ops.build_optimizer(self.optim_settings, groups, self.device)
        lambdas = [self._phase_lr_lambda(p) for p in PHASES]
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _phase_lr_lambda(self, phase: str):
        start, length = self.phase_start(phase), self.phase_steps[phase]
        warmup = max(1, self.optim_settings.warmup_steps)

        def factor(step: int) -> float:
            local = step - start
            if local < 0 or local >= length:
                return 0.0
            return min(1.0, (local + 1) / warmup)

        return factor
