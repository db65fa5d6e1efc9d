"""The acceptance run for a lent GPU: one prepared, budgeted script that settles every GPU row.

On one CUDA device, for FLUX.1-dev, Qwen-Image and SD3.5-Large at full architecture size (the registry's real
transformer configs with random weights: no downloads), 1024x1024, LoRA rank 32 on to_q/k/v/out.0, bf16 base,
bf16-mixed, gradient clipping 1.0 (as GLANCE.md section 8 measured):
- training steps: the plain diffusers + peft loop (bf16 autocast, torch AdamW, ``loss.item()`` each step) and our
  module's ``Trainer.fit`` with every block recomputed, none, every block + regional compile, each preset in
  configs/performance/ (skipped with its reason where its library or a CUDA device is missing) and an int8 base;
  median s/step after the warm-up steps and ``torch.cuda.max_memory_allocated`` over the timed steps, with
  ``plan``'s prediction for the same settings on this card (simulated in worker processes meanwhile) and the
  ratios beside each row;
- a profile of ours and the plain loop with every block recomputed (where ours was 8% slower at the same
  kernels): device busy and idle per step, the idle charged to the host phase it waited for
  (benchmarks/step_profile.py), kernels, syncs and garbage collections per step, and each profile as a gzipped
  Chrome trace in ``--out``;
- sampling: the exact chain (the Slow + Fast lists, 5 + 5 transformer calls) against the base model's 50 steps at
  1024x1024 for one family (latents only: the tiny VAE stands in for the real one);
- the CUDA-only tests (``pytest -m cuda``).
Each transformer is built once and reused by every row (``full_size.KeptTransformer``). Every section has a time
budget (a share of ``--budget``, what one section leaves passing on), rows run most valuable first and are printed
as they come, and ``--out`` holds ``acceptance.md`` and ``acceptance.json``, rewritten after every row, so a run
cut off still yields its rows. ``--dry-run`` runs the same code on the CPU at CPU sizes (a CI test).

    python benchmarks/gpu_acceptance.py --out results            # on the GPU machine: BENCHMARKS.md has the call
    python benchmarks/gpu_acceptance.py --dry-run --out /tmp/acc  # anywhere, under 2 minutes
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import acceptance_parts as parts  # noqa: E402
import bench_training  # noqa: E402
import full_size  # noqa: E402
import step_profile  # noqa: E402

from glance_lightning.tiny import tiny_model_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("flux", "qwen-image", "sd3")
# Text tokens as GLANCE.md section 8 measured them (SD3: T5 tokens; its 77 CLIP tokens come on top).
TEXT_TOKENS = {"flux": 512, "qwen-image": 45, "sd3": 256}
# Shares of --budget: each family's training rows (the chain family's sampling rows inside its share), the tests.
SHARES = {"flux": 0.32, "qwen-image": 0.28, "sd3": 0.2, "cuda-tests": 0.2}


OutOfTime = parts.OutOfTime


class Budget:
    """The run's deadline (an alarm raises ``OutOfTime`` there) and each section's share of it; what a section
    leaves unused passes on to the next."""

    def __init__(self, total: float) -> None:
        self.start, self.total, self.spent_by_sections = time.monotonic(), total, 0.0
        self.section_end = self.start

    def arm(self) -> None:
        def expire(*_: Any) -> None:
            raise OutOfTime(f"the run's budget of {self.total:.0f} s is spent")

        signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, self.total)

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)

    def open_section(self, share: float) -> None:
        now = time.monotonic()
        self.section_end = max(self.section_end, now) + share * self.total

    def left(self) -> float:
        """Seconds left in the open section (never past the run's end)."""
        return min(self.section_end, self.start + self.total) - time.monotonic()


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for acceptance.md and acceptance.json")
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at CPU sizes")
    parser.add_argument("--budget", type=float, default=None, help="seconds in all (default 470; dry run 100)")
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--chain-family", default="flux", help="the family whose sampling rows run")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 5; dry run 2)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--gpu", default=None, help="planner card (default: this CUDA device; dry run h200)")
    parser.add_argument("--profile-family", default="flux", help="the family whose steps are profiled")
    parser.add_argument("--skip", default="",
                        help="comma list of sections to leave out: steps, profile, chain, tests")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.budget = args.budget or (100.0 if dry else 470.0)
    args.steps = args.steps or (2 if dry else 5)
    args.warmup = 1 if dry else args.warmup
    args.device, args.dtype, args.size = ("cpu", "bfloat16", 64) if dry else ("cuda", "bfloat16", 1024)
    args.precision, args.clip = "bf16-mixed", 1.0
    # The dry run traces the compiled blocks with dynamo but leaves inductor's code generation (a minute on a CPU)
    args.compile_backend = "eager" if dry else "inductor"
    args.families = [f for f in args.families.split(",") if f]
    args.skip = {s for s in args.skip.split(",") if s}
    if not dry and not torch.cuda.is_available():
        parser.error("no CUDA device here: run on the GPU machine, or give --dry-run")
    return args


def _run_args(args: argparse.Namespace, family: str, kept: full_size.KeptTransformer) -> argparse.Namespace:
    """What bench_training's runs read: this family, its full-size architecture and text tokens."""
    return argparse.Namespace(**{**vars(args), "family": family, "arch": kept.arch,
                                 "text_tokens": TEXT_TOKENS.get(family, 512)})


def family_rows(args: argparse.Namespace, family: str, kept: full_size.KeptTransformer, tmp: Path,
                report: parts.Report, budget: Budget, predictor: parts.Predictor, moving_base: bool) -> None:
    """The training rows of one family, most valuable first (``moving_base``: those that quantise or offload the
    base, run last since the kept weights leave the device for them); a row starts only while its section has
    the time the previous row took."""
    model = Path(tiny_model_path(f"tiny:{family}"))
    run_args = _run_args(args, family, kept)
    settings = [s for s in parts.settings(ROOT / "configs" / "performance", args.compile_backend)
                if s.moves_base == moving_base]
    futures = {s.name: predictor.submit(family, s, kept.arch, run_args) for s in settings}
    last = 0.0
    with full_size.serving(kept, tmp):
        for setting in settings:
            row = parts.Row("steps", family, setting.name, setting.kind, setting.checkpointing)
            reason = setting.missing(args.device)
            left = budget.left()
            if reason is None and (left <= 0 or left < last):
                took = f", the last row took {last:.0f} s" if last else ""
                reason = f"not run: {max(left, 0):.0f} s left in this section{took}"
            if reason is not None:
                row.note = reason
            else:
                if setting.moves_base and kept.state and next(iter(kept.state.values())).device.type != "cpu":
                    kept.to_host()  # the device then holds only what this run keeps
                started = time.monotonic()
                with parts.recorded(row, report):
                    if setting.kind == "plain":
                        times, peak, _ = bench_training.run_reference(run_args, model, setting.checkpointing)
                    else:
                        times, peak, _ = bench_training.run_glance(run_args, model, setting.options)
                    row.s_step, row.peak_gib = statistics.median(times), peak
                last = row.wall_s = time.monotonic() - started
                parts.free_device()
            row.prediction = futures[setting.name]
            report.add(row)


def profile_rows(args: argparse.Namespace, family: str, kept: full_size.KeptTransformer, tmp: Path,
                 report: parts.Report, budget: Budget) -> None:
    """Ours and the plain loop with every block recomputed, a few steps each under ``torch.profiler``."""
    run_args = _run_args(args, family, kept)
    model = Path(tiny_model_path(f"tiny:{family}"))
    steps = min(3, args.steps)
    last, summaries = 0.0, {}
    with full_size.serving(kept, tmp):
        for kind in ("ours", "plain"):
            row = parts.Row("profile", family, f"{'plain loop' if kind == 'plain' else kind}, every block "
                            f"recomputed, {steps} steps profiled", "profile", 1.0)
            if budget.left() < last:
                row.note = f"not run: {max(budget.left(), 0):.0f} s left in this section"
                report.add(row)
                continue
            profiler = step_profile.StepProfiler(args.warmup, steps, args.device,
                                                 trace=args.out / f"profile-{family}-{kind}.json.gz")
            started = time.monotonic()
            with parts.recorded(row, report):
                if kind == "plain":
                    bench_training.run_reference(run_args, model, True, profiler=profiler)
                else:
                    bench_training.run_glance(run_args, model, {"gradient_checkpointing": 1.0},
                                              callbacks=(step_profile.LightningMarks(profiler),))
                # the profiled steps' own wall time (the profiler's start and stop are outside it)
                row.s_step, row.details = sum(profiler.summary["host_s"].values()), profiler.summary
                row.note = step_profile.describe(profiler.summary)
                summaries[kind] = profiler.summary
            last = row.wall_s = time.monotonic() - started
            parts.free_device()
            report.add(row)
    if len(summaries) == 2 and summaries["ours"]["kernels"]:
        report.note(f"{family} profile: {step_profile.kernel_differences(summaries['ours'], summaries['plain'])}")


def chain_rows(args: argparse.Namespace, family: str, kept: full_size.KeptTransformer, tmp: Path,
               report: parts.Report, budget: Budget) -> None:
    """The exact chain (Slow + Fast lists) against the base model's 50 steps, one image each, latents only."""
    run_args = _run_args(args, family, kept)
    model = Path(tiny_model_path(f"tiny:{family}"))
    with full_size.serving(kept, tmp):
        module = bench_training.module_for(run_args, model, {})
        module.load_base_model()
        module.to(torch.device(args.device))
        calls = {"chain": lambda: module.generate_latents("a photo", 0, args.size, args.size),
                 "base-50": lambda: module.generate_base_latents("a photo", 0, args.size, args.size, num_steps=50)}
        times: dict[str, float] = {}
        for name, call in calls.items():
            row = parts.Row("chain", family, f"{name} ({_steps_of(module, name)} transformer calls)", "ours")
            per_call = times.get("chain", 0.0) / _steps_of(module, "chain")
            if budget.left() < 2 * per_call * _steps_of(module, name):
                row.note = "not run: too little time left in this section"
            else:
                with parts.recorded(row, report):
                    row.s_step = _median_call(call, args.device, repeats=2, warmup=name == "chain")
                    row.peak_gib = bench_training.peak_gib(args.device)
                    times[name] = row.s_step
            if name == "base-50" and "chain" in times and name in times:
                row.note = row.note or f"chain is {times['base-50'] / times['chain']:.2f}x faster"
            report.add(row)


def _steps_of(module: Any, name: str) -> int:
    lists = module.glance_timesteps
    return len(lists.slow) + len(lists.fast) if name == "chain" else 50


def _median_call(call: Callable[[], Any], device: str, repeats: int, warmup: bool) -> float:
    if warmup:  # the first call's kernels (the base model's steps then run warm)
        call()
    times = []
    for _ in range(repeats):
        bench_training.sync(device)
        started = time.perf_counter()
        call()
        bench_training.sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def cuda_tests(args: argparse.Namespace, report: parts.Report, budget: Budget) -> None:
    """``pytest -m cuda`` in a child process, limited to what is left of the section (and reaped)."""
    row = parts.Row("tests", "-", "pytest -m cuda", "tests")
    limit = max(5.0, budget.left())
    # -P: the installed glance_lightning (the wheel on the GPU machine, the editable install elsewhere), not the
    # checkout's folder, which lacks the datamodules and callbacks packages that the install maps into it
    command = [sys.executable, "-P", "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
               str(ROOT / "tests")]
    started = time.monotonic()
    with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          start_new_session=True) as child:
        try:
            output, _ = child.communicate(timeout=limit)
            row.note = parts.pytest_summary(output, child.returncode)
        except (subprocess.TimeoutExpired, OutOfTime) as cut:
            parts.kill_group(child)
            row.note = f"cut after {time.monotonic() - started:.0f} s (the budget)"
            if isinstance(cut, OutOfTime):
                report.add(row)
                raise
    row.wall_s = time.monotonic() - started
    report.add(row)


@contextlib.contextmanager
def kept_transformer(args: argparse.Namespace, family: str, report: parts.Report) -> Iterator[Any]:
    started = time.monotonic()
    kept = full_size.KeptTransformer(full_size.architecture(family, shrunk=args.dry_run), args.device,
                                     getattr(torch, args.dtype))
    bench_training.sync(args.device)
    report.note(f"{family}: {kept.parameters / 1e6:,.1f} M parameters built on {args.device} in "
                f"{time.monotonic() - started:.1f} s")
    try:
        yield kept
    finally:
        kept.release()


def family_section(args: argparse.Namespace, family: str, tmp: Path, report: parts.Report, budget: Budget,
                   predictor: parts.Predictor) -> None:
    tiny_model_path(f"tiny:{family}")  # its VAE, text encoders and tokenizers stand by (built once, cached)
    with kept_transformer(args, family, report) as kept:
        if "steps" not in args.skip:
            family_rows(args, family, kept, tmp, report, budget, predictor, moving_base=False)
        if family == args.profile_family and "profile" not in args.skip:
            profile_rows(args, family, kept, tmp, report, budget)
        if family == args.chain_family and "chain" not in args.skip:
            chain_rows(args, family, kept, tmp, report, budget)
        if "steps" not in args.skip:
            family_rows(args, family, kept, tmp, report, budget, predictor, moving_base=True)


def run(args: argparse.Namespace, report: parts.Report, budget: Budget, predictor: parts.Predictor) -> None:
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        for family in args.families:
            budget.open_section(SHARES.get(family, 0.2))
            extra = {"chain": args.chain_family, "profile": args.profile_family}
            if "steps" in args.skip and not any(f == family and s not in args.skip for s, f in extra.items()):
                continue
            try:
                family_section(args, family, tmp, report, budget, predictor)
            except Exception as err:  # a family that cannot even be built must not cost the others their rows
                report.note(f"{family}: stopped by {type(err).__name__}: {str(err).splitlines()[0][:200]}")
            parts.free_device()
    if "tests" not in args.skip:
        budget.open_section(SHARES["cuda-tests"])
        cuda_tests(args, report, budget)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    report = parts.Report(args.out, parts.environment(args, sys.argv if argv is None else argv))
    budget = Budget(args.budget)
    predictor = parts.Predictor(args, workers=1 if args.dry_run else 8)
    report.note(f"predicted for the {predictor.gpu.name} ({predictor.gpu.description}) by plan, in worker processes")
    budget.arm()
    try:
        run(args, report, budget, predictor)
        report.complete = True
    except OutOfTime as err:
        report.note(f"stopped: {err}; the rows above are complete")
    finally:
        budget.disarm()
        predictor.close(wait_s=10.0 if args.dry_run else 20.0)
        report.write()
    print(report.markdown(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
