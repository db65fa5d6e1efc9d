"""Command line: ``fit`` (and the other LightningCLI subcommands) plus the project's own commands.

``python -m glance_lightning fit --config configs/quickstart.yaml`` is a plain LightningCLI
(``glance_lightning.trainer_cli``): configs use class_path/init_args, ``--print_config`` and overrides work as
usual. ``validate-data``, ``schedule``, ``sample``, ``export``, ``cache`` and ``plan`` are small argparse programs
(``glance_lightning.commands``) dispatched before LightningCLI sees the arguments.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from glance_lightning import console, errors, startup

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
    if from_command_line:
        startup.mark_command_start()
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
    from glance_lightning.trainer_cli import run_lightning_cli

    run_lightning_cli(None if from_command_line else argv)
    return 0
