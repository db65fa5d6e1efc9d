"""The benchmark scripts stay runnable, and their full-size architectures are the real ones."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from glance_lightning.tiny import tiny_model_path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("family", "billions"),
    [("flux", (11.8, 12.0)), ("qwen-image", (20.3, 20.5)), ("sd3", (8.0, 8.2))],  # FLUX.1-dev, Qwen-Image, SD3.5-L
)
def test_full_size_architectures_have_the_real_parameter_counts(family: str, billions: tuple[float, float]):
    bench = load("bench_training")
    transformer_cls, config = bench.full_size_config(Path(tiny_model_path(f"tiny:{family}")), family)
    with torch.device("meta"):
        transformer = transformer_cls(**config)
    count = sum(p.numel() for p in transformer.parameters()) / 1e9
    assert billions[0] <= count <= billions[1], f"{family}: {count:.2f}B parameters"


def test_training_benchmark_runs_and_prints_a_table(capsys):
    load("bench_training").main(["--family", "flux", "--steps", "2", "--warmup", "1",
                                 "--variants", "reference,default,ckpt-half"])
    table = capsys.readouterr().out.split("| variant")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["reference", "default", "ckpt-half"]
    assert all(float(r.split("|")[2]) > 0 for r in rows)  # a failed variant would print nan and a note


def test_full_size_path_writes_and_loads_a_wider_transformer(monkeypatch, capsys):
    """--full-size at a CPU-sized stand-in: the transformer is rebuilt, saved and loaded by both sides."""
    bench = load("bench_training")
    monkeypatch.setitem(bench.FULL_SIZE, "flux", {"num_layers": 2, "num_single_layers": 3,
                                                  "attention_head_dim": 16, "num_attention_heads": 4})
    built = []
    real = bench.full_size_transformer
    monkeypatch.setattr(bench, "full_size_transformer", lambda *a: built.append(a) or real(*a))
    bench.main(["--family", "flux", "--full-size", "--steps", "1", "--warmup", "1",
                "--variants", "reference,default"])
    out = capsys.readouterr().out
    assert built and "flux full-size random" in out
    rows = [line for line in out.split("| variant")[1].splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 for r in rows)


def test_our_step_launches_the_plain_loops_matmuls_and_attention_and_barely_more(capsys):
    """benchmarks/bench_step_ops.py on a reduced FLUX: the same matmul and attention kernels as the plain
    diffusers + peft step in every phase (no work for the inactive adapter), and at most a handful more small
    kernels in all (the loss's reduction and the finiteness check)."""
    bench = load("bench_step_ops")
    arch = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 1,
            "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
            "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}
    plain, ours = bench.plain_trace("flux", arch), bench.our_trace("flux", arch)

    def heavy(trace):
        counts = {}
        for op, n in trace.ops.items():
            if op.kind != "elementwise":
                counts[(op.phase, op.kind, op.dims)] = counts.get((op.phase, op.kind, op.dims), 0) + n
        return counts

    assert heavy(plain) == heavy(ours)
    forward_backward = [t.launches("forward") + t.launches("backward") for t in (plain, ours)]
    assert forward_backward[0] <= forward_backward[1] <= forward_backward[0] + 20
