"""One folder per run: where every output of a ``fit`` goes, whatever the logger.

A run writes into ``<trainer.default_root_dir>/version_N/``: ``config.yaml``, ``slow/`` and ``fast/``,
``samples/``, ``checkpoints/``, ``README.md`` (the model card) and the logger's own files (``tensorboard/``,
``metrics.csv``, ``wandb/``), named the same way for TensorBoard (the default), CSV, W&B and no logger. Lightning
alone would put them in four places depending on the logger (``lightning_logs/version_N`` for TensorBoard and
CSV, ``./wandb`` plus ``./<project>/<id>/checkpoints`` for W&B, the root itself with no logger).

**Claiming.** A new run claims the next free ``version_N`` with ``os.mkdir``, which either creates the folder or
fails if it exists, atomically, also on network filesystems (NFS creates directories exclusively): two runs
started together into one root get two folders. A resume (``--ckpt_path``) writes into the folder of the
checkpoint's run (``<run>/checkpoints/x.ckpt``) and W&B continues the same run id.

**Processes.** The claiming process exports the folder as ``GLANCE_LIGHTNING_RUN_DIR`` while the command runs, so
the processes Lightning's DDP launcher starts (they run the same command again) use it instead of claiming
their own; a launcher across nodes (torchrun, SLURM) sets it for every rank.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from glance_lightning.errors import ConfigError, MissingFileError, UnwritableError

RUN_DIR_ENV = "GLANCE_LIGHTNING_RUN_DIR"
VERSION_PATTERN = re.compile(r"version_(\d+)")
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"
# Logger classes whose location settings glance_lightning sets: {class name: {setting: value kind}}
_PLACED = {
    "TensorBoardLogger": {"save_dir": "root", "name": "", "version": "version", "sub_dir": TENSORBOARD_DIR},
    "CSVLogger": {"save_dir": "root", "name": "", "version": "version"},
    "WandbLogger": {"save_dir": "run", "dir": "run"},
}


def check_root(root: Path, setting: str = "trainer.default_root_dir") -> None:
    """Create the folder ``root`` or say in one line, naming ``setting``, why nothing can be written there."""
    if root.exists() and not root.is_dir():
        raise UnwritableError(f"{setting}: {root} is a file, not a folder; choose a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UnwritableError(f"{setting}: cannot create {root} ({err.strerror or err}); choose a writable "
                              "folder") from err
    if not os.access(root, os.W_OK | os.X_OK):
        raise UnwritableError(f"{setting}: {root} is not writable; choose another folder")


def nearest_existing(path: Path) -> Path:
    """``path`` itself, or the closest of its parents that exists (a folder or a file in the way)."""
    return next(folder for folder in (path.absolute(), *path.absolute().parents) if folder.exists())


def check_destination(path: Path, setting: str, named: Path | None = None) -> None:
    """Before any work: files can be written in the folder ``path`` (made later, by the writer). Probes by making
    and removing an empty folder in its nearest existing ancestor, so nothing is left behind."""
    import tempfile

    ancestor = nearest_existing(path)
    if not ancestor.is_dir():
        raise UnwritableError(f"{setting} {named or path}: {ancestor} is a file, not a folder; choose a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".glance-probe-", dir=ancestor))
    except OSError as err:
        raise UnwritableError(f"{setting} {named or path}: cannot write in {ancestor} ({err.strerror or err}); "
                              "choose a writable folder") from None


def check_cache_folder(path: Path, setting: str, fix: str = "give a folder (or another path)") -> None:
    """A cache folder ``setting`` names must not be a file (nor lie under one): one line naming it and the fix."""
    ancestor = nearest_existing(path)
    if not ancestor.is_dir():
        where = "is a file" if ancestor == path.absolute() else f"lies under {ancestor}, which is a file"
        raise ConfigError(f"{setting}: {path} {where}, not a folder; {fix}")


def folder_writable(path: Path) -> bool:
    """Whether files can be created in ``path`` (a missing folder: whether its nearest existing parent allows it)."""
    return os.access(nearest_existing(path), os.W_OK | os.X_OK)


def holds_results(run_dir: Path) -> bool:
    """Whether a run folder holds anything beyond what starting a fit writes (config.yaml and the loggers' files):
    LoRAs, samples, a model card or checkpoints."""
    starts = {"config.yaml", TENSORBOARD_DIR, "metrics.csv", "hparams.yaml", "wandb", CHECKPOINT_DIR}
    if any(path.name not in starts for path in run_dir.iterdir()):
        return True
    return (run_dir / CHECKPOINT_DIR).is_dir() and any((run_dir / CHECKPOINT_DIR).iterdir())


def versions(root: Path) -> list[int]:
    """The run numbers already in ``root``."""
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := VERSION_PATTERN.fullmatch(p.name)))


def claim(root: Path, setting: str = "trainer.default_root_dir") -> Path:
    """Create and return the next free ``root/version_N``, absolute (exclusive: a folder another run made is
    skipped)."""
    root = root.absolute()
    check_root(root, setting)
    number = (versions(root) or [-1])[-1] + 1
    while True:
        path = root / f"version_{number}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            number += 1
        except OSError as err:
            raise UnwritableError(f"{setting}: cannot create {path} ({err.strerror or err}); choose a writable "
                                  "folder") from err


def checkpoint_run_dir(ckpt_path: Path) -> Path | None:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/x.ckpt``), or None for one kept elsewhere."""
    parent = ckpt_path.absolute().parent
    return parent.parent if parent.name == CHECKPOINT_DIR else None


def find_last_checkpoint(root: Path) -> Path:
    """The newest ``last.ckpt`` of the runs under ``root`` (trainer.default_root_dir)."""
    candidates = sorted(root.glob(f"**/{CHECKPOINT_DIR}/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise MissingFileError(
            f"--ckpt_path last: no {CHECKPOINT_DIR}/last.ckpt under {root}; pass a checkpoint path, or train with "
            "a ModelCheckpoint that has save_last: true (the shipped configs do)"
        )
    return candidates[-1]


def resolve(root: Path, ckpt_path: Path | None) -> Path:
    """The run folder of a fit: the launcher's (``GLANCE_LIGHTNING_RUN_DIR``), a resumed checkpoint's, or a newly
    claimed one."""
    given = os.environ.get(RUN_DIR_ENV)
    if given:
        path = Path(given).absolute()
        check_root(path, RUN_DIR_ENV)
        return path
    if ckpt_path is not None and (resumed := checkpoint_run_dir(ckpt_path)) is not None:
        return resumed
    return claim(root)


def shown(path: Path) -> str:
    """``path`` as printed: relative to the working folder when inside it."""
    path = Path(path)
    try:
        return str(path.absolute().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def restore_env(previous: str | None) -> None:
    """``GLANCE_LIGHTNING_RUN_DIR`` back to what it was before a command set it."""
    if previous is None:
        os.environ.pop(RUN_DIR_ENV, None)
    else:
        os.environ[RUN_DIR_ENV] = previous


def default_logger() -> dict[str, Any]:
    """Lightning's own default (TensorBoard when installed, else CSV) as a class_path config."""
    from lightning.fabric.loggers.tensorboard import _TENSORBOARD_AVAILABLE, _TENSORBOARDX_AVAILABLE

    if _TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE:  # without the placeholder hp_metric = -1 curve
        return {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"default_hp_metric": False}}
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {}}


def wandb_run_id(run_dir: Path) -> str | None:
    """The W&B run id an earlier fit in ``run_dir`` used (``wandb/[offline-]run-<time>-<id>``), if any."""
    runs = sorted((run_dir / "wandb").glob("*run-*-*"), key=lambda p: p.stat().st_mtime)
    runs = [p for p in runs if p.is_dir()]
    return runs[-1].name.rsplit("-", 1)[-1] if runs else None


def place_loggers(logger: Any, run_dir: Path, resuming: bool) -> tuple[Any, list[str]]:
    """The trainer's ``logger`` setting (parsed, not yet instantiated) with every known logger's files put in
    ``run_dir``; and one note per location setting of the user's that was replaced."""
    if logger is False:
        return logger, []
    entries = logger if isinstance(logger, list) else [default_logger() if logger in (None, True) else logger]
    notes: list[str] = []
    placed = [_place(entry, run_dir, resuming, notes) for entry in entries]
    return (placed if isinstance(logger, list) else placed[0]), notes


def _place(entry: Any, run_dir: Path, resuming: bool, notes: list[str]) -> Any:
    class_path = _get(entry, "class_path")
    name = str(class_path or "").rsplit(".", 1)[-1]
    if name not in _PLACED:
        return entry
    init_args = _get(entry, "init_args")
    if init_args is None:
        init_args = {}
        _set(entry, "init_args", init_args)
    values = {"root": str(run_dir.parent), "run": str(run_dir), "version": run_dir.name}
    for key, kind in _PLACED[name].items():
        value = values.get(kind, kind)
        current = _get(init_args, key)
        if current not in (None, "", ".", "lightning_logs", value):
            notes.append(f"trainer.logger ({name}) {key}={current!r} replaced: every file of a run goes into {run_dir}")
        _set(init_args, key, value)
    if name == "WandbLogger" and resuming and not _get(init_args, "id") and not _get(init_args, "version"):
        run_id = wandb_run_id(run_dir)
        if run_id:  # the resumed run's curves continue in the same W&B run (WandbLogger resumes with "allow")
            _set(init_args, "id", run_id)
    return entry


def _get(container: Any, key: str) -> Any:
    return container.get(key) if isinstance(container, dict) else getattr(container, key, None)


def _set(container: Any, key: str, value: Any) -> None:
    if isinstance(container, dict):
        container[key] = value
    else:
        setattr(container, key, value)


def place_checkpoints(trainer: Any, run_dir: Path, resuming: bool) -> None:
    """Every ModelCheckpoint without a ``dirpath`` of its own saves into ``run_dir/checkpoints``. A resume
    continues there, so Lightning's "Checkpoint directory ... exists and is not empty" is expected for that one
    folder and not shown (it still shows for any other)."""
    import warnings

    from lightning.pytorch.callbacks import ModelCheckpoint

    folder = str(run_dir / CHECKPOINT_DIR)
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
            callback.dirpath = folder
    if resuming:
        warnings.filterwarnings("ignore", message=f"Checkpoint directory {re.escape(folder)} exists and is not empty")
