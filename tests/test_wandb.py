"""An offline W&B run holds the config, per-phase/per-timestep metrics, sample images, fidelity and the LoRAs."""

from __future__ import annotations

from pathlib import Path

import pytest

from glance_lightning.cli import main


def test_offline_wandb_run_records_everything(repo: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(repo)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert main([
        "fit", "--config", "configs/quickstart.yaml", "--config", "configs/logging/wandb.yaml",
        "--trainer.logger.init_args.save_dir", str(tmp_path), "--trainer.default_root_dir", str(tmp_path / "runs"),
        "--model.init_args.slow_steps", "4", "--model.init_args.fast_steps", "4",
        "--trainer.callbacks.init_args.every_n_steps", "4", "--trainer.log_every_n_steps", "1",
    ]) == 0
    import wandb

    wandb.finish()  # a real process flushes at exit; here the run is still open
    (run,) = (tmp_path / "wandb").glob("offline-run-*")
    record = next(run.glob("run-*.wandb")).read_bytes()
    for key in (b"train/loss_slow", b"train/loss_fast", b"train/loss_slow/t1000.00", b"train/grad_norm_fast",
                b"train/lr", b"perf/s_per_step", b"perf/samples_per_s", b"samples/psnr", b"samples/ssim",
                b"train/loss_fast_mean", b"glance-loras-flux", b'"pretrained_model"'):
        assert key in record, key
    images = [p.name for p in (run / "files" / "media" / "images").rglob("*.png")]
    for key in ("chained", "training_image", "base_model"):
        assert any(name.startswith(key) for name in images), (key, images)
    assert b"seed 0" in record and b"slow [1000.0" in record  # caption: prompt, seed and schedule


@pytest.mark.parametrize("config", ["configs/logging/wandb.yaml"])
def test_logging_fragment_composes_with_every_training_config(repo: Path, monkeypatch, capsys, config):
    monkeypatch.chdir(repo)
    with pytest.raises(SystemExit):
        main(["fit", "--config", "configs/flux-dev.yaml", "--config", config, "--print_config"])
    assert "WandbLogger" in capsys.readouterr().out
