"""What our training step runs beyond the plain diffusers + peft loop, kernel by kernel (full size, fake tensors).

Both steps are recorded by the planner's ``TraceRecorder`` on the real full-size architecture (no weights, no GPU):
the plain loop of the diffusers LoRA examples (one peft adapter on to_q/k/v/out.0, rank 32, bf16 autocast, MSE
loss, gradient clipping 1.0, AdamW) and our module configured the same way (both Glance adapters attached, one
active). Printed per family: kernels launched, dtype casts (``_to_copy``), copies, bytes moved by elementwise
kernels, the time ``planner/timing.py`` gives them on an H200, and every op whose count differs. ``--checkpointing``
compares both with every block recomputed (the plain loop through diffusers' ``enable_gradient_checkpointing``).

    python benchmarks/bench_step_ops.py --families flux,sd3 [--checkpointing]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glance_lightning.planner.fake import cuda_behaviour  # noqa: E402
from glance_lightning.planner.measured import TARGETS, MeasuredStep, planned_like  # noqa: E402
from glance_lightning.planner.memory import StepPlan, _PlanPipe, build_transformer, fake_inputs  # noqa: E402
from glance_lightning.planner.plan import make_plan  # noqa: E402
from glance_lightning.planner.request import build_request  # noqa: E402
from glance_lightning.planner.runtime import get_gpu  # noqa: E402
from glance_lightning.planner.timing import step_time  # noqa: E402
from glance_lightning.planner.trace import OpTrace, TraceRecorder  # noqa: E402
from glance_lightning.registry import get_family  # noqa: E402

TOKENS = {"flux": 512, "sd3": 256, "qwen-image": 45}


def plain_trace(family: str, architecture: dict | None = None, checkpointing: bool = False) -> OpTrace:
    from peft import LoraConfig

    spec = get_family(family)
    arch = dict(architecture or spec.architecture)
    module = spec.module_class()(pretrained_model=f"tiny:{family}", torch_dtype="bfloat16")
    recorder = TraceRecorder()
    with FakeTensorMode(allow_non_fake_inputs=True), cuda_behaviour():
        transformer = build_transformer(arch, torch.bfloat16).requires_grad_(False)
        module._pipe, module.transformer = _PlanPipe(spec.pipeline_class()), transformer
        transformer.add_adapter(LoraConfig(r=32, lora_alpha=32, init_lora_weights="gaussian",
                                           target_modules=list(TARGETS)))
        transformer.train()
        if checkpointing:
            transformer.enable_gradient_checkpointing()
        params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
        latents, cond = fake_inputs(module, StepPlan(architecture=arch, text_tokens=TOKENS[family]))
        for step in range(2):
            with recorder if step == 1 else contextlib.nullcontext():
                recorder.phase = "forward"
                noise, sigma = torch.randn_like(latents), torch.tensor([0.95])
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    pred = module.predict_velocity((1 - sigma) * latents + sigma * noise, sigma, cond)
                loss = F.mse_loss(pred.float(), (noise - latents).float())
                recorder.phase = "backward"
                loss.backward()
                recorder.phase = "clip"
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                recorder.phase = "optimizer"
                optimizer.step()
                optimizer.zero_grad()
    return recorder.trace


def our_trace(family: str, architecture: dict | None = None, checkpointing: bool = False) -> OpTrace:
    spec = get_family(family)
    row = MeasuredStep(family, "h200", float(checkpointing), TOKENS[family], None, None)
    init, data, trainer = planned_like(row)
    request = build_request(spec.module_class(), init, data, trainer, "h200",
                            architecture=dict(architecture or spec.architecture))
    with contextlib.redirect_stdout(io.StringIO()):
        return make_plan(request).memory.trace


def _counts(trace: OpTrace) -> Counter:
    counts: Counter = Counter()
    for op, n in trace.ops.items():
        counts[(op.phase, op.name)] += n
    return counts


def _row(trace: OpTrace) -> tuple[int, int, int, float, float]:
    casts = sum(n for op, n in trace.ops.items() if op.name == "_to_copy")
    copies = sum(n for op, n in trace.ops.items() if op.name in ("copy_", "clone"))
    moved = sum(op.bytes * n for op, n in trace.ops.items() if op.kind == "elementwise") / 1e9
    return trace.launches(), casts, copies, moved, step_time(trace, get_gpu("h200")).seconds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="flux,sd3")
    parser.add_argument("--checkpointing", action="store_true", help="both steps recompute every block")
    args = parser.parse_args(argv)
    print("| family | step | kernels | casts | copies | elementwise GB | H200 s/step (predicted) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    differences = {}
    for family in args.families.split(","):
        plain = plain_trace(family, checkpointing=args.checkpointing)
        ours = our_trace(family, checkpointing=args.checkpointing)
        for name, trace in (("plain diffusers + peft", plain), ("glance_lightning", ours)):
            kernels, casts, copies, moved, seconds = _row(trace)
            print(f"| {family} | {name} | {kernels} | {casts} | {copies} | {moved:.1f} | {seconds:.3f} |")
        a, b = _counts(plain), _counts(ours)
        differences[family] = {k: (a[k], b[k]) for k in sorted(set(a) | set(b)) if a[k] != b[k]}
    for family, diff in differences.items():
        shown = ", ".join(f"{phase} {name} {p}->{o}" for (phase, name), (p, o) in diff.items())
        print(f"\n{family}: ops whose count differs (plain -> ours): {shown or 'none'}")


if __name__ == "__main__":
    main()
