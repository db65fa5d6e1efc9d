"""Resuming a fit: the checkpoint must be readable and must have been trained with the same settings.

A checkpoint records the run's *training identity* (everything that decides which LoRA weights a step produces:
family, the Slow/Fast lists, the step counts, LoRA shape, optimizer, caption dropout, base dtype and quantisation,
resolution, the family's own options) and where the run keeps its LoRAs. Resuming with any of these changed
would relabel or mix what was trained, so it is refused before any model is loaded, naming each setting with the
checkpoint's and the new value; only the Fast phase may be given more steps (to train on from a finished run).
Settings about where and how fast (paths, attention kernels, checkpointing,
compile, caches) may change. A resumed run writes its LoRAs where the checkpoint's run did (its run folder, also
after that folder was moved), so that every resume of one run updates the same ``slow/`` and ``fast/``.

A checkpoint also records the run's id (written into both LoRA files, so that ``sample`` can tell a pair of one
run from two runs' LoRAs; a resume keeps it) and what the run was trained on (``glance_lightning.provenance``:
every image, caption and control image by size and SHA-256, and the data settings). Resuming on other data is
refused, naming what differs, unless the user allows it (``--allow_other_data true``; in a library,
``module.allow_other_data = True``); the data may move to another folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from glance_lightning import console, provenance
from glance_lightning.errors import ConfigError
from glance_lightning.settings import plain_data

IDENTITY_KEY = "glance_identity"
LORA_DIR_KEY = "glance_lora_dir"
RUN_DIR_KEY = "glance_run_dir"
RUN_ID_KEY = "glance_run_id"
DATASET_KEY = "glance_dataset"
WORLD_KEY = "glance_world"  # how many ranks, samples per rank and micro-batches made one optimizer step
ALLOW_OTHER_DATA = "--allow_other_data true"  # the command line's override, named in the refusal
# The last phase may be lengthened (or shortened to no less than what was trained): no trained step changes label.
EXTENDABLE = frozenset({"model.fast_steps"})


def training_identity(module: Any) -> dict[str, Any]:
    """What a resume must not change, keyed by the setting's name as a config spells it."""
    lora, optim = module.lora_settings, module.optim_settings
    identity: dict[str, Any] = {
        "model.class_path (family)": module.family,
        "model.timesteps (slow, 0-1000)": [round(t, 4) for t in module.glance_timesteps.as_timesteps()["slow"]],
        "model.timesteps (fast, 0-1000)": [round(t, 4) for t in module.glance_timesteps.as_timesteps()["fast"]],
        "model.slow_steps": module.phase_steps["slow"],
        "model.fast_steps": module.phase_steps["fast"],
        "model.lora.rank": int(lora.rank),
        "model.lora.alpha": float(lora.alpha),
        "model.lora.targets": sorted(lora.targets or module.default_lora_targets),
        "model.lora.init": lora.init,
        "model.lora.dropout": float(lora.dropout),
        "model.optimizer.name": optim.name,
        "model.optimizer.lr": float(optim.lr),
        "model.optimizer.betas": [float(b) for b in optim.betas],
        "model.optimizer.weight_decay": float(optim.weight_decay),
        "model.optimizer.eps": float(optim.eps),
        "model.optimizer.warmup_steps": int(optim.warmup_steps),
        "model.caption_dropout": float(module.hparams.get("caption_dropout", 0.0)),
        "model.dropout_prompt": module.hparams.get("dropout_prompt", " "),
        "model.torch_dtype": module.dtype_name,
        "model.performance.base_quantization": module.perf.base_quantization,
        "model.resolution (data.resolution)": module.hparams.get("resolution"),
    }
    identity.update({f"model.{k}": v for k, v in module.family_options().items()})
    return plain_data(identity)  # checkpoints must load with torch.load(weights_only=True)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents (only LoRA weights and optimizer state: small), or a message naming the file and
    the checkpoints beside it."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--ckpt_path {path}: a folder; give a checkpoint file in it (a run's checkpoints/*.ckpt), "
                          "or --ckpt_path last")
    if not path.is_file():
        raise ConfigError(f"--ckpt_path {path}: no such file{_neighbours(path)}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 (zip, pickle and I/O errors all mean: this file is unusable)
        detail = str(err).split(". ")[0][:100]
        raise ConfigError(f"--ckpt_path {path}: cannot be read ({detail}): it is damaged (a full disk or a killed "
                          f"copy?) or not a checkpoint{_neighbours(path)}") from None
    if not isinstance(checkpoint, dict) or not {"state_dict", "pytorch-lightning_version"} <= checkpoint.keys():
        raise ConfigError(f"--ckpt_path {path}: not a Lightning checkpoint (a fit's checkpoints/*.ckpt); LoRA files "
                          f"are for sample and export, not for resuming{_neighbours(path)}")
    return checkpoint


def _neighbours(path: Path) -> str:
    others = sorted((p for p in path.parent.glob("*.ckpt") if p != path and _readable(p)),
                    key=lambda p: p.stat().st_mtime)
    if not others:
        return ""
    return f"; resume from the newest one beside it instead: --ckpt_path {others[-1]}"


def _readable(path: Path) -> bool:
    """Whether ``path`` opens as a zip archive (torch.save's format) whose entries are all there."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def check_resume(checkpoint: dict[str, Any], current: dict[str, Any], path: str | Path) -> None:
    """Refuse a resume whose settings differ from the checkpoint's, naming every difference."""
    saved = checkpoint.get(IDENTITY_KEY)
    if saved is None:
        return  # written before identities were recorded: nothing to compare
    changed = [f"{key}: the checkpoint has {saved[key]!r}, this run {value!r}"
               for key, value in current.items() if key in saved and saved[key] != value and key not in EXTENDABLE]
    done, total = checkpoint.get("global_step", 0), current["model.slow_steps"] + current["model.fast_steps"]
    if total < done:
        changed.append(f"model.fast_steps: the checkpoint is at step {done}, past this run's {total} steps in all")
    if changed:
        raise ConfigError(
            f"--ckpt_path {path} was trained with other settings; a resume must repeat them (or start a new run "
            "without --ckpt_path):\n  " + "\n  ".join(changed)
        )


def resumed_lora_dir(checkpoint: dict[str, Any], run_dir: Path | None = None) -> Path | None:
    """Where the checkpoint's run keeps its LoRAs (None for checkpoints that do not say): in its run folder
    (``run_dir``, where the checkpoint is now: a moved or copied run folder keeps its LoRAs with it) when they
    were in the run folder, else the ``model.output_dir`` it recorded."""
    saved, saved_run = checkpoint.get(LORA_DIR_KEY), checkpoint.get(RUN_DIR_KEY)
    if saved and saved_run and Path(saved) == Path(saved_run) and run_dir is not None:
        return run_dir
    return Path(saved) if saved else None


def adopt_unset_switches(module: Any, checkpoint: dict[str, Any]) -> None:
    """``performance.auto`` resuming: the switches a checkpoint's training depends on (the optimizer, whose state it
    holds, and the quantised base) are taken from it when left unset, so auto chooses only the others."""
    import dataclasses

    saved = checkpoint.get(IDENTITY_KEY) or {}
    if module.optim_settings.name is None and saved.get("model.optimizer.name"):
        module.optim_settings = dataclasses.replace(module.optim_settings, name=saved["model.optimizer.name"])
    if module.perf.base_quantization is None and saved.get("model.performance.base_quantization"):
        module.perf = dataclasses.replace(module.perf,
                                          base_quantization=saved["model.performance.base_quantization"])


def record(module: Any, checkpoint: dict[str, Any]) -> None:
    """Write into ``checkpoint`` what a resume checks and continues with (``on_save_checkpoint``)."""
    checkpoint["glance_seed"] = module.seed
    checkpoint[IDENTITY_KEY] = training_identity(module)
    checkpoint[LORA_DIR_KEY] = str(module.lora_dir) if module.lora_dir is not None else None
    checkpoint[RUN_DIR_KEY] = str(module.run_dir) if module.run_dir is not None else None
    checkpoint[RUN_ID_KEY] = module.run_id
    checkpoint[DATASET_KEY] = plain_data(dataset_of(module))
    checkpoint[WORLD_KEY] = world_of(module)


def restore(module: Any, checkpoint: dict[str, Any]) -> None:
    """Refuse a checkpoint of other settings or data, then continue its run: its seed and run id
    (``on_load_checkpoint``)."""
    trainer = module.attached_trainer()
    path = getattr(trainer, "ckpt_path", None)
    check_resume(checkpoint, training_identity(module), path)
    check_dataset(checkpoint, dataset_of(module), path, getattr(module, "allow_other_data", False),
                  world_of(module))
    module.seed = checkpoint.get("glance_seed", module.seed)
    module.run_id = checkpoint.get(RUN_ID_KEY) or module.run_id
    say_world_change(checkpoint.get(WORLD_KEY), world_of(module), path)


def world_of(module: Any, trainer: Any = None, datamodule: Any = None) -> dict[str, int | None]:
    """The run's world size and samples per rank (None where unknown): what makes one micro-batch."""
    trainer = trainer or module.attached_trainer()
    batch = getattr(datamodule or getattr(trainer, "datamodule", None), "batch_size", None)
    return {"world_size": int(getattr(trainer, "world_size", 1) or 1),
            "batch_size": int(batch) if isinstance(batch, int) else None}


def global_batch(world: dict[str, int | None] | None) -> int | None:
    """Samples per micro-batch over every rank (the draws are a function of the position in it)."""
    if not world or world.get("batch_size") is None:
        return None
    return int(world["world_size"]) * int(world["batch_size"])


GLOBAL_BATCH = "data.batch_size x ranks"


def with_global_batch(fingerprint: dict[str, Any] | None, world: dict[str, int | None] | None) -> dict[str, Any] | None:
    """``fingerprint`` comparing samples per micro-batch over every rank instead of per rank, where known: a
    resume on another number of ranks continues the same draws when the global batch is kept."""
    if fingerprint is None or global_batch(world) is None:
        return fingerprint
    settings = {k: v for k, v in fingerprint.get("settings", {}).items() if k != "data.batch_size"}
    return {**fingerprint, "settings": {**settings, GLOBAL_BATCH: global_batch(world)}}


def say_world_change(saved: dict[str, int | None] | None, current: dict[str, int | None],
                     path: str | Path | None) -> None:
    """One line when a checkpoint resumes on another number of ranks: the LoRAs, their AdamW state and the
    draws continue (``glance_lightning.optimizer_state``, ``glance_lightning.draws``)."""
    if not saved or saved.get("world_size") == current["world_size"]:
        return
    console.info(f"resuming {path} (written by {saved['world_size']} rank(s)) on {current['world_size']} rank(s): "
                 f"the LoRAs, their optimizer state and the draws continue")


def keeps_global_batch(saved: dict[str, int | None] | None, current: dict[str, int | None]) -> str:
    """The per-rank batch size that keeps the checkpoint's samples per micro-batch on this run's ranks."""
    before = global_batch(saved)
    if before is None or saved.get("world_size") == current["world_size"]:
        return ""
    per_rank, rest = divmod(before, current["world_size"])
    if rest or not per_rank:
        return (f" ({before} samples per step over {saved['world_size']} rank(s): no data.batch_size keeps that on "
                f"{current['world_size']} rank(s))")
    return f" (data.batch_size: {per_rank} keeps its {before} samples per step on {current['world_size']} rank(s))"


def dataset_of(module: Any) -> dict[str, Any] | None:
    """The fingerprint of the data the module trains on (computed once per fit); None without a DataModule."""
    trainer = module.attached_trainer()
    datamodule = getattr(trainer, "datamodule", None)
    if datamodule is None or not getattr(datamodule, "train_samples", None):
        return None
    cached = getattr(module, "_dataset_fingerprint", None)
    if cached is None or cached[0] is not datamodule:
        cached = (datamodule, provenance.dataset_fingerprint(datamodule))
        module._dataset_fingerprint = cached
    return cached[1]


def check_dataset_before_loading(module: Any, datamodule: Any, checkpoint: dict[str, Any], path: str | Path,
                                 trainer: Any = None) -> None:
    """The command line's data check, before any model is loaded: a DataModule that can say what it trains on
    before the fit (``fingerprint_settings``) is set up now and compared with ``checkpoint``'s data."""
    if module.allow_other_data or checkpoint.get(DATASET_KEY) is None or \
            not callable(getattr(datamodule, "fingerprint_settings", None)):
        return
    datamodule.setup("fit")  # validates and loads the data once; the fit reuses it
    current = provenance.dataset_fingerprint(datamodule)
    module._dataset_fingerprint = (datamodule, current)
    world = world_of(module, trainer, datamodule) if trainer is not None else None
    check_dataset(checkpoint, current, path, world=world)


def check_dataset(checkpoint: dict[str, Any], current: dict[str, Any] | None, path: str | Path | None,
                  allow: bool = False, world: dict[str, int | None] | None = None) -> None:
    """Refuse to resume ``checkpoint`` on data other than it was trained on (one line naming what differs),
    unless ``allow``: then one line says what differs and the run goes on. With this run's ``world`` and a
    checkpoint that recorded its own, the batch is compared over every rank (a resume on another number of ranks
    keeps the samples per step, not per rank)."""
    saved, saved_world = checkpoint.get(DATASET_KEY), checkpoint.get(WORLD_KEY)
    if saved is None or current is None:
        return  # written before datasets were recorded, or no data to compare
    if world is not None and global_batch(saved_world) is not None and global_batch(world) is not None:
        saved, current = with_global_batch(saved, saved_world), with_global_batch(current, world)
    differences = provenance.differences(saved, current)
    if not differences:
        return
    what = provenance.summary(differences)
    if world is not None and any(GLOBAL_BATCH in d for d in differences.get("settings", [])):
        what += keeps_global_batch(saved_world, world)
    if allow:
        console.info(f"resuming {path} on other data than it was trained on ({ALLOW_OTHER_DATA}): {what}")
        return
    raise ConfigError(f"--ckpt_path {path} was trained on other data: {what}; resume with the same data, start a "
                      f"new run without --ckpt_path, or continue on this data with {ALLOW_OTHER_DATA}")
