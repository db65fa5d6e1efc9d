"""Command line: ``fit`` (and the other LightningCLI subcommands) plus the project's own commands.

``python -m glance_lightning fit --config configs/quickstart.yaml`` is a plain LightningCLI: configs use
class_path/init_args, ``--print_config`` and overrides work as usual. ``validate-data``, ``schedule`` and
``sample`` are small argparse programs dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from glance_lightning import console, errors
from glance_lightning.errors import MissingFileError

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
    ``cli.config`` holds fit's options and nothing is built (the ``plan`` command)."""
    from lightning import LightningDataModule
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from glance_lightning.atomic import write_text
    from glance_lightning.families import resume
    from glance_lightning.families.base import GlanceModule
    from glance_lightning.families.preflight import check_output_dir, check_strategy, output_dir

    class SaveConfigToLoggers(SaveConfigCallback):
        """config.yaml in the run directory (written atomically, never overwritten: a resume into the same folder
        keeps the first run's) and the full resolved config in every logger."""

        def setup(self, trainer, pl_module, stage: str) -> None:
            if self.already_saved:
                return
            path = Path(trainer.log_dir) / self.config_filename  # log_dir broadcasts the directory
            exists = trainer.strategy.broadcast(path.exists() if trainer.is_global_zero else False)
            if exists and trainer.ckpt_path is None:
                raise errors.ExistingFileError(
                    f"trainer.default_root_dir: {path} is an earlier run's config; choose another folder, keep "
                    "a logger on (each run gets its own version folder), or resume with --ckpt_path")
            if trainer.is_global_zero:
                if not exists:
                    write_text(path, self.parser.dump(self.config, skip_none=False, format="yaml"))
                self.save_config(trainer, pl_module, stage)
            self.already_saved = trainer.strategy.broadcast(True)

        def save_config(self, trainer, pl_module, stage: str) -> None:
            resolved = self.parser.dump(self.config, skip_none=False, format="yaml")
            import yaml

            for logger in trainer.loggers:
                logger.log_hyperparams({"config": yaml.safe_load(resolved)})

    class GlanceCLI(LightningCLI):
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

        def _parse_ckpt_path(self) -> None:
            # LightningCLI would silently replace the run's model settings with the checkpoint's hyperparameters
            # (a resume then trains other settings than the config says); before_fit refuses differences instead.
            return

        def before_fit(self) -> None:
            # Before any model is loaded: resolve `--ckpt_path last` across run versions, and refuse to
            # write over the LoRAs of an earlier run.
            module, kwargs = self.model, self.config_init[self.subcommand]
            check_strategy(self.trainer.strategy)  # before Lightning's launcher starts other processes
            if self.trainer.is_global_zero:
                check_output_dir(Path(self.trainer.default_root_dir), "trainer.default_root_dir")
            if kwargs.get("ckpt_path") == "last":
                kwargs["ckpt_path"] = str(find_last_checkpoint(Path(self.trainer.default_root_dir)))
            ckpt_path = kwargs.get("ckpt_path")
            if ckpt_path is not None:  # readable, trained with these settings; LoRAs stay with its run
                checkpoint = resume.read_checkpoint(ckpt_path)
                resume.check_resume(checkpoint, resume.training_identity(module), ckpt_path)
                module.lora_dir = module.lora_dir or resume.resumed_lora_dir(checkpoint)
            module.lora_dir = output_dir(self.trainer, module.lora_dir, ckpt_path)
            module.refuse_overwrite(resuming=ckpt_path is not None)

    no_exit = {"exit_on_error": False}  # parse errors raise, so that main() reports them in one line
    return GlanceCLI(
        GlanceModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        args=args,
        run=run,
        auto_configure_optimizers=False,
        save_config_callback=SaveConfigToLoggers,
        save_config_kwargs={"save_to_log_dir": True},
        parser_kwargs={**no_exit, **{command: no_exit for command in ("fit", "validate", "test", "predict")}},
    )


def data_resolution(data: object) -> int | None:
    """The training resolution a DataModule declares (``GlanceData.resolution``), if any."""
    return getattr(data, "resolution", None)


def find_last_checkpoint(root: Path) -> Path:
    """The newest ``last.ckpt`` of any run under ``root`` (trainer.default_root_dir)."""
    candidates = sorted(root.glob("**/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise MissingFileError(
            f"--ckpt_path last: no checkpoints/last.ckpt under {root}; pass a checkpoint path, or train with a "
            "ModelCheckpoint that has save_last: true (the shipped configs do)"
        )
    return candidates[-1]


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
        with console.quiet_info(argv[0] == "sample"):  # sample prints one line per image, nothing else
            return extra[argv[0]](argv[1:])
    run_lightning_cli(None if from_command_line else argv)
    return 0
