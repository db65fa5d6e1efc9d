"""`fit` through the CLI and the training loop's refusals, on tiny FLUX: resuming the newest run in place, a run
directory that is never overwritten, trainer.max_steps disagreeing with the phases. What every family's quick
start must do (LoRAs, metadata, samples, checkpoints, stock diffusers, learning) is the family contract's
(test_family_contract.py)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from glance_lightning.datamodules.glance import GlanceDataModule

from glance_lightning.cli import main
from glance_lightning.families.flux import FluxGlance
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.settings import TimestepSettings

SLOW = [1000.0, 986.9786, 973.2042, 958.6094, 943.1188]
FAST = [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]


def test_fit_ckpt_path_last_continues_the_newest_run_in_place(repo: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(repo)
    common = ["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.slow_steps", "2", "--trainer.callbacks.init_args.every_n_steps", "0"]
    assert main([*common, "--model.init_args.fast_steps", "2"]) == 0
    assert main([*common, "--model.init_args.fast_steps", "4", "--ckpt_path", "last"]) == 0
    run = tmp_path / "version_0"
    assert read_glance_metadata(run / "fast")["trained_steps"] == 4
    assert not (tmp_path / "version_1").exists()
    from glance_lightning.run_folder import find_last_checkpoint

    state = torch.load(find_last_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    assert state["global_step"] == 6  # a further `--ckpt_path last` continues from here


def test_existing_run_directory_is_not_overwritten(repo: Path, quickstart_run, monkeypatch, capsys):
    run = quickstart_run("configs/quickstart.yaml")  # the family contract's FLUX quick start, shared
    monkeypatch.chdir(repo)
    before = (run / "slow" / "pytorch_lora_weights.safetensors").read_bytes()
    code = main(["fit", "--config", "configs/quickstart.yaml", "--model.init_args.output_dir", str(run),
                 "--trainer.default_root_dir", str(run.parent.parent / "other")])
    assert code == 2 and "model.output_dir" in capsys.readouterr().err
    assert (run / "slow" / "pytorch_lora_weights.safetensors").read_bytes() == before


def test_max_steps_disagreeing_with_the_phases_is_refused(repo: Path, tmp_path: Path):
    module = FluxGlance(pretrained_model="tiny:flux", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                        slow_steps=3, fast_steps=3, max_sequence_length=32, output_dir=str(tmp_path / "o"))
    data = GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=64)
    trainer = L.Trainer(accelerator="cpu", logger=False, max_steps=10, enable_progress_bar=False)
    with pytest.raises(ValueError, match="trainer.max_steps=10"):
        trainer.fit(module, data)
