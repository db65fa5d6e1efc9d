"""Pre-flight checks of a fit, run before the base model is loaded (or, for disk space, before training).

Each check names the setting and the fix. This module also says where a run writes: ``run_dir`` (logs,
samples, config; the command line claims the folder, ``glance_lightning.run_folder``) and ``output_dir`` (the
LoRAs: ``model.output_dir``, else the run folder, which on resume is the resumed run's).
"""

from __future__ import annotations

import difflib
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glance_lightning import atomic
from glance_lightning.draws import TrainSample
from glance_lightning.errors import ConfigError, DiskSpaceError, ExistingFileError
from glance_lightning.run_folder import check_root

PHASES = ("slow", "fast")


def run_dir(trainer: Any) -> Path:
    """The run's folder: the one the command line claimed (``glance_lightning.run_folder``) or, for a Trainer
    built by hand, ``trainer_run_dir`` as the module resolved it in setup (``GlanceModule.run_dir``)."""
    module = trainer.lightning_module
    folder = getattr(module, "run_dir", None) or getattr(module, "claimed_run_dir", None)
    return Path(folder) if folder is not None else trainer_run_dir(trainer)


def trainer_run_dir(trainer: Any) -> Path:
    """Lightning's own idea of the run folder: the first logger's version folder, else ``default_root_dir``. In
    DDP this is a collective (``trainer.log_dir`` broadcasts): call it on every rank."""
    return Path(trainer.log_dir or trainer.default_root_dir)


def output_dir(trainer: Any, configured: str | os.PathLike | None, ckpt_path: str | os.PathLike | None) -> Path:
    """Where ``slow/`` and ``fast/`` go: ``model.output_dir``; else a resumed run's own folder; else the run dir."""
    if configured is not None:
        return Path(configured)
    if ckpt_path is not None:
        return Path(ckpt_path).parent.parent  # <run>/checkpoints/last.ckpt
    return run_dir(trainer)


def check_output_dir(path: Path, setting: str = "model.output_dir") -> None:
    """Create ``path`` or report why it cannot be written (call on global rank 0)."""
    check_root(path, setting)


def remove_leftovers(trainer: Any, run_folder: Path | None, lora_dir: Path | None, whole_run: bool) -> None:
    """Delete what killed saves left (``atomic.remove_leftovers``) in every folder this fit writes to: the LoRA
    folders, the checkpoint folders and the run folder (with all below it when ``whole_run``: a folder the command
    line claimed; a hand-built Trainer's folder may be any working directory, so only its top)."""
    folders = [(lora_dir / p, False) for p in PHASES] if lora_dir is not None else []
    folders += [(Path(cb.dirpath), False) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)]
    if run_folder is not None:
        folders.append((run_folder, whole_run))
    for folder, recursive in folders:
        atomic.remove_leftovers(folder, recursive=recursive)


def _holds_results(folder: Path) -> bool:
    """Whether ``folder`` exists holding anything but the temporary files of saves (``.<name>.*.tmp``)."""
    if not folder.exists():
        return False
    return not folder.is_dir() or any(not (p.name.startswith(".") and p.name.endswith(atomic.TEMP_SUFFIX))
                                      for p in folder.iterdir())


def refuse_overwrite(path: Path | None, resuming: bool) -> None:
    """A new (not resumed) run never writes over LoRAs that already exist in its output directory."""
    if path is None or resuming:
        return
    existing = [path / p for p in PHASES if _holds_results(path / p)]
    if existing:
        raise ExistingFileError(
            f"model.output_dir: {', '.join(map(str, existing))} already exist(s) and would be "
            "overwritten; choose another output_dir, move them away, or resume with --ckpt_path"
        )


@dataclass(frozen=True)
class SpaceNeed:
    """Bytes a fit will write into ``path`` at most (with the temporary copy an atomic write makes), for what."""

    path: Path
    need_bytes: int
    what: str


def checkpoint_needs(trainer: Any, adapter_bytes: int, total_steps: int) -> list[SpaceNeed]:
    """What the trainer's ModelCheckpoint callbacks will keep on disk: each checkpoint holds the LoRA weights and
    their two AdamW moments (3 x ``adapter_bytes``, plus bookkeeping), times the files kept (``save_top_k``, all
    of a ``-1`` run's saves, ``save_last``) plus the one being written before an older one is removed."""
    from lightning.fabric.utilities.cloud_io import _is_local_file_protocol
    from lightning.pytorch.callbacks import ModelCheckpoint

    size = 3 * adapter_bytes + 64 * 1024
    needs = []
    for callback in trainer.checkpoint_callbacks:
        if not isinstance(callback, ModelCheckpoint):
            continue
        directory = callback.dirpath or run_dir(trainer) / "checkpoints"
        if not _is_local_file_protocol(directory):
            continue
        every = callback._every_n_train_steps  # no public accessor (Lightning 2.x)
        saves = total_steps // every if every > 0 else 1
        top_k = saves if callback.save_top_k < 0 else min(callback.save_top_k, saves)
        kept = top_k + (1 if callback.save_last and callback.save_last != "link" else 0)
        last = f", save_last={callback.save_last}" if callback.save_last else ""
        if kept:
            needs.append(SpaceNeed(Path(directory), (kept + 1) * size,
                                   f"{kept} checkpoint(s) of about {size / 2**20:.1f} MiB (ModelCheckpoint "
                                   f"save_top_k={callback.save_top_k}{last})"))
    return needs


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing parent (a checkpoint folder is made by the first save)."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_free_space(path: Path, need_bytes: int, checkpoints: Sequence[SpaceNeed] = ()) -> None:
    """Refuse a fit whose LoRAs (``need_bytes`` in ``path``) and checkpoints would not fit on their disks; the
    needs of folders on one filesystem are added up."""
    needs = [SpaceNeed(path, need_bytes, "both LoRAs"), *checkpoints]
    groups: dict[int, list[SpaceNeed]] = {}
    for need in needs:
        groups.setdefault(os.stat(_existing(need.path)).st_dev, []).append(need)
    for group in groups.values():
        free = shutil.disk_usage(_existing(group[0].path)).free
        total = sum(need.need_bytes for need in group)
        if free >= total:
            continue
        parts = " and ".join(f"{need.what} in {need.path}" for need in group)
        if all(need in checkpoints for need in group):
            setting, fix = "checkpoints", "keep fewer checkpoints (ModelCheckpoint save_top_k) or set its dirpath"
        elif any(need in checkpoints for need in group):
            setting, fix = "model.output_dir and checkpoints", "keep fewer checkpoints, or choose another disk"
        else:
            setting, fix = "model.output_dir", "choose another output_dir"
        raise DiskSpaceError(
            f"{setting}: {group[0].path} has {free / 2**20:.1f} MiB free but {parts} need(s) about "
            f"{total / 2**20:.1f} MiB; free some space or {fix}"
        )


def set_max_steps(trainer: Any, total_steps: int) -> None:
    """The phases decide ``trainer.max_steps``; a config that disagrees is refused."""
    if trainer.max_steps == -1:
        trainer.fit_loop.epoch_loop.max_steps = total_steps
    elif trainer.max_steps != total_steps:
        raise ConfigError(
            f"trainer.max_steps={trainer.max_steps} but model.slow_steps + model.fast_steps = "
            f"{total_steps}; leave trainer.max_steps unset (the phases decide it)"
        )


def check_trainer_flags(strategy: Any, accelerator: Any, devices: Any) -> None:
    """The trainer's strategy name and device count as the config gives them, checked before any run folder,
    logger or process exists: an unknown name, Lightning's FSDP1 or DeepSpeed, or more devices than this
    machine has (CPU devices are processes: at most one per core) is one line."""
    from lightning.pytorch.strategies import StrategyRegistry

    from glance_lightning import sharding

    if isinstance(strategy, str):
        name = strategy.lower()
        if name != "auto" and name not in StrategyRegistry:
            supported = [sharding.STRATEGY_NAME, "auto",
                         *(k for k in StrategyRegistry if k.endswith("unused_parameters_true"))]
            close = difflib.get_close_matches(name, supported, n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(
                f"trainer.strategy: {strategy!r} is not a strategy; {hint}use auto (one device), "
                f"ddp_find_unused_parameters_true (the base copied on each device) or {sharding.STRATEGY_NAME} "
                "(the base sharded over devices)")
        if name.startswith(("fsdp", "deepspeed")) and name != sharding.STRATEGY_NAME:
            raise ConfigError(
                f"trainer.strategy: {strategy} is not supported (flat parameters mixing the frozen base and the "
                f"LoRA weights); use strategy: {sharding.STRATEGY_NAME} to shard the base over devices (FSDP2)")
    wanted = requested_devices(devices)
    if wanted is None:
        return
    where = str(accelerator).lower() if isinstance(accelerator, str) else "auto"
    import torch

    if where == "auto":
        where = "cuda" if torch.cuda.is_available() else "cpu"
    available = {"cpu": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                 "cuda": torch.cuda.device_count(), "gpu": torch.cuda.device_count()}.get(where)
    if available is not None and wanted > available:
        unit = "CPU core(s) (each CPU device is one process)" if where == "cpu" else "CUDA device(s)"
        raise ConfigError(f"trainer.devices={devices}: this machine has {available} {unit}; "
                          f"set trainer.devices to at most {available}")


def check_trainer_counts(trainer: Any) -> None:
    """Trainer counts Lightning takes without complaint but that train nothing (0 batches per step)."""
    value = getattr(trainer, "accumulate_grad_batches", 1)
    if isinstance(value, int) and value < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={value}: must be >= 1 (1 = one batch per step)")


def requested_devices(devices: Any) -> int | None:
    """How many devices ``trainer.devices`` asks for (an int, a digit string or a list of ids); None for
    "auto", -1 and anything Lightning itself parses and checks."""
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.strip().isdigit():
        devices = int(devices)
    return devices if isinstance(devices, int) and devices > 0 else None


def check_strategy(strategy: Any, module: Any = None) -> None:
    """One device, DDP told about unused parameters, or FSDP2 sharding (``glance_lightning.sharding``) with
    ``module``'s settings it can serve; other sharding strategies are refused with the one to use."""
    from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

    from glance_lightning import sharding

    if sharding.is_sharded(strategy):
        sharding.check_sharding(strategy, module)
        return
    if not isinstance(strategy, (DDPStrategy, SingleDeviceStrategy)):
        # FSDP1, DeepSpeed: flat parameters mixing the frozen base and the LoRA weights, shards saved per rank;
        # refused, not guessed. FSDP2 through Lightning's ModelParallelStrategy is the supported way to shard.
        raise ConfigError(
            f"trainer.strategy: {type(strategy).__name__} is not supported; to shard the base model over devices "
            f"use strategy: {sharding.STRATEGY_NAME} (FSDP2), or ddp_find_unused_parameters_true to replicate it. "
            "To fit a large base model on one card, see model.performance (base_quantization, "
            "gradient_checkpointing)"
        )
    # DDPStrategy keeps its DistributedDataParallel kwargs private (no public accessor in Lightning 2.x).
    if isinstance(strategy, DDPStrategy) and not strategy._ddp_kwargs.get("find_unused_parameters", False):
        raise ConfigError(
            "trainer.strategy: DDP must be told that the inactive adapter gets no gradient; use "
            "strategy: ddp_find_unused_parameters_true (or ddp_spawn_find_unused_parameters_true), or "
            f"{sharding.STRATEGY_NAME} to shard the base"
        )


def check_samples(samples: Sequence[TrainSample], family: str, size_multiple: int,
                  control_images: tuple[int, int]) -> None:
    """What a family needs of the loaded data: image sides and the number of control images."""
    low, high = control_images
    for item in samples:
        if item.pixels.shape[-1] % size_multiple or item.pixels.shape[-2] % size_multiple:
            raise ConfigError(
                f"{item.image}: size {tuple(item.pixels.shape[-2:])} is not a multiple of "
                f"{size_multiple} as {family} needs; set data.size_multiple to a multiple of it"
            )
        if not low <= len(item.controls) <= high:
            wanted = "no control images" if high == 0 else f"{low} to {high} control image(s)"
            raise ConfigError(
                f"{item.image}: has {len(item.controls)} control image(s) but {family} takes "
                f"{wanted}; use a family that matches the dataset layout (flat vs image/ + control/)"
            )
