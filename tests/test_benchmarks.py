"""The benchmark scripts stay runnable, and their full-size architectures are the real ones."""

from __future__ import annotations

import importlib
import importlib.util
import json
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
    """The benchmarks build the registry's architecture (what ``plan`` simulates), not a widened tiny one."""
    full_size = load("full_size")
    arch = full_size.architecture(family)
    cls = getattr(importlib.import_module("diffusers"), arch.pop("_class_name"))
    with torch.device("meta"):
        transformer = cls(**arch)
    count = sum(p.numel() for p in transformer.parameters()) / 1e9
    assert billions[0] <= count <= billions[1], f"{family}: {count:.2f}B parameters"


def test_training_benchmark_runs_and_prints_a_table(capsys):
    load("bench_training").main(["--family", "flux", "--steps", "2", "--warmup", "1",
                                 "--variants", "reference,default,ckpt-half"])
    table = capsys.readouterr().out.split("| variant")[1]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows] == ["reference", "default", "ckpt-half"]
    assert all(float(r.split("|")[2]) > 0 for r in rows)  # a failed variant would print nan and a note


@pytest.mark.parametrize("family", ["flux", "sd3", "qwen-image"])
def test_full_size_path_trains_the_registry_architecture_from_memory(family: str, monkeypatch, capsys):
    """--full-size on a CPU-sized stand-in of the registry's architecture: built once, every variant (the plain
    loop and ours) gets it from memory, at its own text and latent widths (the tiny ones would not fit it)."""
    bench = load("bench_training")
    real = bench.full_size.architecture
    monkeypatch.setattr(bench.full_size, "architecture", lambda f, shrunk=False: real(f, shrunk=True))
    built, loads = [], []
    monkeypatch.setattr(bench.full_size, "KeptTransformer", _counting(bench.full_size.KeptTransformer, built, loads))
    bench.main(["--family", family, "--full-size", "--steps", "1", "--warmup", "1", "--text-tokens", "7",
                "--variants", "reference,default"])
    out = capsys.readouterr().out
    assert f"{family} full-size random" in out and len(built) == 1 and len(loads) == 2
    tiny = json.loads((Path(tiny_model_path(f"tiny:{family}")) / "transformer" / "config.json").read_text())
    assert loads[0]["joint_attention_dim"] == real(family, shrunk=True)["joint_attention_dim"] != \
        tiny["joint_attention_dim"]  # the tiny text encoders' embeddings would not fit this transformer
    rows = [line for line in out.split("| variant")[1].splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 for r in rows)


def _counting(cls: type, built: list, loads: list) -> type:
    class Counting(cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

        def fresh(self, device=None):
            loads.append(dict(self.config))
            return super().fresh(device)

    return Counting


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


def test_sampling_benchmark_full_size_path_runs_the_registry_flux_on_real_width_prompts(monkeypatch, capsys):
    """bench_sampling --full-size at a CPU-sized stand-in of the registry's FLUX: its prompt embeddings come at
    the transformer's widths (the tiny text encoders' would not fit it), through all five methods."""
    bench = load("bench_sampling")
    real = bench.full_size.architecture
    monkeypatch.setattr(bench.full_size, "architecture", lambda f, shrunk=False: real(f, shrunk=True))
    bench.main(["--full-size", "--repeats", "1"])
    out = capsys.readouterr().out
    rows = [line for line in out.split("| method")[1].splitlines() if line.startswith("| ") and "---" not in line]
    assert "FLUX full-size random" in out and len(rows) == 5
    assert all(float(r.split("|")[2]) > 0 for r in rows)


def test_auto_start_benchmark_counts_what_each_setup_simulates(tmp_path: Path, monkeypatch, capsys):
    """bench_auto_start on FLUX.1-dev's config with its transformer shrunk: the reference setup simulates two
    steps per simulation and every pick; the others take a pick far under the card as interpolated. The same pick
    either way (the benchmark itself asserts that the cache answers a second choice)."""
    import os

    from glance_lightning.registry import get_family

    bench = load("bench_auto_start")
    arch = {"_class_name": "FluxTransformer2DModel", **get_family("flux").architecture,
            "num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
            "axes_dims_rope": [4, 6, 6], "joint_attention_dim": 48, "pooled_projection_dim": 40}
    (tmp_path / "flux-small" / "transformer").mkdir(parents=True)
    (tmp_path / "flux-small" / "transformer" / "config.json").write_text(json.dumps(arch))
    cache = os.environ.get("GLANCE_LIGHTNING_CACHE")
    bench.main(["--config", str(BENCHMARKS.parent / "configs" / "flux-dev.yaml"), "--cards", "h100,4090",
                "--model.init_args.pretrained_model", str(tmp_path / "flux-small")])
    assert os.environ.get("GLANCE_LIGHTNING_CACHE") == cache  # each setup's own cache folder, then the session's
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and
            "---" not in line and "setup" not in line]
    assert [(r[0].split(" (")[0].lstrip("| "), r[1], r[4]) for r in rows] == [
        ("reference", "h100", "4 here"), ("reference", "4090", "1 here"),
        ("1 cpu", "h100", "3 here"), ("1 cpu", "4090", "0 here"),
        (f"{bench.available_cpus()} cpus", "h100", "3 here"), (f"{bench.available_cpus()} cpus", "4090", "0 here")]
    assert len({r[5].rsplit(", ", 2)[0] for r in rows if r[1] == "h100"}) == 1  # the same pick whatever the setup
