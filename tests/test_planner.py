"""The planner (``python -m glance_lightning plan``) on a reduced but real FLUX architecture (1 double + 2 single
blocks, 2 heads of 16): fake-tensor prediction against the same step on real CPU tensors, the JSON output, the
fits logic, the quantised paths, the search and user errors. No hub, no GPU, no weights."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from glance_lightning.cli import main
from glance_lightning.families.flux import FluxGlance
from glance_lightning.planner.fake import CUDA_ALLOCATION, cuda_behaviour
from glance_lightning.planner.memory import StepPlan, simulate_step
from glance_lightning.planner.request import build_request

ARCH = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "num_layers": 1,
        "num_single_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
        "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": [4, 6, 6]}
SMALL = ["--data.init_args.resolution", "256", "--model.init_args.max_sequence_length", "16"]


@pytest.fixture
def arch_file(tmp_path: Path) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(ARCH))
    return str(path)


def _module(**performance) -> FluxGlance:
    return FluxGlance(pretrained_model="tiny:flux", torch_dtype="bfloat16", max_sequence_length=16,
                      performance=performance)


def _plan(**kw) -> StepPlan:
    return StepPlan(architecture=dict(ARCH), height=256, width=256, text_tokens=16, **kw)


class LiveBytes(TorchDispatchMode):
    """An independent count of real allocations: every storage an op creates, alive until garbage, rounded as
    CUDA rounds; ``peak`` is the most alive at once, ``existing`` tensors (parameters, inputs) included."""

    def __init__(self, existing: list[torch.Tensor]) -> None:
        super().__init__()
        self.seen = weakref.WeakKeyDictionary({t.untyped_storage(): True for t in existing})
        self.live = sum(-(-s.nbytes() // CUDA_ALLOCATION) * CUDA_ALLOCATION for s in self.seen)
        self.peak = self.live

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                if storage not in self.seen and storage.nbytes():
                    size = -(-storage.nbytes() // CUDA_ALLOCATION) * CUDA_ALLOCATION
                    self.seen[storage] = True
                    weakref.finalize(storage, self._free, size)
                    self.live += size
                    self.peak = max(self.peak, self.live)
        return out


@pytest.mark.parametrize("checkpointing", [False, True])
def test_fake_prediction_matches_the_real_cpu_step(checkpointing):
    """The same two training steps (same module, same CUDA behaviours) on fake and on real CPU tensors: the
    prediction must be what the real kernels allocate."""
    fake = simulate_step(_module(gradient_checkpointing=checkpointing), _plan())
    real = simulate_step(_module(gradient_checkpointing=checkpointing), _plan(), fake=False)
    assert fake.peak == pytest.approx(real.peak, rel=0.01)
    assert fake.base == real.base and fake.activations > 0


def test_tracker_agrees_with_an_independent_count_of_real_allocations():
    """A plain real-tensor forward/backward of the same transformer: PlannerMemTracker's peak against a
    storage-by-storage count written here (both round to 512 B)."""
    from glance_lightning.planner.fake import PlannerMemTracker
    from glance_lightning.planner.memory import build_transformer

    torch.manual_seed(0)
    model = build_transformer(ARCH, torch.float32).requires_grad_(True)
    inputs = {"hidden_states": torch.randn(1, 64, 64), "encoder_hidden_states": torch.randn(1, 8, 32),
              "pooled_projections": torch.randn(1, 32), "timestep": torch.tensor([0.5]),
              "guidance": torch.tensor([1.0]), "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(8, 3)}
    existing = [*model.parameters(), *inputs.values()]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(**inputs, return_dict=False)[0].float().pow(2).mean().backward()

    with cuda_behaviour():
        tracker = PlannerMemTracker()
        tracker.track_external(model, *inputs.values())
        with tracker:
            step()
        model.zero_grad(set_to_none=True)
        with LiveBytes(existing) as count:
            step()
    assert tracker.peak_bytes() == pytest.approx(count.peak, rel=0.05)


def test_plan_json_has_the_keys_and_fits_follows_the_card(arch_file, repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    base = ["plan", "--config", "configs/quickstart.yaml", *SMALL, "--architecture", arch_file, "--format", "json"]
    assert main([*base, "--gpu", "4090"]) == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("peak_gib", "breakdown_gib", "step_s", "fits", "encode_peak_gib", "host_ram_gib", "predicted"):
        assert key in result
    assert set(result["breakdown_gib"]) == {"base_weights", "lora_and_optimizer", "activations"}
    assert result["fits"] is True and result["step_s"] > 0
    assert sum(result["breakdown_gib"].values()) == pytest.approx(result["peak_gib"], abs=2e-3)
    assert main([*base, "--gpu-memory", "0.01"]) == 0
    assert json.loads(capsys.readouterr().out)["fits"] is False


def test_plan_table_says_predicted(arch_file, repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    assert main(["plan", "--config", "configs/quickstart.yaml", *SMALL, "--architecture", arch_file]) == 0
    out = capsys.readouterr().out
    assert "predicted" in out and "peak GPU memory" in out and "fits" in out


def _json_plan(main_args: list[str], capsys) -> dict:
    assert main(main_args) == 0
    return json.loads(capsys.readouterr().out)


def test_plan_per_rank_of_a_sharded_fit(arch_file, repo, monkeypatch, capsys):
    """``--devices 2``: the step of one FSDP2 rank (its sharding simulated, planner/ranks.py), the communication in
    the time's derivation; a config's own trainer.devices
    and strategy fsdp2 plan per rank as well; across nodes the network is the slower link."""
    monkeypatch.chdir(repo)
    base = ["plan", "--config", "configs/quickstart.yaml", *SMALL, "--architecture", arch_file, "--gpu", "h100",
            "--format", "json", "--model.init_args.torch_dtype", "bfloat16"]
    single = _json_plan(base, capsys)
    sharded = _json_plan([*base, "--devices", "2"], capsys)
    assert single["per_rank"] is None and sharded["per_rank"] == "per rank of 2 devices (fsdp2)"
    assert sharded["settings"]["devices"] == 2 and sharded["settings"]["strategy"] == "fsdp2"
    derivation = sharded["step_time"]["derivation"]
    assert "FSDP2 all-gathers" in derivation and "360 GB/s" in derivation and "communication" in derivation
    config = _json_plan([*base, "--trainer.devices", "2", "--trainer.strategy", "fsdp2"], capsys)
    assert config["per_rank"] == sharded["per_rank"] and config["peak_bytes"] == sharded["peak_bytes"]
    nodes = _json_plan([*base, "--devices", "2", "--num-nodes", "2"], capsys)
    assert nodes["per_rank"] == "per rank of 2 devices x 2 nodes (fsdp2)"
    assert "at 25 GB/s" in nodes["step_time"]["derivation"]


def test_a_planned_rank_keeps_shards_of_the_loras_and_their_states():
    """On the planner's reduced FLUX: the rank keeps its shards of the LoRAs and AdamW's states (the per-rank
    peak adds the blocks FSDP2 gathers while they run; tests/test_sharding.py measures the halving)."""
    from glance_lightning.planner.ranks import Ranks, full_bytes

    module = _module()
    sharded = simulate_step(_module(), _plan(ranks=Ranks(2, 1, "fsdp2")))
    single = simulate_step(module, _plan())
    weights, _ = full_bytes(module.transformer)
    assert single.base + single.lora == pytest.approx(weights, rel=0.05)
    assert sharded.lora < single.lora and sharded.optimizer < single.optimizer  # (each tensor rounds to 512 B)


def test_plan_per_rank_of_a_replicated_fit_keeps_ddps_buckets(arch_file, repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    base = ["plan", "--config", "configs/quickstart.yaml", *SMALL, "--architecture", arch_file, "--gpu", "4090",
            "--format", "json"]
    single = _json_plan(base, capsys)
    ddp = _json_plan([*base, "--devices", "2", "--strategy", "ddp"], capsys)
    assert ddp["per_rank"] == "per rank of 2 devices (ddp)" and ddp["peak_bytes"] > single["peak_bytes"]
    assert "DDP all-reduces" in ddp["step_time"]["derivation"]


def test_quantised_bases_and_8bit_states_are_planned():
    """NF4 < int8 < bf16 base weights; 8-bit AdamW keeps less state than AdamW (both by their layouts)."""
    init = {"pretrained_model": "tiny:flux", "torch_dtype": "bfloat16", "max_sequence_length": 16,
            "performance": {"gradient_checkpointing": True}}
    data, trainer = {"resolution": 256}, {"precision": "bf16-mixed", "gradient_clip_val": 1.0}
    results = {}
    for quant, optimizer in (("none", "adamw"), ("int8-weight-only", "adamw"), ("nf4", "adamw8bit")):
        request = build_request(FluxGlance, {**init, "performance": {**init["performance"],
                                                                      "base_quantization": quant},
                                             "optimizer": {"name": optimizer}}, data, trainer, "4090",
                                architecture=dict(ARCH))
        results[quant] = simulate_step(request.module, request.step)
    assert results["nf4"].base < results["int8-weight-only"].base < results["none"].base
    assert results["nf4"].optimizer_8bit < results["nf4"].optimizer_adamw
    assert any("nf4" in n for n in results["nf4"].notes) and any("8-bit" in n for n in results["nf4"].notes)


def test_search_picks_a_combination_that_fits(arch_file, repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    base = ["plan", "--config", "configs/quickstart.yaml", *SMALL, "--architecture", arch_file, "--format", "json"]
    assert main([*base, "--gpu-memory", "20"]) == 0
    roomy = json.loads(capsys.readouterr().out)
    main([*base, "--gpu-memory", "20", "--model.init_args.performance.gradient_checkpointing", "true"])
    card = 0.5 + json.loads(capsys.readouterr().out)["peak_gib"] + 1e-4  # room for checkpointing, not without
    monkeypatch.setattr("glance_lightning.planner.plan.encode_stage_gib", lambda *a: (0.0, 0.0))
    monkeypatch.setattr("glance_lightning.planner.anchors.encode_stage_gib", lambda *a: (0.0, 0.0))
    assert main([*base, "--gpu-memory", str(card), "--search"]) == 0
    found = json.loads(capsys.readouterr().out)
    best = found["best"]
    assert best is not None and best["peak_gib"] + 0.5 <= card
    assert found["best_simulated"]["peak_gib"] == pytest.approx(best["peak_gib"], rel=0.1)
    assert roomy["peak_gib"] + 0.5 > card  # the config as given would not fit
    assert found["simulations"] == 4


def test_a_sharded_search_offers_only_what_sharding_runs(arch_file, repo, monkeypatch, capsys):
    """Under strategy fsdp2 a quantised base, 8-bit states, offload and compile are refused by fit: the search
    (and so performance auto) chooses among checkpointing shares and policies only."""
    monkeypatch.chdir(repo)
    base = ["plan", "--config", "configs/quickstart.yaml", *SMALL, "--architecture", arch_file, "--format", "json",
            "--gpu-memory", "20", "--devices", "2", "--search"]
    assert main(base) == 0
    found = json.loads(capsys.readouterr().out)
    fitting = found["fitting"]
    assert fitting and found["best"] is not None
    for candidate in fitting:
        assert (candidate["quantization"], candidate["optimizer"], candidate["offload"], candidate["compile"]) == \
            ("none", "adamw", "none", False)


@pytest.mark.parametrize("argv, words", [
    (["--config", "configs/nope.yaml"], "nope.yaml"),
    (["--config", "configs/quickstart.yaml", "--gpu", "toaster"], "unknown GPU"),
    (["--config", "configs/quickstart.yaml", "--devices", "0"], "--devices 0"),
    (["--config", "configs/quickstart.yaml", "--num-nodes", "0"], "at least one device on one node"),
    ([], "--config"),
])
def test_user_errors_are_one_short_line(argv, words, repo, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    assert main(["plan", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert words in err and "Traceback" not in err and len(err.splitlines()) <= 2  # the message, the --debug hint


def test_block_offload_is_accounted_for():
    """performance.offload=block: the recomputed blocks' frozen weights leave the device (but the groups in flight)
    and live in host memory instead."""
    arch = {**ARCH, "num_single_layers": 8}
    init = {"pretrained_model": "tiny:flux", "torch_dtype": "bfloat16", "max_sequence_length": 16}
    plans = {}
    for offload in ("none", "block"):
        request = build_request(FluxGlance, {**init, "performance": {"gradient_checkpointing": True,
                                                                      "offload": offload}},
                                {"resolution": 256}, {"precision": "bf16-mixed"}, "4090", architecture=arch)
        from glance_lightning.planner.plan import make_plan

        plans[offload] = make_plan(request)
    moved = plans["none"].memory.peak - plans["block"].memory.peak
    assert moved > 0 and any("offload" in n for n in plans["block"].notes)
    assert plans["block"].host_gib["training"] > plans["none"].host_gib["training"]


@pytest.mark.parametrize("family, billions", [("flux", 11.9), ("qwen-image", 20.4), ("sd3", 8.1)])
def test_registry_architectures_are_the_full_size_models(family, billions):
    """The registry's full-size transformer configs have the published parameter counts (built on meta)."""
    from glance_lightning.planner.memory import build_transformer
    from glance_lightning.registry import get_family

    with torch.device("meta"):
        model = build_transformer(dict(get_family(family).architecture), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.02)


def test_edit_family_step_runs_on_fake_tensors():
    """Qwen-Image-Edit reads its control grid on the host: the planner passes the real one through the step."""
    from glance_lightning.families.qwen_image_edit import QwenImageEditGlance

    arch = {"_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 64, "out_channels": 16,
            "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "joint_attention_dim": 32,
            "axes_dims_rope": [4, 6, 6]}
    module = QwenImageEditGlance(pretrained_model="tiny:qwen-image-edit", torch_dtype="bfloat16",
                                 performance={"gradient_checkpointing": True})
    edit = simulate_step(module, StepPlan(architecture=arch, height=256, width=256, text_tokens=16))
    assert edit.peak > edit.base > 0 and edit.activations > 0
