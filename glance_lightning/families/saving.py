"""Writing what a fit trained: both LoRA files (``<dir>/slow``, ``<dir>/fast``, diffusers format with the
``glance`` metadata), the checkpoints' content (the LoRA weights only, plus what a resume checks) and the run's
model card. Under sharding (``glance_lightning.sharding``) the LoRA shards are gathered on every rank and rank 0
writes, so the files are the same as a single-device run's.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from peft.utils import get_peft_model_state_dict

from glance_lightning import model_card, optimizer_state, sharding
from glance_lightning.families import resume
from glance_lightning.families.preflight import PHASES
from glance_lightning.lora_io import save_lora


class SavesLoras:
    """The saving half of ``GlanceModule`` (a mixin: it uses the module's transformer, settings and trainer)."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Only the trainable adapter weights: checkpoints never carry the frozen base model."""
        full = super().state_dict(*args, **kwargs)
        return {k: v for k, v in full.items() if "lora_" in k}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resume.record(self, checkpoint)  # settings, data, run id: what a resume checks and continues
        # keyed by parameter name, so that any number of ranks resumes it (glance_lightning.optimizer_state)
        groups, names = self.optimizer_group_names(), [n for n, _ in self.named_parameters()]
        checkpoint["optimizer_states"] = [optimizer_state.by_name(state, groups, names)
                                          for state in checkpoint.get("optimizer_states", [])]
        self.save_loras()

    def optimizer_group_names(self) -> list[list[str]]:
        return optimizer_state.group_names(self, [g["params"] for g in self.optimizer_groups()])

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        resume.restore(self, checkpoint)
        if not self.sharded:  # sharded, the strategy has loaded it already (sharding.FSDP2Strategy)
            groups = self.optimizer_group_names()
            checkpoint["optimizer_states"] = [optimizer_state.by_position(state, groups)
                                              for state in checkpoint.get("optimizer_states", [])]
        else:  # an adapter whose phase had not started has no optimizer state in the checkpoint
            step = int(checkpoint.get("global_step", 0))
            unstarted = [p for phase in PHASES if step <= self.phase_start(phase) or not self.phase_steps[phase]
                         for p in self.adapter_parameters(phase)]
            sharding.drop_optimizer_state(self.trainer.optimizers[0], unstarted)

    def on_train_end(self) -> None:
        self.save_loras()  # after the callbacks' on_train_end: the last chained samples are rendered
        if self.trainer.is_global_zero and self.lora_dir is not None and self.run_dir is not None:
            with self.timed("save"):
                model_card.write_for_run(self.run_dir, self.lora_dir, self.trainer.callbacks)

    def glance_metadata(self, phase: str) -> dict[str, Any]:
        trainer = self.attached_trainer()
        datamodule = getattr(trainer, "datamodule", None)
        return {
            "family": self.family,
            "run_id": self.run_id,
            "base_model": self.hparams.pretrained_model,
            "phase": phase,
            "timesteps": self.glance_timesteps.as_timesteps()[phase],
            "schedule": self.glance_timesteps.as_timesteps(),
            "scheduler": self.scheduler_record(),
            "rank": self.lora_settings.rank,
            "alpha": self.lora_settings.alpha,
            "resolution": getattr(datamodule, "resolution", None),
            "family_options": self.family_options(),
            "trained_steps": min(max(self.global_step - self.phase_start(phase), 0), self.phase_steps[phase]),
        }

    def scheduler_record(self) -> dict[str, Any]:
        """The schedule the lists were derived from (the loaded model's, else the built-in one) and how (None: the
        lists were given in model.timesteps), so ``sample`` can tell when another model would derive others."""
        settings = self.timestep_settings
        derivation = settings.derivation(self.hparams.get("resolution")) if settings.derived else None
        return {**self.model_schedule.as_metadata(), "derivation": derivation}

    def save_loras(self, directory: str | os.PathLike | None = None) -> list[Path]:
        """Write both adapters as ``<dir>/slow`` and ``<dir>/fast`` in the diffusers LoRA format (rank 0). Sharded,
        every rank must call it: the LoRA shards are gathered (a collective), then rank 0 writes."""
        trainer = self.attached_trainer()
        if trainer is not None and not trainer.is_global_zero and not self.sharded:
            return []
        root = Path(directory) if directory is not None else self.lora_dir
        config = self.lora_config().to_dict()
        paths = []
        with self.timed("save"):
            for phase in PHASES:
                state = sharding.full_tensors(get_peft_model_state_dict(self.transformer, adapter_name=phase))
                if trainer is None or trainer.is_global_zero:
                    paths.append(save_lora(root / phase, state, config, self.glance_metadata(phase)))
        return paths
