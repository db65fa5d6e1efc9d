"""What a run prints: the project's own progress lines and real problems, not third-party noise.

``install()`` (called by the command line before anything heavy is imported) hides a short, named list of
third-party messages that say nothing about the user's run: each is matched by the logger (or warning module)
that emits it AND its message, never by level or category alone, so every other warning still shows.
Noise the project itself caused is fixed where it arises instead (the command line passes LightningCLI its
arguments once, sets ``max_epochs``, the quick starts' prompts fit ``max_sequence_length``).
``--verbose`` or ``GLANCE_LIGHTNING_VERBOSE=1`` shows everything again.

Third-party setup bars (diffusers' "Loading pipeline components", transformers' "Loading weights" and
"Writing model shards") appear only on a terminal and only when the step is long (``BAR_DELAY`` seconds), and
vanish when it ends: the project's own lines say what is being loaded. ``info`` prints a project line;
``StepProgress`` reports "what i/n" for a long loop, and nothing for a short one.

Which imports print what (torch 2.13, torchao 0.18, diffusers 0.42, transformers 5, bitsandbytes 0.50, kernels
0.19): ``import peft`` imports transformers' quantizers, whose torchao module imports torchao whenever it is
installed (the "Failed to load .../torchao/_C*.so" lines, and torch's pytree warnings about torchao's enums), and
peft's helpers import bitsandbytes, whose CPU backend (on CPUs with AVX512-BF16) fetches an optional kernel
through ``kernels`` (its "gemm_4bit_forward" line and, with the ``kernels`` that transformers >= 5.25 requires,
the offline "Skipping publisher trust check" line). Importing a diffusers pipeline imports diffusers' torchao
quantizer ("Unable to import `torchao` Tensor objects") and transformers' image processors (the torchvision
fall-backs). The project imports torchao/bitsandbytes only for a quantised base, but these third-party imports
happen on every run where the packages are installed, so they are filtered, not avoided.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BAR_DELAY",
    "NOISE",
    "PREFIX",
    "VERBOSE_ENV",
    "StepProgress",
    "info",
    "install",
    "is_verbose",
    "pop_verbose_flag",
    "quiet_info",
    "quiet_setup_bars",
]

VERBOSE_ENV = "GLANCE_LIGHTNING_VERBOSE"
VERBOSE_FLAG = "--verbose"
PREFIX = "glance_lightning: "
BAR_DELAY = 3.0  # seconds before a third-party setup bar appears
LIGHTNING_INFO_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")


@dataclass(frozen=True)
class Noise:
    """One third-party message that is hidden unless verbose: the logger that emits it and its text."""

    logger: str
    pattern: str  # re.search on the formatted message
    why: str
    applies: Callable[[logging.LogRecord], bool] | None = None  # a further test of the record

    def matches(self, record: logging.LogRecord) -> bool:
        return bool(re.search(self.pattern, record.getMessage())) and (self.applies is None or self.applies(record))


def _about_torchao_enum(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return bool(args) and str(getattr(args[0], "__module__", "")).startswith("torchao")


NOISE: tuple[Noise, ...] = (
    Noise("torchao", r"^Failed to load .*torchao[/\\]_C\w*.*\.so",
          "torchao's optional C++ kernels built for another Python or GPU; not used by the weight-only "
          "quantisations the project offers"),
    Noise("torch.utils._pytree", r"is an Enum subclass and is now natively supported by torch\.compile",
          "torchao registers its enums the old way at import (a torch deprecation aimed at torchao)",
          _about_torchao_enum),
    Noise("bitsandbytes.backends.cpu.ops", r"^Failed to load CPU gemm_4bit_forward from kernels-community",
          "an optional CPU kernel of bitsandbytes, looked up whenever peft imports it"),
    Noise("kernels._internals.hf_hub",
          r"^Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because .* offline",
          "the same optional bitsandbytes CPU kernel (CPUs with AVX512-BF16), fetched through `kernels` (a "
          "transformers >= 5.25 dependency), which says so when the hub is offline"),
    Noise("diffusers.quantizers.torchao.torchao_quantizer", r"^Unable to import `torchao` Tensor objects",
          "diffusers 0.42 looks for torchao classes that torchao 0.18 moved; only torch.load of "
          "torchao-serialised checkpoints needs them, which the project never does"),
    Noise("transformers.utils.import_utils",
          r"`\w+ImageProcessor` requires torchvision \(not installed\); falling back to `\w+ImageProcessorPil`",
          "the PIL image processors are the ones used; torchvision is not a dependency"),
    Noise(LIGHTNING_INFO_LOGGERS[0], r"^💡 Tip: .*\[lit(logger|models)\]", "advertising"),
    Noise(LIGHTNING_INFO_LOGGERS[1], r"^💡 Tip: .*\[lit(logger|models)\]", "advertising"),
    Noise("diffusers.loaders.lora_base", r"^No LoRA keys associated to \w+ found with the prefix='text_encoder",
          "Glance LoRAs adapt the transformer only; diffusers reports each text encoder they leave alone"),
)

# Python warnings: (message regex, category, module regex of the code that warns).
WARNING_NOISE: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning wraps every train dataloader in a CombinedLoader, whose pytree code builds a LeafSpec.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
    # The Slow and Fast LoRAs are two named adapters on one model by design (sample loads them one by one).
    (r"Already found a `peft_config` attribute in the model", UserWarning, r"peft\.tuners\.tuners_utils"),
    # A resume mid-epoch: the Glance draws are a function of the step (glance_lightning.draws), so the resumed
    # run draws exactly what an uninterrupted one would; Lightning cannot know that.
    (r"You.re resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
     UserWarning, r"lightning\.pytorch\.loops\.training_epoch_loop"),
    # FSDP2 warns of any block output that is a view (FLUX's single blocks split text and image tokens). No code
    # after a sharded block changes its output in place: the LoRAs equal DDP's (tests/test_sharding.py).
    (r"FSDP2-wrapped module \(\w+\) returned a view tensor", UserWarning, r"torch\.distributed\.fsdp"),
)


class _NoiseFilter(logging.Filter):
    def __init__(self, noises: tuple[Noise, ...]) -> None:
        super().__init__()
        self.noises = noises
        self.hidden = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if any(n.matches(record) for n in self.noises):
            self.hidden += 1
            return False
        return True


_filters: dict[str, _NoiseFilter] = {}
_bar_hooks: dict[str, Any] = {}


def is_verbose() -> bool:
    """``GLANCE_LIGHTNING_VERBOSE`` is set to something other than 0/false/no/off/empty."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def pop_verbose_flag(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--verbose`` (any position), and whether it was there."""
    kept = [a for a in argv if a != VERBOSE_FLAG]
    return kept, len(kept) != len(argv)


def install(verbose: bool | None = None) -> None:
    """Hide the listed third-party noise (idempotent); ``verbose`` (default: the environment) undoes it. Call
    before torch/diffusers/peft are imported to catch their import-time lines."""
    if verbose is False:
        os.environ.pop(VERBOSE_ENV, None)
    verbose = is_verbose() if verbose is None else verbose
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # DDP workers and subprocesses inherit it
        for name, noise_filter in _filters.items():
            logging.getLogger(name).removeFilter(noise_filter)
        _filters.clear()
        for entry in WARNING_NOISE:
            _remove_warning_filter(*entry)
        return
    for noise in NOISE:
        if noise.logger not in _filters:
            _filters[noise.logger] = _NoiseFilter(tuple(n for n in NOISE if n.logger == noise.logger))
            logging.getLogger(noise.logger).addFilter(_filters[noise.logger])
    for message, category, module in WARNING_NOISE:
        # re-added when missing: pytest (and warnings.catch_warnings) restore the filter list afterwards
        if _warning_filter(message, category, module) not in warnings.filters:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)


def _warning_filter(message: str, category: type[Warning], module: str) -> tuple:
    return ("ignore", re.compile(message, re.I), category, re.compile(module), 0)


def _remove_warning_filter(message: str, category: type[Warning], module: str) -> None:
    entry = _warning_filter(message, category, module)
    if entry in warnings.filters:
        warnings.filters.remove(entry)
        mutated = getattr(warnings, "_filters_mutated", None)  # what filterwarnings itself calls
        if mutated is not None:
            mutated()


def hidden_count() -> int:
    """How many log records the filters have hidden in this process."""
    return sum(f.hidden for f in _filters.values())


def _rank() -> int:
    try:
        from lightning_utilities.core.rank_zero import rank_zero_only
    except ImportError:  # pragma: no cover - lightning is a dependency
        return int(os.environ.get("RANK", 0))
    return int(getattr(rank_zero_only, "rank", 0) or 0)


def info(message: str, every_rank: bool = False) -> None:
    """A project line (``glance_lightning: ...``) on stderr, from global rank 0 only (``every_rank``: from every
    rank of a multi-process run, prefixed ``rank N:``). stderr is looked up at each call, so a live progress bar
    that redirects it prints the line above itself."""
    rank = _rank()
    if every_rank:
        print(f"{PREFIX}rank {rank}: {message}", file=sys.stderr, flush=True)
    elif rank == 0:
        print(f"{PREFIX}{message}", file=sys.stderr, flush=True)


class StepProgress:
    """``what i/n`` lines for a loop that may be long: none during the first ``after`` seconds (a short loop
    prints nothing), then at most one every ``every`` seconds."""

    def __init__(self, what: str, total: int, after: float = 5.0, every: float = 5.0) -> None:
        self.what, self.total, self.after, self.every = what, total, after, every
        self.started = self._last = time.perf_counter()
        self.reported = False

    def update(self, done: int, detail: str = "") -> None:
        now = time.perf_counter()
        if now - self.started >= self.after and now - self._last >= self.every:
            self._last, self.reported = now, True
            info(f"{self.what} {done}/{self.total}{detail}")

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started


@contextmanager
def quiet_info(enabled: bool = True) -> Iterator[None]:
    """Lightning's and the project's info lines off for the block (the ``sample`` command prints only its
    images); warnings and errors still show. A no-op when verbose or not ``enabled``."""
    if not enabled or is_verbose():
        yield
        return
    loggers = [logging.getLogger(name) for name in LIGHTNING_INFO_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _bar_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A third-party setup bar: on a terminal only, after ``BAR_DELAY`` seconds, gone when done."""
    if is_verbose():
        return kwargs
    kwargs = dict(kwargs)
    stream = kwargs.get("file") or sys.stderr
    if not getattr(stream, "isatty", lambda: False)():
        kwargs["disable"] = True
    kwargs.setdefault("delay", BAR_DELAY)
    kwargs["leave"] = False
    return kwargs


class _DelayedDiffusersTqdm:
    """Stands in for ``diffusers.utils.logging.tqdm`` (diffusers has no hook like transformers' set_tqdm_hook):
    the same object with ``_bar_kwargs`` applied."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped(*args, **_bar_kwargs(kwargs))

    def set_lock(self, *args: Any, **kwargs: Any) -> Any:
        return self.wrapped.set_lock(*args, **kwargs)

    def get_lock(self) -> Any:
        return self.wrapped.get_lock()


def quiet_setup_bars() -> None:
    """Apply ``_bar_kwargs`` to transformers' and diffusers' loading/saving bars (idempotent; imports both, so
    call it where a model is about to be built or loaded)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    if "transformers" not in _bar_hooks and hasattr(transformers_logging, "set_tqdm_hook"):
        def hook(factory: Callable[..., Any], args: tuple, kwargs: dict[str, Any]) -> Any:
            return factory(*args, **_bar_kwargs(kwargs))

        _bar_hooks["transformers"] = transformers_logging.set_tqdm_hook(hook)
    if not isinstance(diffusers_logging.tqdm, _DelayedDiffusersTqdm):
        _bar_hooks["diffusers"] = diffusers_logging.tqdm
        diffusers_logging.tqdm = _DelayedDiffusersTqdm(diffusers_logging.tqdm)
