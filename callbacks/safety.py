"""Keep what the user trained when a run ends badly (Ctrl-C, NaN loss, any error after training started).

On an exception the current adapters are written next to the run's LoRAs when every weight is finite (they
are then the last good ones: a non-finite loss is caught before its backward pass); otherwise the files
already on disk are left untouched. Errors raised before training starts (bad config, existing output
directory) never write anything. If saving fails too (a full disk stops the run, then this save), that is said
in one line and the exception that ended the run is the one that propagates; the previous files stay intact
(writes are atomic, ``glance_lightning.atomic``).
"""

from __future__ import annotations

import logging

import lightning as L
import torch

log = logging.getLogger(__name__)


class KeepLorasOnFailure(L.Callback):
    """Always attached by GlanceModule.configure_callbacks."""

    def __init__(self) -> None:
        self.training_started = False
        self.outcome: str | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.training_started = True

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not self.training_started or pl_module.transformer is None:
            return
        from glance_lightning.families.base import NonFiniteLossError

        if pl_module.sharded and not isinstance(exception, NonFiniteLossError):
            # Gathering the shards needs every rank, which may be elsewhere or gone (Ctrl-C, one rank's error).
            # A non-finite loss is agreed on by all ranks at the same point (an all-reduce), so it is saved below.
            self.outcome = (f"sharded run: the LoRAs of step {trainer.global_step} were not gathered; kept those "
                            f"already saved in {pl_module.lora_dir}; the last checkpoint holds the latest "
                            "(resume with --ckpt_path last)")
            self._tell(trainer, exception)
            return
        params = [p for phase in ("slow", "fast") for p in pl_module.adapter_parameters(phase)]
        if not _all_finite(trainer, pl_module, params):
            self.outcome = f"adapters are not finite; kept the LoRAs already saved in {pl_module.lora_dir}"
        else:
            try:
                paths = pl_module.save_loras()
            except Exception as err:  # e.g. the disk that stopped the run is still full: report the run's error
                self.outcome = (f"could not save the LoRAs of step {trainer.global_step} ({err}); kept the LoRAs "
                                f"already saved in {pl_module.lora_dir}")
            else:
                self.outcome = f"saved the LoRAs of step {trainer.global_step} to {', '.join(map(str, paths))}"
        self._tell(trainer, exception)

    def _tell(self, trainer: L.Trainer, exception: BaseException) -> None:
        if trainer.is_global_zero:
            log.warning("%s: %s", type(exception).__name__, self.outcome)
            print(f"glance_lightning: {type(exception).__name__}: {self.outcome}", flush=True)


def _all_finite(trainer: L.Trainer, pl_module: L.LightningModule, params: list[torch.Tensor]) -> bool:
    """Every adapter weight finite; sharded, each rank checks its own shards and the ranks agree (a collective:
    only sharded runs, where every rank is here together)."""
    from torch.distributed.tensor import DTensor

    from glance_lightning.sharding import on_every_rank

    local = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all()) for p in params)
    return on_every_rank(trainer, local) if pl_module.sharded else local
