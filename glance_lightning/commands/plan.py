"""``python -m glance_lightning plan --config FILE [fit overrides] [--gpu NAME] [--gpu-memory GiB] [--search]``: will
this fit run fit my card, and how fast? Predicted, before any model is loaded.

The config and overrides are read by fit's own parser, so the options are exactly fit's. The module's own training step
then runs at full size on fake tensors (no weights, no GPU, no hub: the transformer's config comes from the registry, or
from a local/cached model's transformer/config.json). Prints the predicted peak GPU memory with its breakdown, the
encode stage's peak, host RAM per stage, the s/step on the GPU (with how it was derived) and whether it fits; ``--format
json`` prints the same as JSON; ``--search`` proposes the fastest combination of the performance options predicted to
fit.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from typing import Any

DESCRIPTION = ("Predict a fit config's peak GPU memory (with its breakdown), encode-stage peak, host RAM and "
               "s/step on a card, and whether it fits: the module's own training step at full size on fake tensors, "
               "no weights, no GPU, no download.")
HELP_EPILOG = "Any other option is a fit option (e.g. --model.init_args.lora.rank 64), as `fit --help` lists."


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m glance_lightning plan --config FILE [fit overrides]",
                                     description=DESCRIPTION, epilog=HELP_EPILOG)
    parser.add_argument("--gpu", default="h100", help="card for s/step and fits (h100, h200, a100-80, a100-40, "
                        "l40s, a6000, 5090, 4090, 3090, 4080, 4060ti-16, 3060); default h100")
    parser.add_argument("--gpu-memory", type=float, default=None, metavar="GiB",
                        help="the card's memory, instead of the --gpu table's")
    parser.add_argument("--format", choices=("table", "json"), default="table")
    parser.add_argument("--search", action="store_true",
                        help="the fastest checkpointing / quantisation / 8-bit states / offload combination "
                        "predicted to fit")
    parser.add_argument("--text-tokens", type=int, default=None,
                        help="text tokens per prompt (default: the config's max_sequence_length)")
    parser.add_argument("--devices", type=int, default=None, metavar="N",
                        help="devices per node: plan one rank of a fit on N devices (default: the config's "
                        "trainer.devices under strategy fsdp2 or ddp, else 1)")
    parser.add_argument("--num-nodes", type=int, default=None, metavar="M", help="nodes (default: the config's)")
    parser.add_argument("--strategy", default=None, choices=("fsdp2", "ddp"),
                        help="fsdp2 shards the base over every rank, ddp replicates it (default: the config's, "
                        "else fsdp2)")
    parser.add_argument("--architecture", default=None, metavar="CONFIG_JSON",
                        help="a diffusers transformer/config.json to plan instead of the family's full-size one")
    return parser


def run_plan_command(argv: list[str]) -> int:
    if argv and argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0
    args, rest = _parser().parse_known_args(argv)
    if not any(a == "--config" or a.startswith("--config=") for a in rest):
        from glance_lightning.errors import ConfigError

        raise ConfigError("give the fit config: --config configs/flux-dev.yaml")
    from glance_lightning.planner.plan import make_plan
    from glance_lightning.planner.request import request_from_cli

    # A user error (an unknown GPU, a config that does not parse, an architecture file that is not one) is
    # raised as glance_lightning.errors' kinds: the command line prints it in one line, without a traceback.
    ranks = {"devices": args.devices, "num_nodes": args.num_nodes, "strategy": args.strategy}
    request = request_from_cli(rest, args.gpu, args.gpu_memory, args.text_tokens, args.architecture, ranks)
    if args.search:
        from glance_lightning.planner.search import search

        with _quiet():
            result = search(request)
        print(json.dumps(result.as_dict(), indent=2) if args.format == "json" else result.format())
        return 0 if result.best is not None else 1
    init = request.raw["init"]
    if (init.get("performance") or {}).get("auto"):
        request = _auto_pick(request, args.format == "json")
        if request is None:
            return 1
    with _quiet():
        plan = make_plan(request)
    print(json.dumps(plan.as_dict(), indent=2) if args.format == "json" else format_plan(plan.as_dict()))
    return 0


def _auto_pick(request: Any, quiet: bool) -> Any:
    """``performance.auto``: the request with what a fit on the planned card would pick (every library assumed
    present), said in one line before the plan; None when nothing fits. Planned once: the answer and the search's
    anchors are cached where a fit's auto finds them (``auto.cached_pick``)."""
    from glance_lightning.auto import planned_pick
    from glance_lightning.planner.search import with_candidate

    with _quiet():
        best, cached = planned_pick(request)
    card = request.gpu.name if request.gpu else f"{request.gpu_memory_gib:g} GiB card"
    if best is None:
        print(f"performance auto: nothing predicted to fit the {card}; python -m glance_lightning plan --search ... "
              "lists what comes closest")
        return None
    if not quiet:
        how = "planned before, cached" if cached else "cached for the fits and plans after this one"
        print(f"performance auto on the {card} picks: {best.label()} (a fit picks on its own card, among what its "
              f"machine can run; {how})" + (f"; {best.faster}" if best.faster else ""))
    return with_candidate(request, best)


@contextlib.contextmanager
def _quiet() -> Any:
    """The module's own "gradient checkpointing on N blocks" lines are not the plan's output."""
    from glance_lightning import console

    with console.quiet_info(True), contextlib.redirect_stdout(io.StringIO()):
        yield


def format_plan(d: dict[str, Any]) -> str:
    """The short table (all figures predicted)."""
    b, host = d["breakdown_gib"], d["host_ram_gib"]
    fits = {True: "yes", False: "NO", None: "-"}[d["fits"]]
    card = f"{d['gpu']} ({d['gpu_memory_gib']:.1f} GiB)" if d["gpu"] else f"{d['gpu_memory_gib']} GiB"
    step = "-" if d["step_s"] is None else f"{d['step_s']:.3g} s/step ({d['step_tflop']} TFLOP)"
    rows = [
        ("family", f"{d['family']}  ({d['architecture']})"),
        ("settings", ", ".join(f"{k}={v}" for k, v in d["settings"].items())),
        ("peak GPU memory", f"{d['peak_gib']:.2f} GiB  (predicted{', ' + d['per_rank'] if d.get('per_rank') else ''})"),
        ("  base weights", f"{b['base_weights']:.2f} GiB"),
        ("  LoRA + grads + optimizer", f"{b['lora_and_optimizer']:.2f} GiB"),
        ("  activations", f"{b['activations']:.2f} GiB"),
        ("encode stage peak", f"{d['encode_peak_gib']:.2f} GiB  (text encoders + VAE on the device)"),
        ("host RAM", ", ".join(f"{k} {v:.1f} GiB" for k, v in host.items())),
        (f"time on {card}", step),
        *([("  derived as", d["step_time"]["derivation"])] if d.get("step_time") else []),
        ("fits", f"{fits}  (training step: peak + {d['cuda_context_gib']} GiB CUDA context)"),
    ]
    if d["fits"] is False:
        rows.append(("", "--search proposes checkpointing / quantisation / 8-bit states / offload that fit"))
    if d["encode_fits"] is False:
        rows.append(("encode stage", "does NOT fit: fill the encode cache on the CPU first (python -m glance_lightning "
                     "cache --config ... --trainer.accelerator cpu); fit then loads no text encoder"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    lines += [f"note: {n}" for n in d["notes"]]
    lines.append(f"(simulated in {d['simulation_s']:.0f} s; predicted, not measured)")
    return "\n".join(lines)
