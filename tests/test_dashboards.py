"""What a Glance run shows in its loggers, read back with the loggers' own readers: TensorBoard's event
accumulator, the W&B offline run file (wandb's protobuf records), the CSV logger's metrics.csv.

A 3 + 3 step quick start logging every step: Slow is steps 1-3, Fast steps 4-6; samples at steps 3 and 6."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from glance_lightning.cli import main

import wandb_records

SLOW_STEPS, FAST_STEPS = {1, 2, 3}, {4, 5, 6}
PROMPT = "a red ball on green grass under a blue sky with a yellow sun"  # the bundled sample's caption


def _fit(repo: Path, root: Path, *logger: str) -> Path:
    assert main(["fit", "--config", str(repo / "configs/quickstart.yaml"), *logger,
                 "--trainer.default_root_dir", str(root),
                 "--data.init_args.path", str(repo / "glance_lightning/assets/samples/t2i"),
                 "--model.init_args.slow_steps", "3", "--model.init_args.fast_steps", "3",
                 "--trainer.callbacks.init_args.every_n_steps", "3", "--trainer.log_every_n_steps", "1",
                 "--trainer.enable_progress_bar", "false"]) == 0
    return root / "version_0"


@pytest.fixture(scope="module")
def tensorboard_run(repo: Path, tmp_path_factory: pytest.TempPathFactory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _fit(repo, tmp_path_factory.mktemp("tb"))
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def wandb_run(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WANDB_MODE", "offline")
        mp.delenv("WANDB_DIR", raising=False)
        run = _fit(repo, tmp_path_factory.mktemp("wandb"), "--config", str(repo / "configs/logging/wandb.yaml"))
        import wandb

        wandb.finish()  # flushes the run file (a process does it at exit)
    (offline,) = (run / "wandb").glob("offline-run-*")
    return offline


def _steps(events, tag: str) -> set[int]:
    return {e.step for e in events.Scalars(tag)}


def test_tensorboard_shows_each_phase_only_while_it_runs(tensorboard_run):
    tags = tensorboard_run.Tags()["scalars"]
    assert _steps(tensorboard_run, "train/loss_slow") == SLOW_STEPS
    assert _steps(tensorboard_run, "train/loss_fast") == FAST_STEPS
    for tag in tags:  # per-timestep losses, grad norms, learning rates: never outside their phase
        if "slow" in tag and not tag.endswith("_mean"):
            assert _steps(tensorboard_run, tag) <= SLOW_STEPS, tag
        if "fast" in tag and not tag.endswith("_mean"):
            assert _steps(tensorboard_run, tag) <= FAST_STEPS, tag
    assert {"train/loss_slow/t1000.00", "train/lr_slow", "train/lr_fast", "train/grad_norm_fast"} <= set(tags)
    assert _steps(tensorboard_run, "perf/s_per_step") == SLOW_STEPS | FAST_STEPS
    assert [e.step for e in tensorboard_run.Scalars("train/loss_slow_mean")] == [3]  # once, at the phase's end
    assert "hp_metric" not in tags


def test_tensorboard_names_each_phase_and_its_list_once(tensorboard_run):
    texts = [(e.step, e.tensor_proto.string_val[0].decode())
             for e in tensorboard_run.Tensors("glance/phase/text_summary")]
    assert [step for step, _ in texts] == [0, 3]
    assert texts[0][1].startswith("slow phase: steps 1-3, timesteps [1000.0, 986.9786")
    assert texts[1][1].startswith("fast phase: steps 4-6, timesteps [926.6473")


def test_tensorboard_shows_the_sample_grid_with_the_prompt(tensorboard_run):
    images = tensorboard_run.Images("samples/grid")
    assert [e.step for e in images] == [3, 6]
    assert (images[0].width, images[0].height) == (3 * 64, 64)  # training image | chained | base model
    captions = [e.tensor_proto.string_val[0].decode() for e in tensorboard_run.Tensors("samples/grid/text_summary")]
    assert len(captions) == 2 and all(PROMPT in c and "chained Slow->Fast" in c for c in captions)


def test_wandb_run_file_holds_per_phase_metrics(wandb_run):
    (run_file,) = wandb_run.glob("run-*.wandb")
    rows = wandb_records.history(run_file)
    slow = {r["trainer/global_step"] for r in rows if "train/loss_slow" in r}
    fast = {r["trainer/global_step"] for r in rows if "train/loss_fast" in r}
    assert slow == SLOW_STEPS and fast == FAST_STEPS
    assert all("train/lr_slow" not in r for r in rows if r.get("trainer/global_step") in FAST_STEPS)
    assert {r["trainer/global_step"] for r in rows if "perf/s_per_step" in r} == SLOW_STEPS | FAST_STEPS
    assert any("samples/psnr" in r for r in rows)
    (config,) = wandb_records.of_type(run_file, "config")[:1]
    assert any(item.key == "config" and "pretrained_model" in item.value_json for item in config.update)


def test_wandb_run_shows_phases_grid_and_publishes_the_loras(wandb_run):
    (run_file,) = wandb_run.glob("run-*.wandb")
    rows = wandb_records.history(run_file)
    grids = [r for r in rows if r.get("samples/grid/_type") == "images/separated"]
    assert [r["trainer/global_step"] for r in grids] == [3, 6]
    for row in grids:
        assert PROMPT in row["samples/grid/captions"][0]
        assert (wandb_run / "files" / row["samples/grid/filenames"][0]).is_file()
    tables = sorted((wandb_run / "files" / "media" / "table" / "glance").glob("phase_*.table.json"),
                    key=lambda p: int(p.name.split("_")[1]))
    data = [json.loads(p.read_text())["data"][0] for p in tables]
    assert [(d[0], d[1], d[2]) for d in data] == [(0, "slow", 3), (3, "fast", 3)]
    assert data[0][3].startswith("[1000.0, 986.9786")
    models = [a for a in wandb_records.of_type(run_file, "artifact") if a.type == "model"]
    assert [a.name for a in models] == ["glance-loras-flux"]
    assert sorted(c.path for c in models[0].manifest.contents) == [
        "README.md", "fast/pytorch_lora_weights.safetensors", "slow/pytorch_lora_weights.safetensors"]


def test_csv_metrics_have_no_constant_lines(repo, tmp_path):
    run = _fit(repo, tmp_path, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
               "--trainer.logger.save_dir", str(tmp_path))
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert {int(r["step"]) for r in rows if r["train/loss_slow"]} == SLOW_STEPS
    assert {int(r["step"]) for r in rows if r["train/loss_fast"]} == FAST_STEPS
    assert {int(r["step"]) for r in rows if r["train/slow_step"]} == SLOW_STEPS


@pytest.mark.parametrize("config", ["configs/logging/wandb.yaml"])
def test_logging_fragment_composes_with_every_training_config(repo: Path, monkeypatch, capsys, config):
    monkeypatch.chdir(repo)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/flux-dev.yaml", "--config", config, "--print_config"])
    assert "WandbLogger" in capsys.readouterr().out
