"""What ``performance.auto`` costs a fit before its first step: the choice with an empty cache and with a filled one.

``python benchmarks/bench_auto_start.py [--config configs/flux-dev.yaml] [--cards h100,4090] [overrides]`` plans the
config's pick on each card in turn, as a fit on that card would (``auto.cached_pick``, every library assumed
present), in a fresh cache folder per setup, and prints a markdown table: the seconds of each choice (the first
card simulates the anchors; a later card reuses them and checks only its own pick), of the same choice again (from
the cache), the simulations run and the pick. Setups, measured in the same run:

- ``reference``: the planner as it was before 2026-12-07: two simulated steps per simulation, every anchor in this
  process, every pick simulated before it is taken.
- ``1 cpu``: one steady-state step per simulation (``memory._prime``), every anchor here, a pick far under the
  card taken as interpolated (``search.TRUSTED_BELOW``).
- ``N cpus``: the same with the anchors' helper processes (``planner.anchors``), as a fit on this machine runs it.

Figures are wall seconds on this machine (a CPU: planning never uses the GPU), one run each (a cold start happens
once by nature). The picks themselves are predicted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glance_lightning import auto  # noqa: E402
from glance_lightning.planner import memory, plan, search  # noqa: E402
from glance_lightning.planner.anchors import available_cpus  # noqa: E402
from glance_lightning.planner.request import request_from_cli  # noqa: E402


class _Counted:
    """``plan.simulate_step`` counting its calls (this process's simulations), ``steps`` steps each."""

    def __init__(self, steps: int) -> None:
        self.calls, self.steps = 0, steps

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return memory.simulate_step(*args, **{"steps": self.steps, **kwargs})


def _choose(config: list[str], card: str, cpus: int) -> tuple[Any, bool]:
    request = request_from_cli(config, card, None, None, None)
    init = request.raw["init"]
    constraints = search.Constraints(auto.fixed_switches(init.get("performance") or {}, init.get("optimizer") or {}))
    return auto.cached_pick(request, constraints, request.gpu.memory_gib, cpus)


def run_setup(name: str, config: list[str], cards: list[str], steps: int, cpus: int, trusted: float) -> list[str]:
    rows = []
    counted = _Counted(steps)
    patched = {(plan, "simulate_step"): counted, (search, "TRUSTED_BELOW"): trusted}
    saved = {key: getattr(*key) for key in patched}
    environment = os.environ.get("GLANCE_LIGHTNING_CACHE")
    with tempfile.TemporaryDirectory(prefix="glance-auto-bench-") as cache:
        os.environ["GLANCE_LIGHTNING_CACHE"] = cache
        for (module, attr), value in patched.items():
            setattr(module, attr, value)
        try:
            for card in cards:
                counted.calls = 0
                started = time.perf_counter()
                best, _ = _choose(config, card, cpus)
                cold = time.perf_counter() - started
                simulations = counted.calls
                started = time.perf_counter()
                again, cached = _choose(config, card, cpus)
                warm = time.perf_counter() - started
                assert cached and (again is None) == (best is None)
                pick = "nothing fits" if best is None else \
                    f"{best.label()}, {best.peak_gib:.1f} GiB, {best.step_s:.2f} s/step"
                rows.append(f"| {name} | {card} | {cold:.1f} | {warm:.2f} | {simulations} here | {pick} |")
                print(rows[-1], flush=True)
        finally:
            for (module, attr), value in saved.items():
                setattr(module, attr, value)
            if environment is None:
                os.environ.pop("GLANCE_LIGHTNING_CACHE", None)
            else:
                os.environ["GLANCE_LIGHTNING_CACHE"] = environment
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/flux-dev.yaml")
    parser.add_argument("--cards", default="h100,4090", help="comma list of planner cards, planned in this order")
    parser.add_argument("--only", default="reference,1cpu,all", help="comma list of reference, 1cpu, all")
    args, overrides = parser.parse_known_args(argv)  # the rest: config overrides, as fit and plan take them
    cards, cpus = args.cards.split(","), available_cpus()
    setups = {"reference": ("reference (2 steps, serial, every pick simulated)", 2, 1, 0.0),
              "1cpu": ("1 cpu (steady-state step, pick trusted far from the limit)", 1, 1, search.TRUSTED_BELOW),
              "all": (f"{cpus} cpus (the same + helper processes)", 1, cpus, search.TRUSTED_BELOW)}
    print(f"{args.config}, cards {', '.join(cards)} in that order, a fresh cache per setup; this machine: {cpus} "
          "CPUs\n")
    print("| setup | card | choice, empty cache (s) | again, cached (s) | simulations | pick (predicted) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for key in args.only.split(","):
        run_setup(setups[key][0], ["--config", args.config, *overrides], cards, *setups[key][1:])


if __name__ == "__main__":
    main()
