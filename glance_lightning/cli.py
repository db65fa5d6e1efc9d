"""Command line: ``fit`` (and the other LightningCLI subcommands) plus the project's own commands.

``python -m glance_lightning fit --config configs/quickstart.yaml`` is a plain LightningCLI: configs use
class_path/init_args, ``--print_config`` and overrides work as usual. ``validate-data``, ``schedule`` and
``sample`` are small argparse programs dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from glance_lightning import console

TOP_HELP = """usage: python -m glance_lightning COMMAND [options]

Train and sample Glance Slow/Fast LoRAs.

commands:
  fit             train both LoRAs (LightningCLI: --config FILE, --print_config, --help, overrides)
  validate-data   check a dataset folder without loading any model (--path DIR)
  schedule        derive Slow/Fast timestep lists from a family's scheduler (--family, --resolution)
  sample          generate with a Slow/Fast LoRA pair over the exact chain (--model, --slow, --fast, --prompt)
  export          write LoRAs in ComfyUI / kohya / diffusers key layouts, same weight change (--lora, --format)
  cache           encode a config's images and prompts into the encode cache, then exit (--config FILE)
  validate, test, predict   other LightningCLI subcommands

Run `python -m glance_lightning COMMAND --help` for a command's options. `--verbose` (any command) or
GLANCE_LIGHTNING_VERBOSE=1 also shows the third-party messages hidden by default (glance_lightning.console).
"""


MODEL_COMMANDS = ("fit", "validate", "test", "predict", "sample", "cache")  # the commands that build or load a model


def run_lightning_cli(args: list[str] | None, run: bool = True) -> object:
    """LightningCLI over any GlanceModule family and any LightningDataModule (imported only here); ``args`` None
    reads ``sys.argv`` (LightningCLI warns when given both)."""
    from lightning import LightningDataModule
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    from glance_lightning.families.base import GlanceModule
    from glance_lightning.families.preflight import output_dir

    class SaveConfigToLoggers(SaveConfigCallback):
        """config.yaml in the run directory (never overwritten) and the full resolved config in every logger."""

        def save_config(self, trainer, pl_module, stage: str) -> None:
            resolved = self.parser.dump(self.config, skip_none=False, format="yaml")
            import yaml

            for logger in trainer.loggers:
                logger.log_hyperparams({"config": yaml.safe_load(resolved)})

    class GlanceCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            # The phases set max_steps once the model is known; -1 says "no epoch limit" so that Lightning does
            # not warn that max_epochs was not set and fall back to 1000 epochs.
            parser.set_defaults({"trainer.max_epochs": -1})
            # Settings that must agree: the training resolution the lists are derived at is the data's.
            parser.link_arguments("data", "model.init_args.resolution", compute_fn=data_resolution,
                                  apply_on="instantiate")

        def before_fit(self) -> None:
            # Before any model is loaded: resolve `--ckpt_path last` across run versions, and refuse to
            # write over the LoRAs of an earlier run.
            module, kwargs = self.model, self.config_init[self.subcommand]
            if kwargs.get("ckpt_path") == "last":
                kwargs["ckpt_path"] = str(find_last_checkpoint(Path(self.trainer.default_root_dir)))
            module.lora_dir = output_dir(self.trainer, module.lora_dir, kwargs.get("ckpt_path"))
            module.refuse_overwrite(resuming=kwargs.get("ckpt_path") is not None)

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
    )


def data_resolution(data: object) -> int | None:
    """The training resolution a DataModule declares (``GlanceData.resolution``), if any."""
    return getattr(data, "resolution", None)


def find_last_checkpoint(root: Path) -> Path:
    """The newest ``last.ckpt`` of any run under ``root`` (trainer.default_root_dir)."""
    candidates = sorted(root.glob("**/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise FileNotFoundError(
            f"--ckpt_path last: no checkpoints/last.ckpt under {root}; pass a checkpoint path, or train with a "
            "ModelCheckpoint that has save_last: true (the shipped configs do)"
        )
    return candidates[-1]


def _extra_commands() -> dict[str, Callable[[list[str]], int]]:
    from glance_lightning.commands.cache import run_cache_command
    from glance_lightning.commands.export import run_export_command
    from glance_lightning.commands.sample import run_sample_command
    from glance_lightning.commands.schedule import run_schedule_command
    from glance_lightning.commands.validate_data import run_validate_data_command

    return {
        "validate-data": run_validate_data_command,
        "schedule": run_schedule_command,
        "sample": run_sample_command,
        "export": run_export_command,
        "cache": run_cache_command,
    }


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    argv, verbose = console.pop_verbose_flag(list(sys.argv[1:] if argv is None else argv))
    console.install(verbose=True if verbose else None)  # before torch/diffusers/peft print at import
    if from_command_line:
        sys.argv[1:] = argv  # LightningCLI reads them from there, without our own --verbose
    if not argv or argv[0] in ("-h", "--help"):
        print(TOP_HELP)
        return 0 if argv else 2
    extra = _extra_commands()
    if argv[0] in MODEL_COMMANDS:
        console.quiet_setup_bars()  # third-party load/save bars only when long
    if argv[0] in extra:
        with console.quiet_info(argv[0] == "sample"):  # sample prints one line per image, nothing else
            return extra[argv[0]](argv[1:])
    run_lightning_cli(None if from_command_line else argv)
    return 0
