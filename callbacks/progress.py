"""The training progress display: the phase, the step within it, the loss and s/step.

Lightning's own progress bars, subclassed, in place of "Epoch 0/999" and ``v_num``: the Rich one

    glance_lightning: slow 150/150 loss 0.197 0.006 s/step
    fast 37/150 ━━━━━               0:00:00 • 0:00:01 loss: 0.412 s/step: 0.006

(one row, reset for each phase; the finished phase leaves a line) or the TQDM one, a bar per phase
(``slow: 100%|██████████| 150/150 [00:01<00:00, loss=0.197, s/step=0.006]``). ``GlanceModule.configure_callbacks``
swaps Lightning's default bar for one of these (``use_phase_progress_bar``); a bar the user configured of another
class is left alone. With ``enable_progress_bar: false`` the ``TrainingMonitor`` prints ``PhaseStatus.line()``
every ``trainer.log_every_n_steps`` steps instead, for log files and CI.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

from glance_lightning import console

__all__ = ["GlanceRichProgressBar", "GlanceTQDMProgressBar", "PhaseStatus", "phase_status", "use_phase_progress_bar"]


def format_loss(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2e}"


def format_seconds(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


@dataclass(frozen=True)
class PhaseStatus:
    """Where a Glance fit is: ``step`` of the ``total`` optimizer steps of ``phase`` done, the last loss of that
    phase and the median seconds per step (None until known)."""

    phase: str
    step: int
    total: int
    loss: float | None = None
    seconds_per_step: float | None = None

    def metrics(self) -> dict[str, str]:
        """What the bar shows after its counter: ``loss`` and ``s/step``."""
        items = {}
        if self.loss is not None:
            items["loss"] = format_loss(self.loss)
        if self.seconds_per_step is not None:
            items["s/step"] = format_seconds(self.seconds_per_step)
        return items

    def line(self) -> str:
        """``slow 37/150 loss 0.412 0.006 s/step``: the bar as one plain line."""
        text = f"{self.phase} {self.step}/{self.total}"
        if self.loss is not None:
            text += f" loss {format_loss(self.loss)}"
        if self.seconds_per_step is not None:
            text += f" {format_seconds(self.seconds_per_step)} s/step"
        return text


def is_glance(pl_module: Any) -> bool:
    """Whether the module trains Glance phases (other modules keep Lightning's display)."""
    return isinstance(getattr(pl_module, "phase_steps", None), dict) and hasattr(pl_module, "phase_start")


def phase_status(trainer: L.Trainer, pl_module: L.LightningModule) -> PhaseStatus | None:
    """The status of a Glance module's fit (None for other modules)."""
    if not is_glance(pl_module):
        return None
    phase_steps = pl_module.phase_steps
    done = trainer.global_step
    phase = pl_module.phase_at(max(done - 1, 0))
    start = pl_module.phase_start(phase)
    loss = trainer.progress_bar_metrics.get(f"train/loss_{phase}")
    seconds = None
    for callback in trainer.callbacks:
        if hasattr(callback, "seconds_per_step"):
            seconds = callback.seconds_per_step
            break
    return PhaseStatus(phase, min(max(done - start, 0), phase_steps[phase]), phase_steps[phase],
                       None if loss is None else float(loss), seconds)


class GlanceRichProgressBar(RichProgressBar):
    """Lightning's Rich bar, reset for each phase: ``slow 37/150 ━━━ 0:00:01 • 0:00:03 loss: 0.412 s/step: 0.006``;
    a finished phase leaves its last status as a line above the bar."""

    BAR_WIDTH = 20  # so that a row fits 80 columns (log files, CI)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None
        self._last: PhaseStatus | None = None
        self._rerouted: list[tuple[logging.StreamHandler, Any]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        streams = {"stdout": sys.stdout, "stderr": sys.stderr}
        super().on_train_start(trainer, pl_module)
        self._reroute_logging(streams)

    def _reroute_logging(self, before: dict[str, Any]) -> None:
        """On a terminal the live display replaces sys.stdout/stderr with proxies that print above the bar;
        logging handlers (Lightning's own) still hold the real streams and would write through the bar, so they
        are pointed at the proxies until the display stops."""
        now = {"stdout": sys.stdout, "stderr": sys.stderr}
        replaced = {id(before[k]): now[k] for k in now if now[k] is not before[k]}
        if not replaced:
            return
        for name in (None, "lightning.pytorch", "lightning.fabric", "lightning"):
            for handler in logging.getLogger(name).handlers:
                if type(handler) is logging.StreamHandler and id(handler.stream) in replaced:
                    self._rerouted.append((handler, handler.setStream(replaced[id(handler.stream)])))

    def _restore_logging(self) -> None:
        while self._rerouted:
            handler, stream = self._rerouted.pop()
            handler.setStream(stream)

    def configure_columns(self, trainer: L.Trainer) -> list:
        from lightning.pytorch.callbacks.progress.rich_progress import (
            BatchesProcessedColumn,
            CustomBarColumn,
            CustomTimeColumn,
        )
        from rich.progress import TextColumn

        return [  # the metrics column (loss, s/step) follows; s/step replaces it/s
            TextColumn("[progress.description]{task.description}"),
            BatchesProcessedColumn(style=self.theme.batch_progress),
            CustomBarColumn(bar_width=self.BAR_WIDTH, complete_style=self.theme.progress_bar,
                            finished_style=self.theme.progress_bar_finished, pulse_style=self.theme.progress_bar_pulse),
            CustomTimeColumn(style=self.theme.time),
        ]

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        status = phase_status(trainer, pl_module)
        return super().get_metrics(trainer, pl_module) if status is None else status.metrics()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not is_glance(pl_module):
            return super().on_train_epoch_start(trainer, pl_module)
        self._show(trainer, pl_module)  # one row per phase, across epochs

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not is_glance(pl_module):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show(trainer, pl_module)
        self._update_metrics(trainer, pl_module)
        self.refresh()

    def _show(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        status = phase_status(trainer, pl_module)
        if self.is_disabled or self.progress is None or status is None:
            return
        if self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(status.total, status.phase)
        elif status.phase != self._phase:
            if self._last is not None:
                console.info(self._last.line())  # printed above the live bar
            self.progress.reset(self.train_progress_bar_id, total=status.total, description=status.phase)
        self._phase, self._last = status.phase, status
        self.progress.update(self.train_progress_bar_id, completed=status.step, total=status.total)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if is_glance(pl_module):
            self._stop_progress()  # the last row is printed before the saved-LoRAs and time-breakdown lines
            self._restore_logging()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self._restore_logging()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore_logging()

    def _get_train_description(self, current_epoch: int) -> str:
        return self._phase or super()._get_train_description(current_epoch)


class GlanceTQDMProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar (used when rich is not installed) with a bar per phase: ``slow: 25%|██ | 37/150
    [00:01<00:03, loss=0.412, s/step=0.006]``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase: str | None = None

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        status = phase_status(trainer, pl_module)
        return super().get_metrics(trainer, pl_module) if status is None else status.metrics()

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        pl_module = trainer.lightning_module
        if not is_glance(pl_module):
            return super().on_train_epoch_start(trainer, *args)
        self._show(trainer, pl_module, force=True)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not is_glance(pl_module):
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._show(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not is_glance(pl_module):
            return super().on_train_epoch_end(trainer, pl_module)
        self._show(trainer, pl_module, force=True)

    def _show(self, trainer: L.Trainer, pl_module: L.LightningModule, force: bool = False) -> None:
        status = phase_status(trainer, pl_module)
        bar = self.train_progress_bar
        if status is None or bar is None or bar.disable:
            return
        if status.phase != self._phase:
            if self._phase is not None:
                bar.close()  # leave=True: the finished phase's bar stays
                bar = self.train_progress_bar = self.init_train_tqdm()
            bar.reset(total=status.total)
            bar.initial = 0
            bar.set_description(status.phase)
            self._phase, force = status.phase, True
        if force or self._should_update(status.step, status.total):
            bar.n = status.step
            bar.set_postfix(status.metrics(), refresh=False)
            bar.refresh()


def use_phase_progress_bar(trainer: L.Trainer) -> None:
    """Replace Lightning's default progress bar (exactly RichProgressBar or TQDMProgressBar) in
    ``trainer.callbacks`` with the phase-aware subclass, keeping its refresh rate (and Rich theme). Done in place
    before Lightning attaches the module's callbacks, so nothing is reported as overridden; a bar of any other
    class, or none (``enable_progress_bar: false``), is left as it is."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) is RichProgressBar:
            trainer.callbacks[index] = GlanceRichProgressBar(refresh_rate=callback.refresh_rate,
                                                             theme=callback.theme)
        elif type(callback) is TQDMProgressBar:
            trainer.callbacks[index] = GlanceTQDMProgressBar(refresh_rate=callback.refresh_rate,
                                                             process_position=callback.process_position)
