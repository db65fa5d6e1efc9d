"""The planner's time against the measured GPU table (``planner.measured``: data, not code), and the time model's
parts on their own: the op trace of a small real architecture, the per-kernel pricing, compile and the cards.

The full-size rows simulate the real architectures on fake tensors (15-45 s each on 2 cores); no GPU, no hub."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from glance_lightning.cli import main
from glance_lightning.planner import timing
from glance_lightning.planner.measured import OURS, MeasuredStep, planned_like
from glance_lightning.planner.memory import StepPlan, simulate_step
from glance_lightning.planner.plan import make_plan
from glance_lightning.planner.request import build_request
from glance_lightning.planner.runtime import get_gpu
from glance_lightning.planner.trace import Op, OpTrace
from glance_lightning.registry import get_family

ARCH = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 1,
        "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
        "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}


def _planned(row: MeasuredStep):
    init, data, trainer = planned_like(row)
    spec = get_family(row.family)
    request = build_request(spec.module_class(), init, data, trainer, row.gpu, architecture=dict(spec.architecture))
    with contextlib.redirect_stdout(io.StringIO()):
        return make_plan(request)


@pytest.mark.parametrize("row", OURS, ids=lambda r: r.label.replace(" ", "-"))
def test_plan_is_within_15_percent_of_every_measured_step_and_5_percent_of_every_peak(row: MeasuredStep) -> None:
    plan = _planned(row)
    if row.peak_gib is not None:
        assert abs(plan.peak_gib / row.peak_gib - 1) <= 0.05, (plan.peak_gib, row.peak_gib)
    if row.step_s is not None:
        assert abs(plan.memory.step_s / row.step_s - 1) <= 0.15, plan.memory.time.derivation()
    assert plan.memory.time.compiled == row.compile_blocks


def test_the_flux_step_counts_the_flops_measured_on_the_gpu() -> None:
    """GLANCE.md section 8: the checkpointed FLUX step is 246.5 TFLOP (172 without checkpointing): the trace
    holds every matmul and attention kernel of the real step, the recomputation included."""
    plan = _planned(OURS[0])
    assert abs(plan.memory.time.tflop / 246.5 - 1) < 0.01
    assert plan.memory.time.parts["launches"] > 0 and plan.memory.time.kernels > 5000


def _small_trace(share: float = 0.0) -> OpTrace:
    from glance_lightning.families.flux import FluxGlance

    module = FluxGlance(pretrained_model="tiny:flux", torch_dtype="bfloat16", max_sequence_length=16,
                        performance={"gradient_checkpointing": share})
    with contextlib.redirect_stdout(io.StringIO()):
        memory = simulate_step(module, StepPlan(architecture=dict(ARCH), height=256, width=256, text_tokens=16,
                                                gpu=get_gpu("h100")))
    return memory.trace


def test_the_trace_holds_each_kind_of_kernel_once_per_call_and_the_recomputation() -> None:
    eager, recomputed = _small_trace(0.0), _small_trace(1.0)
    blocks = ARCH["num_layers"] + ARCH["num_single_layers"]

    def count(trace: OpTrace, phase: str, kind: str) -> int:
        return sum(n for op, n in trace.ops.items() if op.phase == phase and op.kind == kind)

    assert count(eager, "forward", "attention-forward") == blocks
    assert count(eager, "backward", "attention-backward") == blocks
    assert count(eager, "backward", "attention-forward") == 0
    assert count(recomputed, "backward", "attention-forward") == blocks  # every block's forward again
    assert count(recomputed, "backward", "matmul") > count(eager, "backward", "matmul")
    assert count(eager, "optimizer", "elementwise") > 0 and count(eager, "clip", "elementwise") > 0
    runs, moved = eager.fused["forward"]
    elementwise = [(op, n) for op, n in eager.ops.items() if op.phase == "forward" and op.kind == "elementwise"]
    assert 0 < runs < sum(n for _, n in elementwise)  # fused runs are fewer kernels ...
    assert moved < sum(op.bytes * n for op, n in elementwise)  # ... moving fewer bytes
    restored = OpTrace.from_dict(json.loads(json.dumps(eager.as_dict())))
    assert restored.ops == eager.ops and restored.fused == eager.fused


def test_each_part_is_priced_from_the_kernels_it_runs() -> None:
    h200 = get_gpu("h200")
    big = Op("forward", "matmul", "mm", (1, 4096, 3072, 3072), 2 * 4096 * 3072 * 3072, 0, False)
    partial = Op("forward", "matmul", "mm", (1, 128, 3072, 3072), 2 * 128 * 3072 * 3072, 0, False)
    # 24 output tiles of 132 SMs: the small matmul runs at about a fifth of the large one's rate per FLOP
    assert timing.matmul_seconds(partial, h200) / partial.flops > 4 * timing.matmul_seconds(big, h200) / big.flops
    moved = 2 * (4096 * 3072 + 4096 * 32)
    lora = Op("forward", "matmul", "mm", (1, 4096, 32, 3072), 2 * 4096 * 32 * 3072, moved, False)
    assert timing.matmul_seconds(lora, h200) == pytest.approx(lora.bytes / (h200.bandwidth_gbs * 1e9 * 0.8))
    heads64 = Op("forward", "attention-forward", "sdpa", (1, 38, 4429, 4429, 64), 10**12, 0, False)
    heads128 = heads64._replace(dims=(1, 24, 4608, 4608, 128))
    assert timing.kernel_seconds(heads64, h200) > timing.kernel_seconds(heads128, h200)
    trace = OpTrace()
    trace.ops.update({big: 10, Op("forward", "elementwise", "add", (), 0, 10**9, False): 100})
    step = timing.step_time(trace, h200)
    assert step.kernels == 110 and step.parts["launches"] == pytest.approx(110 * timing.LAUNCH_S)
    assert step.seconds == pytest.approx(sum(step.parts.values()))
    assert timing.step_time(trace, get_gpu("4090")).seconds > step.seconds


def test_compiled_blocks_are_faster_and_said_so() -> None:
    trace = _small_trace(0.5)
    eager, compiled = timing.step_time(trace, get_gpu("h200")), timing.step_time(trace, get_gpu("h200"), True)
    assert compiled.seconds < eager.seconds and compiled.kernels < eager.kernels
    assert "fused by compile" in compiled.derivation() and "eager" in eager.derivation()


def test_plan_says_how_the_time_was_derived(tmp_path: Path, monkeypatch, capsys) -> None:
    arch = tmp_path / "config.json"
    arch.write_text(json.dumps(ARCH))
    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(repo)
    argv = ["plan", "--config", "configs/quickstart.yaml", "--architecture", str(arch), "--gpu", "h200",
            "--data.init_args.resolution", "256", "--model.init_args.max_sequence_length", "16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "derived as" in out and "launches" in out and "kernels" in out and "planner/timing.py" in out
    assert main([*argv, "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    parts = result["step_time"]["parts_s"]
    assert sum(parts.values()) == pytest.approx(result["step_s"], rel=1e-3)
    assert torch.isfinite(torch.tensor(result["step_s"]))
