"""The planner's predictions: every shipped config, and the planner against the four measured reference runs.

``python benchmarks/bench_plan.py`` prints markdown tables (all figures predicted, on fake tensors):

0. measured: our module's steps measured on an H200 (glance_lightning/planner/measured.py) against ``plan``.
1. reference: the plain diffusers + peft step measured on an H100 (random full-size weights, rank 32 on
   to_q/k/v/out.0, 1024x1024, 512 text tokens, bf16 weights, AdamW, no autocast: benchmarks/bench_training.py's
   ``reference`` loop), simulated as that loop runs it, and our module configured like it (same rank, targets,
   checkpointing, bf16 base, no autocast, no clipping), each against the measured peak and s/step with the error.
2. configs: every config in configs/ and configs/official/ but the quick starts, as shipped on the H100 and the
   RTX 4090 (a config with ``performance.auto``: each card's own pick) and with configs/performance/low-memory.yaml
   on the RTX 4090: the settings, peak, s/step, fits.
3. presets: the configs/performance overlays on the card each is meant for (planned for that card).

``--only reference,configs`` runs some of the tables; ``--jsonl FILE`` appends each row as it is done. Run it with
``nice``: each full-size simulation takes 0.5-4 minutes on 2 cores (Qwen's are the slow ones).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from glance_lightning.planner.fake import PlannerMemTracker, cuda_behaviour  # noqa: E402
from glance_lightning.planner.memory import GIB, StepPlan, _PlanPipe, build_transformer, fake_inputs  # noqa: E402
from glance_lightning.planner.runtime import get_gpu  # noqa: E402
from glance_lightning.planner.timing import step_time  # noqa: E402
from glance_lightning.planner.trace import TraceRecorder  # noqa: E402
from glance_lightning.registry import get_family  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# (setup, family, checkpointing, measured peak GiB, measured s/step) on the H100 (GLANCE.md section 6)
REFERENCE = [
    ("FLUX.1-dev, no checkpointing", "flux", False, 47.1, "0.587"),
    ("FLUX.1-dev, checkpointing", "flux", True, 25.0, "0.823"),
    ("Qwen-Image, checkpointing", "qwen-image", True, 41.2, "1.17-1.29"),
    ("SD3.5-Large-sized, checkpointing", "sd3", True, 17.5, "0.74"),
]
TEXT_TOKENS = 512  # SD3: 77 CLIP + 435 T5 tokens, 512 in all
OVERLAYS = {"as shipped": [], "low-memory": ["--config", "configs/performance/low-memory.yaml"]}
PRESETS = [  # (config, overlay, the card it is meant for)
    ("configs/flux-dev.yaml", "configs/performance/flux-16gb.yaml", "4080"),
    ("configs/flux-dev.yaml", "configs/performance/low-memory.yaml", "4080"),
    ("configs/qwen-image.yaml", "configs/performance/low-memory.yaml", "4090"),
    ("configs/qwen-image-edit.yaml", "configs/performance/low-memory.yaml", "4090"),
    ("configs/qwen-image.yaml", "configs/performance/qwen-12gb-offload.yaml", "3060"),
    ("configs/qwen-image-edit.yaml", "configs/performance/qwen-12gb-offload.yaml", "3060"),
]


def _tokens(family: str) -> int:
    """Text tokens whose embeddings come to TEXT_TOKENS in all (SD3 puts 77 CLIP tokens before its T5 ones)."""
    spec = get_family(family)
    with torch.device("meta"):
        prefix = spec.module_class().planned_prompt_embeds(None, 0, spec.architecture)["prompt_embeds"].shape[1]
    return TEXT_TOKENS - prefix


def plain_step(family: str, checkpointing: bool, autocast: bool = True) -> tuple[float, float]:
    """The diffusers examples' loop (bench_training.py ``reference``) on fake tensors: (peak GiB, H100 s/step);
    ``autocast``: its forward under bf16 autocast (CUDA's op lists)."""
    spec = get_family(family)
    arch = dict(spec.architecture)
    module = spec.module_class()(pretrained_model=f"tiny:{family}", torch_dtype="bfloat16")
    plan = StepPlan(architecture=arch, text_tokens=_tokens(family))
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_behaviour():
        transformer = build_transformer(arch, torch.bfloat16).requires_grad_(False)
        module._pipe, module.transformer = _PlanPipe(spec.pipeline_class()), transformer
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        from peft import LoraConfig

        transformer.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian", target_modules=TARGETS))
        transformer.train()
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
        latents, cond = fake_inputs(module, plan)
        tracker, recorder = PlannerMemTracker(), TraceRecorder()
        tracker.track_external(transformer, latents, *cond.values())
        with tracker:
            for step in range(2):
                with recorder if step == 1 else contextlib.nullcontext():
                    recorder.phase = "forward"
                    noise = torch.randn_like(latents)
                    sigma = torch.tensor([0.95])
                    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
                    with cast:
                        pred = module.predict_velocity((1 - sigma) * latents + sigma * noise, sigma, cond)
                    loss = F.mse_loss(pred.float(), (noise - latents).float())
                    recorder.phase = "backward"
                    loss.backward()
                    recorder.phase = "optimizer"
                    optimizer.step()
                    optimizer.zero_grad()
                del loss, pred
    return tracker.peak_bytes() / GIB, step_time(recorder.trace, get_gpu("h100")).seconds


def module_like_reference(family: str, checkpointing: bool, autocast: bool = True) -> tuple[float, float]:
    """Our module configured like the reference loop, through the plan command's own request path (trainer
    precision bf16-mixed, or 32-true without ``autocast``; bf16 base either way; no gradient clipping)."""
    from glance_lightning.planner.plan import make_plan
    from glance_lightning.planner.request import build_request

    spec = get_family(family)
    init = {"pretrained_model": f"tiny:{family}", "torch_dtype": "bfloat16", "max_sequence_length": _tokens(family),
            "lora": {"rank": 32, "alpha": 32, "targets": TARGETS},
            "performance": {"gradient_checkpointing": checkpointing}}
    precision = "bf16-mixed" if autocast else "32-true"
    request = build_request(spec.module_class(), init, {"resolution": 1024}, {"precision": precision}, "h100",
                            architecture=dict(spec.architecture))
    with contextlib.redirect_stdout(io.StringIO()):
        plan = make_plan(request)
    return plan.peak_gib, plan.memory.step_s


def measured_table(sink: Any) -> list[str]:
    """Our module's steps measured on an H200 (glance_lightning/planner/measured.py, GLANCE.md section 8) against
    ``plan`` configured as each run was."""
    from glance_lightning.planner.measured import OURS, planned_like
    from glance_lightning.planner.plan import make_plan
    from glance_lightning.planner.request import build_request

    rows = ["| run | measured s/step | predicted s/step | error | measured GiB | predicted GiB | error | derived as |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in OURS:
        init, data, trainer = planned_like(row)
        spec = get_family(row.family)
        request = build_request(spec.module_class(), init, data, trainer, row.gpu,
                                architecture=dict(spec.architecture))
        with contextlib.redirect_stdout(io.StringIO()):
            plan = make_plan(request)
        step, peak = plan.memory.step_s, plan.peak_gib
        sink({"table": "measured", "run": row.label, "measured_s": row.step_s, "predicted_s": step,
              "measured_gib": row.peak_gib, "predicted_gib": peak})

        def err(pred: float, meas: float | None) -> str:
            return "-" if meas is None else f"{100 * (pred / meas - 1):+.1f}%"

        rows.append(f"| {row.label} | {row.step_s or 'kept back'} | {step:.3f} | {err(step, row.step_s)} | "
                    f"{row.peak_gib or 'kept back'} | {peak:.2f} | {err(peak, row.peak_gib)} | "
                    f"{plan.memory.time.derivation().split(' (')[0]} |")
        print(rows[-1], file=sys.stderr, flush=True)
    return rows


def reference_table(sink: Any, autocast: bool = True) -> list[str]:
    rows = ["| setup | measured peak (H100) | plain step predicted | error | our module predicted | error | "
            "measured s/step | plain predicted s/step | module predicted s/step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, family, ckpt, measured, measured_s in REFERENCE:
        started = time.perf_counter()
        plain, plain_s = plain_step(family, ckpt, autocast)
        ours, ours_s = module_like_reference(family, ckpt, autocast)
        took = time.perf_counter() - started
        sink({"table": "reference", "autocast": autocast, "setup": name, "plain_gib": plain, "module_gib": ours,
              "measured_gib": measured,
              "plain_s": plain_s, "module_s": ours_s, "sim_s": took})
        rows.append(f"| {name} | {measured:.1f} GiB | {plain:.2f} GiB | {100 * (plain / measured - 1):+.1f}% | "
                    f"{ours:.2f} GiB | {100 * (ours / measured - 1):+.1f}% | {measured_s} | {plain_s:.2f} | "
                    f"{ours_s:.2f} |")
        print(rows[-1], f"({took:.0f} s)", file=sys.stderr, flush=True)
    return rows


CARDS = ("h100", "4090")  # the configs table's cards: an 80 GB one and a 24 GB one


def _plan_config(argv: list[str], gpu: str = "h100") -> dict[str, Any]:
    """``plan`` for a config on ``gpu`` (a config with ``performance.auto`` plans that card's pick), its step also
    priced on the other cards (``step_s_on``)."""
    from glance_lightning.auto import planned_pick
    from glance_lightning.planner.plan import make_plan
    from glance_lightning.planner.request import request_from_cli
    from glance_lightning.planner.search import with_candidate

    request = request_from_cli(argv, gpu, None, None, None)
    if (request.raw["init"].get("performance") or {}).get("auto"):
        best, _ = planned_pick(request)
        if best is None:
            raise SystemExit(f"{argv}: performance auto finds nothing that fits the {gpu}")
        request = with_candidate(request, best)
    request.step.other_gpus = tuple(get_gpu(g) for g in ("h100", "4090", "4080", "3060") if g != gpu)
    with contextlib.redirect_stdout(io.StringIO()):
        plan = make_plan(request)
    d = plan.as_dict()
    d["step_s_on"] = {**plan.memory.step_s_on, gpu: d["step_s"]}
    return d


def _is_auto(config: str) -> bool:
    import yaml

    init = ((yaml.safe_load((ROOT / config).read_text()) or {}).get("model") or {}).get("init_args") or {}
    return bool((init.get("performance") or {}).get("auto"))


def _settings(d: dict[str, Any]) -> str:
    from glance_lightning.planner.search import Candidate

    s = d["settings"]
    return Candidate(float(s["gradient_checkpointing"] or 0), s["checkpoint_policy"], s["base_quantization"],
                     s["optimizer"], s["offload"], 0.0, 0.0, bool(s["compile_blocks"])).label()


def _fits(d: dict[str, Any], gpu: str) -> str:
    card = get_gpu(gpu).memory_gib
    if d["peak_gib"] + d["cuda_context_gib"] > card:
        return "no"
    return "yes" if d["encode_peak_gib"] + d["cuda_context_gib"] <= card else "yes (encode cache first)"


def config_table(sink: Any, match: str = "") -> list[str]:
    """Each config as shipped on each of ``CARDS`` (with ``performance.auto``: that card's own pick) and with the
    low-memory overlay on the 24 GB card."""
    shipped = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "configs/official").glob("*.yaml"))
    configs = [p for p in shipped if not p.name.startswith("quickstart") and match in str(p.relative_to(ROOT))]
    rows = ["| config | variant | card | settings (auto's pick where auto) | peak GiB | breakdown (base / LoRA+opt / "
            "act) | encode GiB | s/step | fits |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for path in configs:
        config = str(path.relative_to(ROOT))
        for variant, extra in OVERLAYS.items():
            planned: dict[str, Any] | None = None
            for card in CARDS if variant == "as shipped" else CARDS[1:]:
                started = time.perf_counter()
                if planned is None or _is_auto(config):  # fixed settings: one simulation serves every card
                    planned = _plan_config(["--config", config, *extra], card)
                d, took = planned, time.perf_counter() - started
                _DONE[(config, variant, card)] = d
                sink({"table": "configs", "config": config, "variant": variant, "card": card, **d, "sim_s": took})
                b = d["breakdown_gib"]
                rows.append(f"| {config} | {variant} | {card} | {_settings(d)} | {d['peak_gib']:.2f} | "
                            f"{b['base_weights']:.2f} / {b['lora_and_optimizer']:.2f} / {b['activations']:.2f} | "
                            f"{d['encode_peak_gib']:.1f} | {d['step_s_on'][card]:.2f} | {_fits(d, card)} |")
                print(rows[-1], f"({took:.0f} s)", file=sys.stderr, flush=True)
    return rows


_DONE: dict[tuple[str, str, str], dict[str, Any]] = {}  # plans of the configs table, reused by the presets table


def presets_table(sink: Any) -> list[str]:
    rows = ["| config | preset | card | settings | peak GiB | breakdown (base / LoRA+opt / act) | s/step on the card | "
            "fits | host RAM in training GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for config, overlay, gpu in PRESETS:
        variant = Path(overlay).stem
        started = time.perf_counter()
        d = _DONE.get((config, variant, gpu)) or _plan_config(["--config", config, "--config", overlay], gpu)
        took = time.perf_counter() - started
        sink({"table": "presets", "config": config, "variant": variant, "gpu": gpu, **d, "sim_s": took})
        b = d["breakdown_gib"]
        rows.append(f"| {config} | {overlay} | {gpu} ({get_gpu(gpu).memory_gib:.0f} GiB) | {_settings(d)} | "
                    f"{d['peak_gib']:.2f} | {b['base_weights']:.2f} / {b['lora_and_optimizer']:.2f} / "
                    f"{b['activations']:.2f} | {d['step_s_on'][gpu]:.2f} | {_fits(d, gpu)} | "
                    f"{d['host_ram_gib']['training']:.1f} |")
        print(rows[-1], f"({took:.0f} s)", file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="measured,reference,configs,presets",
                        help="comma list of measured, reference, configs, presets")
    parser.add_argument("--match", default="", help="configs table: only configs whose path contains this")
    parser.add_argument("--jsonl", type=Path, default=None, help="append each row here as JSON when done")
    parser.add_argument("--no-autocast", action="store_true",
                        help="reference rows without bf16 autocast (the reference loop as bench_training.py has it)")
    args = parser.parse_args(argv)

    def sink(row: dict[str, Any]) -> None:
        if args.jsonl is not None:
            with args.jsonl.open("a") as f:
                f.write(json.dumps(row, default=str) + "\n")

    tables = args.only.split(",")
    if "measured" in tables:
        print("\n".join(measured_table(sink)) + "\n")
    if "reference" in tables:
        print("\n".join(reference_table(sink, not args.no_autocast)) + "\n")
    if "configs" in tables:
        print("\n".join(config_table(sink, args.match)) + "\n")
    if "presets" in tables:
        print("\n".join(presets_table(sink)))


if __name__ == "__main__":
    main()
