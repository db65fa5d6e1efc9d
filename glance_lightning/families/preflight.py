"""Pre-flight checks of a fit, run before the base model is loaded (or, for disk space, before training).

Each check names the setting and the fix. This module also owns where a run writes: ``run_dir`` (logs,
samples, config) and ``output_dir`` (the LoRAs: ``model.output_dir``, else the run directory, which on resume
is the resumed run's).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from glance_lightning.draws import TrainSample

PHASES = ("slow", "fast")


def run_dir(trainer: Any) -> Path:
    """The run's directory: the logger's version folder, else ``trainer.default_root_dir``."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def output_dir(trainer: Any, configured: str | os.PathLike | None, ckpt_path: str | os.PathLike | None) -> Path:
    """Where ``slow/`` and ``fast/`` go: ``model.output_dir``; else a resumed run's own folder; else the run dir."""
    if configured is not None:
        return Path(configured)
    if ckpt_path is not None:
        return Path(ckpt_path).parent.parent  # <run>/checkpoints/last.ckpt
    return run_dir(trainer)


def check_output_dir(path: Path) -> None:
    """Create ``path`` or report why it cannot be written (call on global rank 0)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"model.output_dir: cannot create {path} ({err}); choose a writable folder") from err
    if not os.access(path, os.W_OK):
        raise PermissionError(f"model.output_dir: {path} is not writable; choose another folder")


def refuse_overwrite(path: Path | None, resuming: bool) -> None:
    """A new (not resumed) run never writes over LoRAs that already exist in its output directory."""
    if path is None or resuming:
        return
    existing = [path / p for p in PHASES if (path / p).exists()]
    if existing:
        raise FileExistsError(
            f"model.output_dir: {', '.join(map(str, existing))} already exist(s) and would be "
            "overwritten; choose another output_dir, move them away, or resume with --ckpt_path"
        )


def check_free_space(path: Path, need_bytes: int) -> None:
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OSError(
            f"model.output_dir: {path} has {free / 2**20:.1f} MiB free but saving both LoRAs needs "
            f"about {need_bytes / 2**20:.1f} MiB; free some space or choose another output_dir"
        )


def set_max_steps(trainer: Any, total_steps: int) -> None:
    """The phases decide ``trainer.max_steps``; a config that disagrees is refused."""
    if trainer.max_steps == -1:
        trainer.fit_loop.epoch_loop.max_steps = total_steps
    elif trainer.max_steps != total_steps:
        raise ValueError(
            f"trainer.max_steps={trainer.max_steps} but model.slow_steps + model.fast_steps = "
            f"{total_steps}; leave trainer.max_steps unset (the phases decide it)"
        )


def check_strategy(strategy: Any) -> None:
    """One device or DDP told about unused parameters; sharding strategies are refused with the alternatives."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    if not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        # Sharding strategies (FSDP, DeepSpeed, model parallel) would leave each rank with a shard of the
        # LoRA weights when they are saved; that path is not implemented, so it is refused, not guessed.
        raise ValueError(
            f"trainer.strategy: {type(strategy).__name__} shards parameters, which glance_lightning does not "
            "support yet; use one device, or ddp_find_unused_parameters_true across devices. To fit a large "
            "base model on one card, see model.performance (base_quantization, gradient_checkpointing)"
        )
    # DDPStrategy keeps its DistributedDataParallel kwargs private (no public accessor in Lightning 2.x).
    if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise ValueError(
            "trainer.strategy: DDP must be told that the inactive adapter gets no gradient; use "
            "strategy: ddp_find_unused_parameters_true (or ddp_spawn_find_unused_parameters_true)"
        )


def check_samples(samples: Sequence[TrainSample], family: str, size_multiple: int,
                  control_images: tuple[int, int]) -> None:
    """What a family needs of the loaded data: image sides and the number of control images."""
    low, high = control_images
    for item in samples:
        if item.pixels.shape[-1] % size_multiple or item.pixels.shape[-2] % size_multiple:
            raise ValueError(
                f"{item.image}: size {tuple(item.pixels.shape[-2:])} is not a multiple of "
                f"{size_multiple} as {family} needs; set data.size_multiple to a multiple of it"
            )
        if not low <= len(item.controls) <= high:
            wanted = "no control images" if high == 0 else f"{low} to {high} control image(s)"
            raise ValueError(
                f"{item.image}: has {len(item.controls)} control image(s) but {family} takes "
                f"{wanted}; use a family that matches the dataset layout (flat vs image/ + control/)"
            )
