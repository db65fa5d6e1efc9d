"""What a run prints: the quick start and `sample` as a new user runs them (subprocesses, first run with an empty
cache), the phase-aware progress bar, and the narrow third-party noise filters of glance_lightning.console."""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from glance_lightning import console

from reaping import run_reaped

# Lines the quick start printed before issue 15, none of which says anything about the user's run.
FORBIDDEN = (
    "Failed to load",  # torchao's .so files; bitsandbytes' CPU gemm_4bit_forward kernel
    "is an Enum subclass and is now natively supported",  # torch pytree, about torchao's enums
    "Unable to import `torchao` Tensor objects",
    "requires torchvision (not installed)",  # transformers' CLIP/Siglip image processor fall-backs
    "LightningCLI's args parameter",
    "litlogger",
    "litmodels",
    "`max_epochs` was not set",
    "was truncated because `max_sequence_length`",
    "LeafSpec",
    "Loading weights",
    "Loading pipeline components",
    "Writing model shards",
    "Loading checkpoint shards",
    "v_num",
    "Epoch 0/",
    "No LoRA keys associated",
    "Already found a `peft_config`",
    "Skipping publisher trust check",  # `kernels` (transformers >= 5.25), fetching bitsandbytes' CPU kernel offline
)
WARNING_LINE = re.compile(r"(\.py:\d+: )|\b(User|Future|Deprecation|PossibleUser|Runtime)Warning\b")
IMAGE_LINE = re.compile(r"^(\S+\.png)  seed (\d+)  slow \d+\.\d+s  fast \d+\.\d+s$")
LISTS_LINE = re.compile(r"^glance_lightning: family flux; timesteps slow \[[\d., ]+\] fast \[[\d., ]+\] "
                        r"\(from the LoRA metadata\)$")


# `python -c AVX512_BF16 ARGS` runs `python -m glance_lightning ARGS` as on a CPU with AVX512-BF16, where
# bitsandbytes' CPU backend (imported by peft) fetches an optional kernel through `kernels` at import.
AVX512_BF16 = """
import importlib.abc, importlib.machinery, runpy, sys

class CpuFlag(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "bitsandbytes.functional":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.has_avx512bf16 = lambda: True
        spec.loader.exec_module = exec_module
        return spec

sys.meta_path.insert(0, CpuFlag())
runpy.run_module("glance_lightning", run_name="__main__", alter_sys=True)
"""


def _run(repo: Path, cache: Path, *args: str, launch: tuple[str, ...] = ("-m", "glance_lightning"),
         verbose: bool = False) -> str:
    """`python -m glance_lightning ARGS` from the repo root; its stdout and stderr interleaved."""
    env = {**os.environ, "GLANCE_LIGHTNING_CACHE": str(cache), "COLUMNS": "80", "PYTHONUNBUFFERED": "1"}
    env.pop(console.VERBOSE_ENV, None)
    if verbose:
        env[console.VERBOSE_ENV] = "1"
    done = run_reaped([sys.executable, *launch, *args], cwd=repo, env=env, timeout=240)
    assert done.returncode == 0, done.stdout[-4000:]
    return done.stdout.replace("\r", "\n")


@pytest.fixture(scope="module")
def quickstart(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """The README's quick start with fewer steps, as a first run: the tiny model is built into an empty cache."""
    root = tmp_path_factory.mktemp("console")
    output = _run(repo, root / "cache", "fit", "--config", "configs/quickstart.yaml",
                  "--trainer.default_root_dir", str(root / "runs"), "--model.init_args.slow_steps", "6",
                  "--model.init_args.fast_steps", "6", "--trainer.callbacks.init_args.every_n_steps", "6")
    (run,) = sorted((root / "runs").iterdir())
    return output, run, root / "cache"


def test_quickstart_prints_none_of_the_third_party_noise(quickstart):
    output, _, _ = quickstart
    found = [needle for needle in FORBIDDEN if needle in output]
    assert not found, f"noise in the quick start's output: {found}\n{output}"
    warned = [line for line in output.splitlines() if WARNING_LINE.search(line)]
    assert not warned, f"Python warnings in the quick start's output: {warned}"


def test_quickstart_says_what_it_does(quickstart):
    output, run, _ = quickstart
    for needle in ("glance_lightning: building the tiny flux model once", "glance_lightning: built the tiny flux model",
                   "glance_lightning: loading tiny:flux", "glance_lightning: encoding 1 sample(s)",
                   "glance_lightning: step 6: chained sample samples/step000006_p0_s0.png",
                   f"glance_lightning: saved the Slow and Fast LoRAs: {run / 'slow'}, {run / 'fast'}",
                   "glance_lightning: fit took"):
        assert needle in output, f"{needle!r} missing from\n{output}"


def test_the_fit_breakdown_accounts_for_the_seconds_from_the_process_start(quickstart):
    """Every part is named (start: interpreter, imports, config; fetch: building the tiny model; load; encode;
    to device; the first step's warm-up) and what is left unexplained is a small share of the whole."""
    output, _, _ = quickstart
    (line,) = [ln for ln in output.splitlines() if "fit took" in ln]
    total = float(line.split("fit took ")[1].split(" s")[0])
    parts = dict(re.findall(r"(?:= |\+ )([a-z ]+?) (-?\d+\.\d)(?= |$)", line))
    for name in ("start", "fetch", "load", "encode", "to device", "first step", "save", "samples", "other"):
        assert name in parts, (name, line)
    steps = float(line.split("more training steps ")[1].split()[0])
    named = sum(float(v) for k, v in parts.items() if k != "other") + steps
    assert abs(named + float(parts["other"]) - total) <= 0.1 * len(parts)  # the line adds up (tenths)
    assert float(parts["start"]) > 0.5  # imports are seconds: counted, not missing
    assert float(parts["fetch"]) > 0.1  # the first run builds the tiny model
    assert float(parts["other"]) <= 0.25 * total, line


def test_the_bar_shows_phase_step_in_phase_loss_and_step_time(quickstart):
    output, _, _ = quickstart
    lines = output.splitlines()
    # the finished Slow phase leaves a line; the bar's last row is the Fast phase's, one 80-column line
    assert any(re.fullmatch(r"glance_lightning: slow 6/6 loss \d+\.\d{3} \d+\.\d{3} s/step", line) for line in lines)
    rows = [line.rstrip() for line in lines if line.startswith("fast 6/6 ")]
    assert rows and re.search(r"loss: \d+\.\d{3} s/step: \d+\.\d{3}$", rows[-1]), output
    assert len(rows[-1]) <= 80


def _sample(quickstart, repo: Path, out: Path, **how) -> str:
    _, run, cache = quickstart
    return _run(repo, cache, "sample", "--model", "tiny:flux", "--slow", str(run / "slow"), "--fast",
                str(run / "fast"), "--prompt", "a red ball", "--seed", "0", "--seed", "3", "--height", "64",
                "--width", "64", "--output", str(out), **how)


@pytest.mark.parametrize("launch", [("-m", "glance_lightning"), ("-c", AVX512_BF16)], ids=["this-cpu", "avx512-bf16"])
def test_sample_prints_its_lists_then_one_line_per_image_and_nothing_else(quickstart, repo: Path, tmp_path: Path,
                                                                          launch):
    output = _sample(quickstart, repo, tmp_path / "out", launch=launch)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 3 and LISTS_LINE.match(lines[0]), output
    matches = [IMAGE_LINE.match(line) for line in lines[1:]]
    assert all(matches), output
    assert [int(m.group(2)) for m in matches] == [0, 3]
    assert all(Path(m.group(1)).is_file() for m in matches)


def test_the_avx512_bf16_run_reaches_the_kernel_fetch_that_prints_the_hidden_lines(quickstart, repo, tmp_path):
    """What the quiet run above hides is really printed there (transformers >= 5.25 installs `kernels`)."""
    output = _sample(quickstart, repo, tmp_path / "out", launch=("-c", AVX512_BF16), verbose=True)
    if importlib.util.find_spec("kernels") is None:  # bitsandbytes' import of `kernels` fails
        assert "Failed to load CPU gemm_4bit_forward from kernels-community" in output
    else:
        assert "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes'" in output


def test_without_a_progress_bar_the_status_is_a_line_every_n_steps(repo: Path, tmp_path: Path, capsys, monkeypatch):
    from glance_lightning.cli import main

    monkeypatch.chdir(repo)
    assert main(["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(tmp_path),
                 "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "2",
                 "--model.init_args.slow_steps", "4", "--model.init_args.fast_steps", "3",
                 "--trainer.callbacks.init_args.every_n_steps", "0", "--trainer.callbacks.init_args.at_end",
                 "false"]) == 0
    printed = re.findall(r"glance_lightning: (slow|fast) (\d)/(\d) loss \d+\.\d{3} \d+\.\d{3} s/step",
                         capsys.readouterr().err)
    assert printed == [("slow", "2", "4"), ("slow", "4", "4"), ("fast", "2", "3"), ("fast", "3", "3")]


# ---------------------------------------------------------------- the bar's text, without a fit
def _fake_fit(global_step: int, seconds: float | None = 0.0123):
    from glance_lightning.callbacks.monitor import TrainingMonitor

    monitor = TrainingMonitor()
    monitor._times = [] if seconds is None else [seconds]
    module = SimpleNamespace(phase_steps={"slow": 150, "fast": 150},
                             phase_at=lambda step: "slow" if step < 150 else "fast",
                             phase_start=lambda phase: 0 if phase == "slow" else 150)
    trainer = SimpleNamespace(global_step=global_step, callbacks=[monitor],
                              progress_bar_metrics={"train/loss_slow": 0.41234, "train/loss_fast": 0.00123})
    return trainer, module


@pytest.mark.parametrize("bar_class", ["GlanceRichProgressBar", "GlanceTQDMProgressBar"])
def test_bar_metrics_are_the_current_phase_loss_and_step_time(bar_class: str):
    from glance_lightning.callbacks import progress

    bar = getattr(progress, bar_class)()
    assert bar.get_metrics(*_fake_fit(37)) == {"loss": "0.412", "s/step": "0.012"}
    assert bar.get_metrics(*_fake_fit(151, seconds=None)) == {"loss": "1.23e-03"}  # the Fast phase's loss
    assert progress.phase_status(*_fake_fit(37)).line() == "slow 37/150 loss 0.412 0.012 s/step"
    assert progress.phase_status(*_fake_fit(187)).line() == "fast 37/150 loss 1.23e-03 0.012 s/step"
    assert progress.phase_status(*_fake_fit(150)).line().startswith("slow 150/150 ")


def test_lightnings_default_bar_is_swapped_and_a_users_own_bar_kept():
    from glance_lightning.callbacks.progress import GlanceRichProgressBar, GlanceTQDMProgressBar, use_phase_progress_bar
    from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar

    class MyBar(RichProgressBar):
        pass

    mine = MyBar()
    trainer = SimpleNamespace(callbacks=[RichProgressBar(refresh_rate=7), TQDMProgressBar(refresh_rate=3), mine])
    use_phase_progress_bar(trainer)
    rich_bar, tqdm_bar, kept = trainer.callbacks
    assert type(rich_bar) is GlanceRichProgressBar and rich_bar.refresh_rate == 7
    assert type(tqdm_bar) is GlanceTQDMProgressBar and tqdm_bar.refresh_rate == 3
    assert kept is mine


# ---------------------------------------------------------------- the filters
class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def quiet():
    console.install(verbose=False)
    yield
    console.install(verbose=False)


def _emit(logger_name: str, message: str, *args) -> bool:
    """Whether a warning logged on ``logger_name`` reaches that logger's handlers."""
    logger, records = logging.getLogger(logger_name), _Records()
    logger.addHandler(records)
    try:
        logger.warning(message, *args)
    finally:
        logger.removeHandler(records)
    return bool(records.messages)


def test_filters_hide_only_the_listed_message_of_the_listed_logger(quiet):
    so_line = "Failed to load /venv/site-packages/torchao/_C_mxfp8.cpython-310-x86_64-linux-gnu.so: Could not load"
    assert not _emit("torchao", so_line)
    assert _emit("torchao", "Failed to quantize the transformer: out of memory")  # a real problem still shows
    assert _emit("some.other.logger", so_line)  # the same text elsewhere is not filtered

    import enum

    torchao_enum = enum.Enum("KernelPreference", "AUTO")
    torchao_enum.__module__ = "torchao.quantization.quantize_.common"
    mine = enum.Enum("Mine", "A")
    message = "%s is an Enum subclass and is now natively supported by torch.compile as an opaque value type."
    assert not _emit("torch.utils._pytree", message, torchao_enum)
    assert _emit("torch.utils._pytree", message, mine)  # only torchao's enums are the known noise

    tip = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger](https://x)"
    assert not _emit("lightning.pytorch.utilities.rank_zero", tip)
    assert _emit("lightning.pytorch.utilities.rank_zero", "Seed set to 0")

    trust = ("Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face "
             "Hub is in offline mode.")
    assert not _emit("kernels._internals.hf_hub", trust)
    assert _emit("kernels._internals.hf_hub", trust.replace("kernels-community/quantization-bitsandbytes", "me/k"))

    lora = "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'. This is safe to ignore"
    assert not _emit("diffusers.loaders.lora_base", lora)
    assert _emit("diffusers.loaders.lora_base", lora.replace("prefix='text_encoder'", "prefix='transformer'"))


def test_verbose_shows_everything_again(quiet, monkeypatch):
    so_line = "Failed to load /venv/torchao/_C_cutlass_90a.abi3.so: Could not load this library"
    assert not _emit("torchao", so_line)
    console.install(verbose=True)
    assert _emit("torchao", so_line) and console.is_verbose()
    console.install(verbose=False)
    assert not _emit("torchao", so_line) and not console.is_verbose()
    monkeypatch.setenv(console.VERBOSE_ENV, "1")
    console.install()
    assert _emit("torchao", so_line)


def test_warning_filters_match_message_and_module():
    message = "`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec)` instead."
    with warnings.catch_warnings(record=True) as caught:
        console.install(verbose=True)  # none of ours, then "always", then ours in front of it
        warnings.simplefilter("always")
        console.install(verbose=False)
        warnings.warn_explicit(message, FutureWarning, "_pytree.py", 21, module="lightning.pytorch.utilities._pytree")
        warnings.warn_explicit(message, FutureWarning, "mine.py", 1, module="my_project.trees")
        warnings.warn_explicit("another deprecation", FutureWarning, "_pytree.py", 30,
                               module="lightning.pytorch.utilities._pytree")
    assert [str(w.message) for w in caught] == [message, "another deprecation"]
    assert caught[0].filename == "mine.py"


def test_verbose_flag_is_taken_from_any_position():
    assert console.pop_verbose_flag(["fit", "--verbose", "--config", "c.yaml"]) == (["fit", "--config", "c.yaml"], True)
    assert console.pop_verbose_flag(["sample", "--prompt", "x"]) == (["sample", "--prompt", "x"], False)


def test_step_progress_is_silent_for_a_short_loop(capsys):
    short = console.StepProgress("rendering", 3)
    for i in range(3):
        short.update(i)
    assert capsys.readouterr().err == "" and not short.reported
    long = console.StepProgress("rendering", 3, after=0.0, every=0.0)
    long.update(1)
    assert capsys.readouterr().err == "glance_lightning: rendering 1/3\n"


def test_a_wandb_run_and_its_resume_print_no_noise(quickstart, repo, tmp_path):
    """A W&B run (offline) and `--ckpt_path last` of it: no Python warnings, none of the listed noise."""
    _, _, cache = quickstart
    common = ("fit", "--config", "configs/quickstart.yaml", "--config", "configs/logging/wandb.yaml",
              "--trainer.default_root_dir", str(tmp_path), "--model.init_args.slow_steps", "6",
              "--trainer.callbacks.init_args.every_n_steps", "0", "--trainer.log_every_n_steps", "3")
    first = _run(repo, cache, *common, "--model.init_args.fast_steps", "3")
    resumed = _run(repo, cache, *common, "--model.init_args.fast_steps", "6", "--ckpt_path", "last")
    for output in (first, resumed):
        found = [needle for needle in FORBIDDEN if needle in output]
        assert not found, f"noise: {found}\n{output}"
        warned = [line for line in output.splitlines() if WARNING_LINE.search(line) or "wandb: WARNING" in line]
        assert not warned, f"warnings: {warned}\n{output}"
    assert "Restored all states from the checkpoint" in resumed and "X/version_0" not in resumed
    assert (tmp_path / "version_0" / "wandb").is_dir() and not (tmp_path / "version_1").exists()
