"""SIGKILL during a save: a real `fit` killed half-way through writing a LoRA, a checkpoint, an encode-cache entry
or a sample image leaves every file in its old state or its new one (the half-written bytes only in a temporary
file), and the next run removes the temporary files and continues from what is there."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

from glance_lightning.lora_io import LORA_WEIGHT_NAME, read_glance_metadata

import reaping

STEPS = 2  # per phase; a checkpoint (and last.ckpt) every step, a sample every 2 steps
# save point -> which of its writes is stopped half-way: a later one, so that an earlier state exists where there
# is one (the 5th LoRA write is the Slow LoRA of step 2; the 4th checkpoint write replaces last.ckpt of step 1)
POINTS = {"lora": 5, "checkpoint": 4, "encode-cache": 2, "sample": 1}


def write_config(repo: Path, tmp_path: Path) -> Path:
    config = yaml.safe_load((repo / "configs/quickstart.yaml").read_text())
    config["trainer"].update(default_root_dir=str(tmp_path / "runs"), enable_progress_bar=False, callbacks=[
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
         "init_args": {"every_n_train_steps": 1, "save_last": True}},
        {"class_path": "glance_lightning.callbacks.samples.ChainedSampleCallback",
         "init_args": {"every_n_steps": 2, "seeds": [0]}},
    ])
    config["model"]["init_args"].update(slow_steps=STEPS, fast_steps=STEPS, encode_cache=str(tmp_path / "cache"))
    config["data"]["init_args"]["path"] = str(repo / "glance_lightning/assets/samples/t2i")
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def readable(path: Path) -> bool:
    """Whether a result file opens as what it claims to be."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return all(f.get_tensor(k) is not None for k in f.keys())  # noqa: SIM118
        if path.suffix == ".ckpt":
            return "state_dict" in torch.load(path, map_location="cpu", weights_only=True)
        if path.suffix == ".png":
            Image.open(path).verify()
        return True
    except Exception:  # noqa: BLE001 (any failure to read means: not a whole file)
        return False


def results(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*")
            if p.is_file() and p.suffix in (".safetensors", ".ckpt", ".png")]


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*.tmp")]


@pytest.mark.parametrize("point", list(POINTS))
def test_a_fit_killed_during_a_save_leaves_old_or_new_state_and_the_next_run_continues(point, repo, tmp_path):
    config, marker = write_config(repo, tmp_path), tmp_path / "stopped.json"
    runs, cache = tmp_path / "runs", tmp_path / "cache"
    command = [sys.executable, str(repo / "tests/kill_during_save.py"), point, str(POINTS[point]), str(marker), "--",
               "fit", "--config", str(config)]
    stopped, output = reaping.kill_when(command, marker, timeout=240, cwd=repo)
    assert stopped, f"the fit never reached save point {point}:\n{output[-3000:]}"

    # Killed half-way: the target holds what it held before, the half-written bytes are only in a temporary file
    stop = json.loads(marker.read_text())
    target = Path(stop["target"])
    now = hashlib.sha256(target.read_bytes()).hexdigest() if target.is_file() else "absent"
    assert now == stop["before"], f"{target} was changed by a save that never finished"
    assert point not in ("lora", "checkpoint") or stop["before"] != "absent"  # an earlier state was there to keep
    assert [p for p in temporaries(runs, cache) if p.name.startswith(f".{target.name}.")], "no half-written save"
    assert all(readable(p) for p in results(runs, cache))
    lora_files = [p for p in results(runs) if p.name == LORA_WEIGHT_NAME]
    assert len({read_glance_metadata(p)["run_id"] for p in lora_files}) <= 1  # never two runs' LoRAs in a folder

    # The next run: resumes from the last checkpoint where one was written, else starts again (reusing the cache)
    last = runs / "version_0" / "checkpoints" / "last.ckpt"
    resume = ["--ckpt_path", "last"] if last.is_file() else []
    run_id = torch.load(last, weights_only=True)["glance_run_id"] if last.is_file() else None
    done = reaping.run_reaped([sys.executable, "-m", "glance_lightning", "fit", "--config", str(config), *resume],
                              timeout=240, cwd=repo)
    assert done.returncode == 0, done.stdout[-3000:]
    assert temporaries(runs, cache) == [], "the next run left a killed save's temporary file"
    assert all(readable(p) for p in results(runs, cache))
    run = runs / "version_0" if resume else runs / "version_1"
    for phase in ("slow", "fast"):
        meta = read_glance_metadata(run / phase)
        assert meta["trained_steps"] == STEPS
        assert run_id is None or meta["run_id"] == run_id  # the resumed run continued the killed one
    assert sorted(p.name for p in runs.iterdir()) == (["version_0"] if resume else ["version_0", "version_1"])
