"""``model.performance.auto``: what a fit picks on an 80 GB and a 24 GB card (full-size FLUX.1-dev planned on fake
tensors, the card stood in for by its CUDA properties), explicit switches kept, the machine's libraries respected,
the answer cached, and the CPU's plain settings. No GPU, no hub."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from glance_lightning import auto
from glance_lightning.families.flux import FluxGlance
from glance_lightning.models import ResolvedModel
from glance_lightning.planner.plan import CUDA_CONTEXT_GIB, make_plan
from glance_lightning.planner.runtime import GPUS, detect_gpu
from glance_lightning.planner.search import with_candidate
from glance_lightning.registry import get_family

CARDS = {"h100": ("NVIDIA H100 80GB HBM3", 79.6, 132, 9, 0), "4090": ("NVIDIA GeForce RTX 4090", 23.6, 128, 8, 9)}


@pytest.fixture
def full_size_flux(tmp_path: Path, monkeypatch) -> Path:
    """A model folder holding FLUX.1-dev's full-size transformer config (no weights: the planner reads only it)."""
    folder = tmp_path / "flux-dev"
    (folder / "transformer").mkdir(parents=True)
    config = {"_class_name": "FluxTransformer2DModel", **get_family("flux").architecture}
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv("GLANCE_LIGHTNING_CACHE", str(tmp_path / "cache"))
    return folder


def _card(monkeypatch, key: str) -> None:
    name, gib, sms, major, minor = CARDS[key]
    props = SimpleNamespace(name=name, total_memory=int(gib * 2**30), multi_processor_count=sms, major=major,
                            minor=minor)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)


def _libraries(monkeypatch, present: set[str]) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (object() if name in present else None)
                        if name in ("triton", "torchao", "bitsandbytes") else real(name, *a))


def _module(folder: Path, **performance) -> FluxGlance:
    module = FluxGlance(pretrained_model="tiny:flux", torch_dtype="bfloat16", lora={"rank": 16, "alpha": 64},
                        performance={"auto": True, **performance})
    module.resolve_model = lambda: ResolvedModel(str(folder), str(folder))
    return module


def _trainer(device: str = "cuda:0") -> SimpleNamespace:
    return SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device(device)), precision="bf16-mixed",
                           gradient_clip_val=1.0, datamodule=SimpleNamespace(resolution=1024, batch_size=1))


def _fits_when_simulated(module: FluxGlance, folder: Path, card: str) -> float:
    request = auto._request(module, _trainer(), detect_gpu())
    overlay = {"gradient_checkpointing": module.perf.gradient_checkpointing,
               "checkpoint_policy": module.perf.checkpoint_policy, "base_quantization": module.perf.base_quantization,
               "offload": module.perf.offload, "compile": module.perf.compile_blocks}
    from glance_lightning.planner.search import Candidate

    candidate = Candidate(float(overlay["gradient_checkpointing"]), overlay["checkpoint_policy"],
                          overlay["base_quantization"], module.optim_settings.name, overlay["offload"], 0.0, 0.0,
                          bool(overlay["compile"]))
    plan = make_plan(with_candidate(request, candidate))
    assert plan.peak_gib + CUDA_CONTEXT_GIB <= GPUS[card].memory_gib
    return plan.peak_gib


def test_auto_picks_the_fastest_fitting_switches_on_an_80gb_and_a_24gb_card(full_size_flux, monkeypatch):
    _libraries(monkeypatch, {"triton", "torchao", "bitsandbytes"})
    _card(monkeypatch, "h100")
    module = _module(full_size_flux)
    line = auto.choose(module, _trainer())
    # 80 GB: the whole bf16 step fits without recomputing anything; compile is the fastest way to run it
    assert module.perf.gradient_checkpointing == 0.0 and module.perf.base_quantization == "none"
    assert module.perf.compile_blocks is True and module.perf.offload == "none"
    assert module.optim_settings.name == "adamw"  # 8-bit states only where they are needed to fit
    assert "performance auto on the NVIDIA H100 80GB HBM3" in line and "s/step" in line
    peak = float(line.split("predicted peak ")[1].split(" GiB")[0])  # far under the card: as interpolated
    assert peak + CUDA_CONTEXT_GIB <= GPUS["h100"].memory_gib and peak > 30  # no checkpointing: most of 46 GiB

    _card(monkeypatch, "4090")
    small = _module(full_size_flux)
    line = auto.choose(small, _trainer())  # the anchors of the first choice are reused: only the pick is checked
    assert "planned in" in line
    chose = (small.perf.gradient_checkpointing, small.perf.base_quantization, small.perf.offload)
    assert chose != (0.0, "none", "none")  # the bf16 step without recomputation (46 GiB) cannot fit 24 GB
    _fits_when_simulated(small, full_size_flux, "4090")

    again = _module(full_size_flux)
    monkeypatch.setattr("glance_lightning.planner.search.simulate_anchors", lambda *a: pytest.fail("re-planned"))
    monkeypatch.setattr("glance_lightning.planner.search.make_plan", lambda *a: pytest.fail("re-simulated"))
    assert "planned before, cached" in auto.choose(again, _trainer())
    assert (again.perf.gradient_checkpointing, again.perf.base_quantization, again.perf.offload) == chose


def test_explicit_switches_win_and_missing_libraries_are_left_out(full_size_flux, monkeypatch):
    _libraries(monkeypatch, set())  # no triton, torchao or bitsandbytes
    _card(monkeypatch, "h100")
    module = _module(full_size_flux, gradient_checkpointing=0.5)
    auto.choose(module, _trainer())
    assert module.perf.gradient_checkpointing == 0.5  # given, so kept
    assert module.perf.compile_blocks is False and module.perf.base_quantization == "none"
    assert module.optim_settings.name == "adamw"


def test_on_the_cpu_auto_takes_the_plain_settings_without_planning(monkeypatch):
    monkeypatch.setattr("glance_lightning.planner.search.simulate_anchors", lambda *a: pytest.fail("planned"))
    module = FluxGlance(pretrained_model="tiny:flux", performance={"auto": True, "compile_blocks": False})
    assert module.perf.gradient_checkpointing is None  # unset until the device is known
    line = auto.choose(module, _trainer("cpu"))
    assert "nothing to choose" in line
    assert (module.perf.gradient_checkpointing, module.perf.base_quantization, module.optim_settings.name) == \
        (False, "none", "adamw")


def test_without_auto_unset_switches_are_the_plain_defaults():
    module = FluxGlance(pretrained_model="tiny:flux")
    assert (module.perf.gradient_checkpointing, module.perf.compile_blocks, module.perf.base_quantization,
            module.perf.offload, module.perf.checkpoint_policy, module.optim_settings.name) == \
        (False, False, "none", "none", "full", "adamw")


def test_cards_are_recognised_by_name_or_rated_by_generation(monkeypatch):
    _card(monkeypatch, "4090")
    assert detect_gpu().name == "4090" and detect_gpu().memory_gib == pytest.approx(23.6)
    props = SimpleNamespace(name="NVIDIA Future 9", total_memory=96 * 2**30, multi_processor_count=66, major=9,
                            minor=0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=0: props)
    card = detect_gpu()
    assert card.generation == "hopper" and card.bf16_tflops == pytest.approx(GPUS["h100"].bf16_tflops / 2)
    assert card.memory_gib == pytest.approx(96.0)


def test_plan_and_fit_share_one_auto_cache(tmp_path: Path, monkeypatch, capsys):
    """``plan`` on an auto config plans once and caches like a fit: a second card reuses the anchors, the same
    card again reads its pick, and a fit's auto on that card reuses the anchors ``plan`` simulated (FLUX's
    architecture shrunk so that each simulation takes a moment)."""
    import yaml

    from glance_lightning.cli import main
    from glance_lightning.planner import search

    monkeypatch.setenv("GLANCE_LIGHTNING_CACHE", str(tmp_path / "cache"))
    arch = {"_class_name": "FluxTransformer2DModel", **get_family("flux").architecture,
            "num_layers": 2, "num_single_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16,
            "axes_dims_rope": [4, 6, 6], "joint_attention_dim": 48, "pooled_projection_dim": 40}
    folder = tmp_path / "flux-small"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_text(json.dumps(arch))
    config = Path(__file__).resolve().parents[1] / "configs" / "flux-dev.yaml"
    anchors = []
    real = search.simulate_anchors
    monkeypatch.setattr(search, "simulate_anchors", lambda request, *more: anchors.append(1) or real(request, *more))

    def plan(gpu: str) -> str:
        code = main(["plan", "--config", str(config), "--gpu", gpu, "--model.init_args.pretrained_model", str(folder)])
        out = capsys.readouterr().out
        assert code == 0, out
        return out.splitlines()[0]

    assert "picks" in plan("h100") and "cached for the fits and plans after this one" in plan("4090")
    assert len(anchors) == 1  # the second card priced the first card's anchors
    monkeypatch.setattr(search, "make_plan", lambda *a: pytest.fail("the pick was simulated again"))
    assert "planned before, cached" in plan("h100")
    assert len(anchors) == 1

    monkeypatch.undo()  # a fit on an H100: its pick is its own (its machine's libraries), the anchors are plan's
    monkeypatch.setenv("GLANCE_LIGHTNING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(search, "simulate_anchors", lambda *a: pytest.fail("the anchors were simulated again"))
    _libraries(monkeypatch, {"triton"})
    _card(monkeypatch, "h100")
    init = yaml.safe_load(config.read_text())["model"]["init_args"]
    module = FluxGlance(**init)
    module.resolve_model = lambda: ResolvedModel(str(folder), str(folder))
    line = auto.choose(module, _trainer())
    assert "performance auto on the NVIDIA H100" in line and "planned in" in line
