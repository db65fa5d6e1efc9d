"""Run telemetry: throughput, accelerator memory, the step within the phase, and the LoRA pair as a W&B artifact.

Attached to every run by GlanceModule.configure_callbacks. Host timings are taken at the end of a step,
after the loss has been read for the progress bar, so they include the accelerator's work. Without a progress
bar (``enable_progress_bar: false``) it prints what the bar would show as a plain line every
``trainer.log_every_n_steps`` steps and at the end of each phase (``callbacks.progress.PhaseStatus.line``).
"""

from __future__ import annotations

import statistics
import time

import lightning as L
import torch

from glance_lightning import console, dashboard
from glance_lightning.model_card import published_files
from glance_lightning.run_folder import shown

ORDER = ("start", "fetch", "load", "encode", "to device", "first step")


def fit_breakdown(started: float | None, parts: dict[str, float], step_times: list[float]) -> str:
    """One line: where a fit's wall time went, in order: "start" (from the process start: interpreter, imports,
    config, Trainer; the command line only), "fetch" (a hub download, or building a tiny model), "load" (reading
    the weights), "encode", "to device" (Lightning's
    strategy setup: the module to the device, the optimizer), "first step" (its warm-up: CUDA and cuBLAS
    initialisation, compilation), the other training steps, samples, save, and "other": Lightning around the steps
    (checkpoint files, loggers, the progress bar, data)."""
    if started is None:
        return "fit timings unavailable"
    total = time.perf_counter() - started
    parts = dict(parts)
    rest = list(step_times)
    if len(rest) > 1:
        parts["first step"] = rest.pop(0)
    ordered = [k for k in ORDER if k in parts] + [k for k in parts if k not in ORDER]
    before = [k for k in ordered if k in ORDER]
    after = [k for k in ordered if k not in ORDER]
    median = f" (median {statistics.median(rest):.3f} s/step)" if rest else ""
    steps = f"{len(rest)} {'more ' if 'first step' in parts else ''}training steps {sum(rest):.1f}{median}"
    shown = [f"{k} {parts[k]:.1f}" for k in before] + [steps] + [f"{k} {parts[k]:.1f}" for k in after]
    other = total - sum(parts.values()) - sum(rest)
    return f"fit took {total:.1f} s = {' + '.join(shown)} + other {other:.1f}"


class TrainingMonitor(L.Callback):
    def __init__(self, window: int = 10) -> None:
        self.window = window
        self._times: list[float] = []
        self.step_times: list[float] = []
        self.summary = ""
        self._start: float | None = None
        self._sampled = 0.0
        self._printed_step = -1
        self._global_step = -1
        self._announced: str | None = None

    @property
    def seconds_per_step(self) -> float | None:
        """Median seconds of the last ``window`` training steps (sample rendering excluded)."""
        return statistics.median(self._times) if self._times else None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        self._start = time.perf_counter()
        self._sampled = pl_module.fit_timings.get("samples", 0.0)
        self._global_step = trainer.global_step
        phase = pl_module.phase_at(trainer.global_step)
        if phase != self._announced and trainer.is_global_zero:
            self._announced = phase
            dashboard.announce_phase(trainer, pl_module, phase)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if self._start is None or trainer.global_step == self._global_step:
            return  # a gradient-accumulation micro-batch: the step is timed and logged when it ends
        rendering = pl_module.fit_timings.get("samples", 0.0) - self._sampled  # counted under "samples"
        self.step_times.append(time.perf_counter() - self._start - rendering)
        self._times = self.step_times[-self.window:]
        seconds = statistics.median(self._times)
        size = len(batch["index"])
        phase = pl_module.phase_at(trainer.global_step - 1)
        step_in_phase = trainer.global_step - pl_module.phase_start(phase)
        self._print_progress(trainer, pl_module, step_in_phase, pl_module.phase_steps[phase])
        metrics, pl_module.step_metrics = pl_module.step_metrics, {}
        if step_in_phase == pl_module.phase_steps[phase]:  # the phase's mean loss, once, when it ends
            metrics[f"train/loss_{phase}_mean"] = pl_module.loss_means[phase].compute()  # every rank: a reduction
        if not metrics:  # not a logging step (trainer.log_every_n_steps)
            return
        metrics[f"train/{phase}_step"] = float(step_in_phase)
        metrics["perf/s_per_step"] = seconds
        metrics["perf/samples_per_s"] = size * trainer.world_size / seconds
        if torch.cuda.is_available() and pl_module.device.type == "cuda":
            metrics["perf/gpu_max_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        if trainer.is_global_zero:
            dashboard.log_step(trainer, metrics)

    def _print_progress(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int, total: int) -> None:
        """The progress bar's text as a plain line, when there is no bar."""
        every = trainer.log_every_n_steps
        due = step == total or (every > 0 and step % every == 0)
        if trainer.progress_bar_callback is not None or not due or trainer.global_step == self._printed_step:
            return
        from glance_lightning.callbacks.progress import phase_status

        status = phase_status(trainer, pl_module)
        if status is not None:
            self._printed_step = trainer.global_step
            console.info(status.line())

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after the module's on_train_end has written the final LoRAs
        if not trainer.is_global_zero or trainer.state.status.value != "running":
            return
        self.summary = fit_breakdown(pl_module.fit_started, pl_module.fit_timings, self.step_times)
        if pl_module.lora_dir is not None:
            folder = shown(pl_module.lora_dir)
            console.info(f"saved the Slow and Fast LoRAs: {folder}/slow, {folder}/fast")
        console.info(self.summary)
        dashboard.log_loras(trainer, pl_module, published_files(pl_module.run_dir, pl_module.lora_dir))
