"""``strategy: fsdp2`` on two CPU processes over gloo (glance_lightning.sharding): both LoRAs train and save in the
single-device format, equal to DDP's (the base replicated) within float noise, load in stock diffusers; the encode
cache is filled once by local rank 0; gradient checkpointing works sharded; a sharded resume continues to the
same LoRAs as a run that never stopped. Each run is the real command line in its own process group
(``reaping.run_reaped``), bounded in time, every process reaped.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glance_lightning.lora_io import read_glance_metadata

import reaping

CONFIG = """seed_everything: 0
trainer:
  accelerator: cpu
  devices: 2
  strategy: {strategy}
  precision: 32-true
  gradient_clip_val: 1.0
  default_root_dir: {root}
  enable_progress_bar: false
  logger: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 1, save_last: true, save_top_k: -1}}
    - class_path: glance_lightning.callbacks.samples.ChainedSampleCallback
      init_args: {{every_n_steps: 3, seeds: [0], prompts: [a red square]}}
model:
  class_path: glance_lightning.families.flux.FluxGlance
  init_args:
    pretrained_model: tiny:flux
    timesteps: {{slow: [1000.0, 973.2, 943.1], fast: [926.6, 677.9, 60.5]}}
    slow_steps: 3
    fast_steps: 3
    lora: {{rank: 4, alpha: 4, targets: [to_q, to_k, to_v, to_out.0, proj_mlp, proj_out]}}
    optimizer: {{lr: 0.01, warmup_steps: 1}}
    max_sequence_length: 64
    encode_cache: {cache}
    performance: {{gradient_checkpointing: {checkpointing}}}
data:
  class_path: glance_lightning.datamodules.glance.GlanceDataModule
  init_args: {{path: {repo}/glance_lightning/assets/samples/t2i, resolution: 64, size_multiple: 32, batch_size: 2}}
"""

PHASES = ("slow", "fast")
TIMEOUT = 240  # seconds per two-process fit; a run takes 10-30 s here


PROBE = """    - class_path: sharding_probe.ShardProbe
      init_args: {{folder: {folder}}}
"""


MEMORY = """    - class_path: sharding_probe.StepMemoryProbe
      init_args: {{folder: {folder}}}
"""


POISON = """    - class_path: sharding_probe.PoisonOnRank
      init_args: {step: 4, rank: 1}
"""


def fit(tmp_path: Path, repo: Path, name: str, strategy: str = "fsdp2", checkpointing: bool = False,
        *extra: str, probe: bool = False, callback: str = "", returncode: int = 0) -> tuple[Path, str]:
    """One two-process fit through the command line; its run folder and everything it printed. ``probe``: each
    rank records what it holds of every parameter and AdamW state in ``<name>-probe/``; ``callback``: one more
    (tests/sharding_probe.py)."""
    config = tmp_path / f"{name}.yaml"
    text = CONFIG.format(strategy=strategy, root=tmp_path / name, cache=tmp_path / f"{name}-cache",
                         checkpointing=str(checkpointing).lower(), repo=repo)
    callback += PROBE.format(folder=tmp_path / f"{name}-probe") if probe else ""
    config.write_text(text.replace("model:\n", callback + "model:\n", 1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent)}
    env.pop("GLANCE_LIGHTNING_RUN_DIR", None)
    done = reaping.run_reaped([sys.executable, "-m", "glance_lightning", "fit", "--config", str(config), *extra],
                              timeout=TIMEOUT, cwd=tmp_path, env=env)
    assert done.returncode == returncode, done.stdout[-4000:]
    (run,) = sorted((tmp_path / name).glob("version_*"))
    return run, done.stdout


def loras(run: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {phase: load_file(run / phase / "pytorch_lora_weights.safetensors") for phase in PHASES}


def assert_loras_close(mine: dict, theirs: dict, atol: float) -> None:
    for phase in PHASES:
        assert mine[phase].keys() == theirs[phase].keys()
        for key, value in mine[phase].items():
            torch.testing.assert_close(value, theirs[phase][key], atol=atol, rtol=0, msg=f"{phase}: {key}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> dict[str, tuple[Path, str]]:
    """The same 3 + 3 step fit: sharded, sharded with gradient checkpointing, and DDP (the base replicated)."""
    tmp = tmp_path_factory.mktemp("sharding")
    return {
        "fsdp2": fit(tmp, repo, "fsdp2", probe=True, callback=MEMORY.format(folder=tmp / "fsdp2-memory")),
        "fsdp2-checkpointing": fit(tmp, repo, "ckpt", "fsdp2", True),
        "ddp": fit(tmp, repo, "ddp", "ddp_find_unused_parameters_true"),
    }


def test_both_phases_train_sharded_and_save_single_device_files(runs):
    run, out = runs["fsdp2"]
    assert "transformer sharded over 2 ranks (2 blocks, FSDP2)" in out
    weights = loras(run)
    for phase in PHASES:
        meta = read_glance_metadata(run / phase)
        assert meta["trained_steps"] == 3 and meta["phase"] == phase
        # lora_B starts at zero: every B matrix moved, in both phases
        moved = [v.abs().max().item() for k, v in weights[phase].items() if "lora_B" in k]
        assert moved and min(moved) > 0, phase
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in weights[phase].values())
    assert weights["slow"].keys() == weights["fast"].keys()
    assert not any(torch.equal(weights["slow"][k], weights["fast"][k]) for k in weights["slow"] if "lora_B" in k)
    # one file per phase, one sample per render step, written once (rank 0); no stray temporary files
    assert sorted(p.name for p in (run / "slow").iterdir()) == ["pytorch_lora_weights.safetensors"]
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step000003_p0_s0.png", "step000006_p0_s0.png"]


def test_every_rank_holds_only_its_shard_of_the_base_the_loras_and_their_adamw_state(runs):
    run, _ = runs["fsdp2"]
    ranks = [json.loads((run.parent.parent / "fsdp2-probe" / f"rank{r}.json").read_text()) for r in (0, 1)]
    for part in ("params", "adamw"):
        assert ranks[0][part].keys() == ranks[1][part].keys()
        for name, (local, full, *_) in ranks[0][part].items():
            assert local + ranks[1][part][name][0] == full, (part, name)  # split over the two ranks, not copied
    trainable = {n for n, (_, _, grad) in ranks[0]["params"].items() if grad}
    assert {n for n in trainable if ".slow." in n} and {n for n in trainable if ".fast." in n}
    assert trainable == set(ranks[0]["adamw"])  # both adapters trained and both keep sharded AdamW moments
    frozen = sum(full for n, (_, full, grad) in ranks[0]["params"].items() if not grad)
    held = sum(local for n, (local, _, grad) in ranks[0]["params"].items() if not grad)
    assert held <= frozen // 2 + 1000, (held, frozen)  # the base is halved (odd first dimensions round up)


def test_each_rank_reads_only_its_rows_of_the_base_from_the_files(runs):
    """Built on the meta device and read per shard (glance_lightning.shard_loading): no rank holds the whole base
    in host memory at any time; what the two ranks read adds up to the base once."""
    _, out = runs["fsdp2"]
    assert "built on the meta device" in out
    lines = [line.split("base loaded per shard: ")[1] for line in out.splitlines() if "base loaded per shard" in line]
    assert len(lines) == 2 and all("rank" not in line for line in lines)
    read = [float(line.split()[0]) for line in lines]
    whole = float(lines[0].split("of its ")[1].split()[0])
    assert max(read) <= 0.6 * whole and sum(read) == pytest.approx(whole, abs=0.02)


def test_plan_per_rank_predicts_each_ranks_measured_peak(runs, repo, capsys):
    """``plan --devices 2 --strategy fsdp2`` on the run's own config (FSDP2's sharding simulated over a fake process
    group, planner/ranks.py) against each rank's peak tensor memory over its first two steps, counted in the real
    two-process run (sharding_probe.LiveBytes): within 5%."""
    from glance_lightning.cli import main
    from glance_lightning.tiny import tiny_model_path

    run, _ = runs["fsdp2"]
    tmp = run.parent.parent
    measured = [json.loads((tmp / "fsdp2-memory" / f"memory-rank{r}.json").read_text())["peak"] for r in (0, 1)]
    architecture = Path(tiny_model_path("tiny:flux")) / "transformer" / "config.json"
    assert main(["plan", "--config", str(tmp / "fsdp2.yaml"), "--devices", "2", "--strategy", "fsdp2",
                 "--gpu-memory", "80", "--architecture", str(architecture), "--format", "json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["per_rank"] == "per rank of 2 devices (fsdp2)" and plan["settings"]["strategy"] == "fsdp2"
    for peak in measured:
        assert plan["peak_bytes"] == pytest.approx(peak, rel=0.05), (plan["peak_bytes"], measured)
    assert main(["plan", "--config", str(tmp / "fsdp2.yaml"), "--devices", "1", "--gpu-memory", "80",
                 "--architecture", str(architecture), "--format", "json"]) == 0
    single = json.loads(capsys.readouterr().out)
    assert single["per_rank"] is None and single["peak_bytes"] != plan["peak_bytes"]


def test_sharded_loras_equal_the_replicated_ones(runs):
    """FSDP2 and DDP differ only in the order floats are summed: the same LoRAs within float noise (this also
    justifies hiding FSDP2's warning about view outputs, glance_lightning.console)."""
    assert_loras_close(loras(runs["fsdp2"][0]), loras(runs["ddp"][0]), atol=1e-5)
    assert "returned a view tensor" not in runs["fsdp2"][1]


def test_a_bf16_base_sharded_trains_the_loras_ddp_trains_in_the_single_device_dtype(tmp_path, repo):
    bf16 = ["--model.init_args.torch_dtype", "bfloat16", "--trainer.precision", "bf16-mixed"]
    sharded, _ = fit(tmp_path, repo, "fsdp2-bf16", "fsdp2", True, *bf16)
    replicated, _ = fit(tmp_path, repo, "ddp-bf16", "ddp_find_unused_parameters_true", False, *bf16)
    mine, theirs = loras(sharded), loras(replicated)
    assert {v.dtype for phase in PHASES for v in mine[phase].values()} == {torch.bfloat16}
    assert_loras_close(mine, theirs, atol=1e-2)


def test_gradient_checkpointing_under_sharding_trains_the_same_loras(runs):
    assert_loras_close(loras(runs["fsdp2-checkpointing"][0]), loras(runs["fsdp2"][0]), atol=1e-5)


def test_sharded_loras_load_in_stock_diffusers(runs):
    from diffusers import FluxPipeline

    from glance_lightning.tiny import tiny_model_path

    run, _ = runs["fsdp2"]
    weights = loras(run)
    for phase in PHASES:
        pipe = FluxPipeline.from_pretrained(tiny_model_path("tiny:flux"))
        pipe.load_lora_weights(str(run / phase), adapter_name=phase)
        loaded = {n: p for n, p in pipe.transformer.named_parameters() if f"lora_B.{phase}" in n}
        assert loaded and all(p.abs().max() > 0 for p in loaded.values())
        trained = sorted(v.abs().sum().item() for k, v in weights[phase].items() if "lora_B" in k)
        torch.testing.assert_close(sorted(p.abs().sum().item() for p in loaded.values()), trained)


def test_the_encode_cache_is_filled_once_by_local_rank_zero(runs):
    run, out = runs["fsdp2"]
    cache = run.parent.parent / "fsdp2-cache"
    # rank 1 waited at the barrier, read every encoding and encoded nothing: it never needed its text encoders
    assert "rank 1: read " in out and "(written by local rank 0), encoded 0" in out
    assert "rank 0: read" not in out
    written = [p for p in cache.rglob("*") if p.is_file()]
    assert written and not [p for p in written if p.name.endswith(".tmp") or p.name.startswith(".")]
    read = int(out.split("rank 1: read ")[1].split()[0])
    assert read >= 2  # the caption and the sampling prompt, and the latents


def test_a_sharded_resume_continues_to_the_loras_of_a_run_that_never_stopped(runs, tmp_path, repo):
    """Resumed at step 2, while Fast has not started: AdamW's sharded state of Slow continues exactly, Fast's
    starts fresh as it would have."""
    uninterrupted, _ = runs["fsdp2-checkpointing"]
    step2 = tmp_path / "resumed" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    step2.parent.mkdir(parents=True)  # a copied run folder: the resume writes its LoRAs there, not into the original
    shutil.copy(uninterrupted / "checkpoints" / step2.name, step2)
    resumed, _ = fit(tmp_path, repo, "resumed", "fsdp2", True, "--ckpt_path", str(step2))
    assert resumed == step2.parent.parent
    assert_loras_close(loras(resumed), loras(uninterrupted), atol=0)
    assert read_glance_metadata(resumed / "fast")["trained_steps"] == 3


def test_a_non_finite_loss_on_one_rank_stops_every_rank_and_keeps_the_last_good_loras(tmp_path, repo):
    """Rank 1's loss turns NaN at step 4 (Fast's second step): every rank stops before that step's update, and the
    LoRAs of step 3 are gathered and written, as on one device."""
    run, out = fit(tmp_path, repo, "nan", callback=POISON, returncode=2)
    assert "loss is not finite at step 4" in out and "Traceback" not in out
    assert read_glance_metadata(run / "fast")["trained_steps"] == 1
    assert all(torch.isfinite(v).all() for phase in PHASES for v in loras(run)[phase].values())
