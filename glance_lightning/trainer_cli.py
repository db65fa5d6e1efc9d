"""``fit`` and the other LightningCLI subcommands: LightningCLI over any ``GlanceModule`` family and any
LightningDataModule, the run folder it claims (``glance_lightning.run_folder``) and the checks it makes before any
model loads. ``glance_lightning.cli`` dispatches to it; ``cache`` and ``plan`` parse fit configs with it.
"""

from __future__ import annotations

import os
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

from glance_lightning import console, errors


def run_lightning_cli(args: list[str] | None, run: bool = True, instantiate: bool = True) -> object:
    """LightningCLI over any GlanceModule family and any LightningDataModule (imported only here); ``args`` None
    reads ``sys.argv`` (LightningCLI warns when given both). ``instantiate=False`` (with ``run=False``) only parses:
    ``cli.config`` holds fit's options and nothing is built (the ``plan`` command). ``fit`` writes into one run
    folder (``glance_lightning.run_folder``)."""
    from lightning import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from glance_lightning.families.base import GlanceModule

    claimed: list[Path] = []
    trainers: list[Any] = []  # the fit's trainer, once built: whether a failed run took any step

    class GlanceCLI(LightningCLI):
        run_dir: Path | None = None

        def instantiate_classes(self) -> None:
            if instantiate:
                super().instantiate_classes()

        def add_arguments_to_parser(self, parser) -> None:
            # The phases set max_steps once the model is known; -1 says "no epoch limit" so that Lightning does
            # not warn that max_epochs was not set and fall back to 1000 epochs.
            parser.set_defaults({"trainer.max_epochs": -1})
            # Settings that must agree: the training resolution the lists are derived at is the data's.
            parser.link_arguments("data", "model.init_args.resolution", compute_fn=data_resolution,
                                  apply_on="instantiate")
            parser.add_argument("--allow_other_data", type=bool, default=False,
                                help="with --ckpt_path: continue the run on other data than it was trained on")

        def _parse_ckpt_path(self) -> None:
            # LightningCLI would silently replace the run's model settings with the checkpoint's hyperparameters
            # (a resume then trains other settings than the config says); before_fit refuses differences instead.
            return

        def before_instantiate_classes(self) -> None:
            # Before any logger exists: the run folder (claimed, or the resumed run's) and every logger in it.
            if self.subcommand == "fit" and instantiate:
                trainer = self.config.fit.trainer
                check_trainer_flags(trainer.strategy, trainer.accelerator, trainer.devices)
                check_trainer_counts(trainer)
                self.run_dir = place_run(self.config.fit, claimed)

        def before_fit(self) -> None:
            # Before any model is loaded: refuse to write over the LoRAs of an earlier run; a logger that
            # cannot start is reported here, not after the model has loaded.
            module, kwargs = self.model, self.config_init[self.subcommand]
            trainers.append(self.trainer)
            check_strategy(self.trainer.strategy, module)  # before Lightning's launcher starts other processes
            ckpt_path = kwargs.get("ckpt_path")
            lora_dir = module.lora_dir
            module.allow_other_data = bool(kwargs.get("allow_other_data"))
            if ckpt_path is not None:  # readable, trained with these settings and data; LoRAs stay with its run
                checkpoint = resume.read_checkpoint(ckpt_path)
                resume.adopt_unset_switches(module, checkpoint)
                resume.check_resume(checkpoint, resume.training_identity(module), ckpt_path)
                resume.check_dataset_before_loading(module, self.datamodule, checkpoint, ckpt_path, self.trainer)
                lora_dir = lora_dir or resume.resumed_lora_dir(checkpoint, self.run_dir)
            module.claimed_run_dir = module.run_dir = self.run_dir
            module.lora_dir = lora_dir or self.run_dir
            module.refuse_overwrite(resuming=ckpt_path is not None)
            run_folder.place_checkpoints(self.trainer, self.run_dir, resuming=ckpt_path is not None)
            if self.trainer.is_global_zero:
                start_loggers(self.trainer.loggers)

    from glance_lightning import run_folder
    from glance_lightning.families import resume
    from glance_lightning.families.preflight import check_strategy, check_trainer_counts, check_trainer_flags

    no_exit = {"exit_on_error": False}  # parse errors raise, so that main() reports them in one line
    previous = os.environ.get(run_folder.RUN_DIR_ENV)
    failed = True
    try:
        cli = GlanceCLI(
            GlanceModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            seed_everything_default=0,
            args=args,
            run=run,
            auto_configure_optimizers=False,
            save_config_callback=_save_config_callback(),
            save_config_kwargs={"save_to_log_dir": True},
            parser_kwargs={**no_exit, **{command: no_exit for command in ("fit", "validate", "test", "predict")}},
        )
        failed = False
        return cli
    finally:
        run_folder.restore_env(previous)
        release(claimed, untrained=failed and not any(getattr(t, "global_step", 0) for t in trainers))


def release(claimed: list[Path], untrained: bool) -> None:
    """The folders a fit claimed, after it: a run that stopped before its first step, holding nothing but its
    config and logger files, is removed (and the root, if the fit made it and it is empty); nothing is left behind
    by a mistake. Empty folders are removed in any case."""
    from glance_lightning import run_folder

    for path in claimed:
        if untrained and path.is_dir() and run_folder.VERSION_PATTERN.fullmatch(path.name) \
                and not run_folder.holds_results(path):
            shutil.rmtree(path, ignore_errors=True)
        with suppress(OSError):
            path.rmdir()


def place_run(config: Any, claimed: list[Path]) -> Path:
    """Resolve ``--ckpt_path last``, claim (or reuse) the run folder, export it to the processes a launcher
    starts, and put the loggers' files in it."""
    from glance_lightning import run_folder

    root = Path(config.trainer.default_root_dir or os.getcwd())
    if config.get("ckpt_path") == "last":
        config.ckpt_path = str(run_folder.find_last_checkpoint(root))
    ckpt_path = Path(config.ckpt_path) if config.get("ckpt_path") else None
    fresh = os.environ.get(run_folder.RUN_DIR_ENV) is None and (
        ckpt_path is None or run_folder.checkpoint_run_dir(ckpt_path) is None)
    new_root = not root.exists()
    run_dir = run_folder.resolve(root, ckpt_path)
    if fresh:  # removed again if the run stops before its first step (and the root, when it made it)
        claimed.extend([run_dir, root.absolute()] if new_root else [run_dir])
    os.environ[run_folder.RUN_DIR_ENV] = str(run_dir)
    config.trainer.logger, notes = run_folder.place_loggers(config.trainer.logger, run_dir, ckpt_path is not None)
    for note in notes:
        console.info(note)
    return run_dir


def start_loggers(loggers: list[Any]) -> None:
    """Start each logger now (W&B login, TensorBoard writer), so that one that cannot start is one line before
    the model loads."""
    for logger in loggers:
        init = getattr(logger, "_wandb_init", None)  # WandbLogger's wandb.init kwargs (no public accessor)
        if isinstance(init, dict) and init.get("anonymous") is None:
            # Lightning passes anonymous=None for "not set", which wandb >= 0.22 warns has no effect
            init.pop("anonymous", None)
        try:
            logger.experiment  # noqa: B018 (the property starts the logger)
        except Exception as err:  # noqa: BLE001 (any failure to start is reported the same way)
            detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            raise errors.SetupError(
                f"trainer.logger: {type(logger).__name__} cannot start ({detail}); fix its settings, run offline "
                "(W&B: WANDB_MODE=offline, sync later with `wandb sync`), or set trainer.logger: false") from err


def _save_config_callback() -> type:
    from lightning.pytorch.cli import SaveConfigCallback

    from glance_lightning.atomic import write_text
    from glance_lightning.families.preflight import run_dir
    from glance_lightning.run_folder import RUN_DIR_ENV

    class SaveConfig(SaveConfigCallback):
        """config.yaml in the run folder (written atomically, never overwritten: a resume into the same folder
        keeps the first run's) and the full resolved config in every logger."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            if self.already_saved:
                return
            path = run_dir(trainer) / self.config_filename
            exists = trainer.strategy.broadcast(path.exists() if trainer.is_global_zero else False)
            if exists and not self.config.get("ckpt_path"):  # trainer.ckpt_path is only set after setup
                raise errors.ExistingFileError(
                    f"{path} is an earlier run's config; choose another trainer.default_root_dir or unset "
                    f"{RUN_DIR_ENV}, or resume with --ckpt_path")
            if trainer.is_global_zero:
                if not exists:
                    write_text(path, self.parser.dump(self.config, skip_none=False, format="yaml"))
                self.save_config(trainer, pl_module, stage)
            self.already_saved = trainer.strategy.broadcast(True)

        def save_config(self, trainer, pl_module, stage: str) -> None:
            import yaml

            resolved = self.parser.dump(self.config, skip_none=False, format="yaml")
            for logger in trainer.loggers:
                logger.log_hyperparams({"config": yaml.safe_load(resolved)})

    return SaveConfig


def data_resolution(data: object) -> int | None:
    """The training resolution a DataModule declares (``GlanceData.resolution``), if any."""
    return getattr(data, "resolution", None)
