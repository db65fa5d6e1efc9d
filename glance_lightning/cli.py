"""Command line: ``fit`` (and the other LightningCLI subcommands) plus the project's own commands.

``python -m glance_lightning fit --config configs/quickstart.yaml`` is a plain LightningCLI: configs use
class_path/init_args, ``--print_config`` and overrides work as usual. ``validate-data``, ``schedule`` and
``sample`` are small argparse programs dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

from glance_lightning import console, errors

TOP_HELP = """usage: python -m glance_lightning COMMAND [options]

Train and sample Glance Slow/Fast LoRAs.

commands:
  fit             train both LoRAs (LightningCLI: --config FILE, --print_config, --help, overrides)
  validate-data   check a dataset folder without loading any model (--path DIR)
  schedule        derive Slow/Fast timestep lists from a family's scheduler (--family, --resolution)
  sample          generate with a Slow/Fast LoRA pair over the exact chain (--model, --slow, --fast, --prompt)
  export          write LoRAs in ComfyUI / kohya / diffusers key layouts, same weight change (--lora, --format)
  cache           encode a config's images and prompts into the encode cache, then exit (--config FILE)
  plan            predict a config's peak GPU memory, host RAM and s/step without a GPU (--config FILE, --gpu)
  validate, test, predict   other LightningCLI subcommands

Run `python -m glance_lightning COMMAND --help` for a command's options. `--verbose` (any command) or
GLANCE_LIGHTNING_VERBOSE=1 also shows the third-party messages hidden by default (glance_lightning.console).
A mistake in a setting or file is reported in a line or two; `--debug` or GLANCE_LIGHTNING_DEBUG=1 adds the
Python traceback.
"""


MODEL_COMMANDS = ("fit", "validate", "test", "predict", "sample", "cache")  # the commands that build or load a model


def run_lightning_cli(args: list[str] | None, run: bool = True, instantiate: bool = True) -> object:
    """LightningCLI over any GlanceModule family and any LightningDataModule (imported only here); ``args`` None
    reads ``sys.argv`` (LightningCLI warns when given both). ``instantiate=False`` (with ``run=False``) only parses:
    ``cli.config`` holds fit's options and nothing is built (the ``plan`` command). ``fit`` writes into one run
    folder (``glance_lightning.run_folder``)."""
    from lightning import LightningDataModule
    from lightning.pytorch.cli import LightningCLI

    from glance_lightning.families.base import GlanceModule

    claimed: list[Path] = []

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
                self.run_dir = place_run(self.config.fit, claimed)

        def before_fit(self) -> None:
            # Before any model is loaded: refuse to write over the LoRAs of an earlier run; a logger that
            # cannot start is reported here, not after the model has loaded.
            module, kwargs = self.model, self.config_init[self.subcommand]
            check_strategy(self.trainer.strategy, module)  # before Lightning's launcher starts other processes
            ckpt_path = kwargs.get("ckpt_path")
            lora_dir = module.lora_dir
            module.allow_other_data = bool(kwargs.get("allow_other_data"))
            if ckpt_path is not None:  # readable, trained with these settings and data; LoRAs stay with its run
                checkpoint = resume.read_checkpoint(ckpt_path)
                resume.check_resume(checkpoint, resume.training_identity(module), ckpt_path)
                resume.check_dataset_before_loading(module, self.datamodule, checkpoint, ckpt_path)
                lora_dir = lora_dir or resume.resumed_lora_dir(checkpoint, self.run_dir)
            module.claimed_run_dir = module.run_dir = self.run_dir
            module.lora_dir = lora_dir or self.run_dir
            module.refuse_overwrite(resuming=ckpt_path is not None)
            run_folder.place_checkpoints(self.trainer, self.run_dir, resuming=ckpt_path is not None)
            if self.trainer.is_global_zero:
                start_loggers(self.trainer.loggers)

    from glance_lightning import run_folder
    from glance_lightning.families import resume
    from glance_lightning.families.preflight import check_strategy, check_trainer_flags

    no_exit = {"exit_on_error": False}  # parse errors raise, so that main() reports them in one line
    previous = os.environ.get(run_folder.RUN_DIR_ENV)
    try:
        return GlanceCLI(
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
    finally:
        run_folder.restore_env(previous)
        for path in claimed:  # a run refused before it wrote anything leaves no empty version folder
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
    run_dir = run_folder.resolve(root, ckpt_path)
    if fresh:
        claimed.append(run_dir)
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


def _extra_commands() -> dict[str, Callable[[list[str]], int]]:
    from glance_lightning.commands.cache import run_cache_command
    from glance_lightning.commands.export import run_export_command
    from glance_lightning.commands.plan import run_plan_command
    from glance_lightning.commands.sample import run_sample_command
    from glance_lightning.commands.schedule import run_schedule_command
    from glance_lightning.commands.validate_data import run_validate_data_command

    return {
        "validate-data": run_validate_data_command,
        "schedule": run_schedule_command,
        "sample": run_sample_command,
        "export": run_export_command,
        "cache": run_cache_command,
        "plan": run_plan_command,
    }


def main(argv: list[str] | None = None) -> int:
    """Run a command; a user error (``glance_lightning.errors``) is one short message and exit status 2."""
    from_command_line = argv is None
    argv, verbose = console.pop_verbose_flag(list(sys.argv[1:] if argv is None else argv))
    argv, debug = errors.pop_debug_flag(argv)
    debug = debug or errors.is_debug()
    console.install(verbose=True if verbose else None)  # before torch/diffusers/peft print at import
    if from_command_line:
        sys.argv[1:] = argv  # LightningCLI reads them from there, without our own --verbose
    if not argv or argv[0] in ("-h", "--help"):
        print(TOP_HELP)
        return 0 if argv else 2
    try:
        return _run(argv, from_command_line)
    except Exception as exc:  # noqa: BLE001 (user errors become a message; anything else is re-raised)
        from jsonargparse import ArgumentError

        if debug:
            raise
        if isinstance(exc, ArgumentError):
            return errors.report(errors.parse_error_message(str(exc)), argv[0], traceback_hint=False)
        if _is_misconfiguration(exc):  # Lightning's own refusal of trainer settings (accelerator, devices...)
            return errors.report(f"trainer settings: {exc}", argv[0])
        user_error = errors.find_user_error(exc)
        if user_error is None:
            raise
        return errors.report(str(user_error), argv[0])


def _is_misconfiguration(exc: BaseException) -> bool:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    return isinstance(exc, MisconfigurationException)


def _run(argv: list[str], from_command_line: bool) -> int:
    extra = _extra_commands()
    if argv[0] in MODEL_COMMANDS:
        console.quiet_setup_bars()  # third-party load/save bars only when long
    if argv[0] in extra:
        with console.quiet_info(argv[0] == "sample"):  # sample prints its lists, then one line per image
            return extra[argv[0]](argv[1:])
    run_lightning_cli(None if from_command_line else argv)
    return 0
