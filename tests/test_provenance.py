"""Resume provenance: a checkpoint records what the run was trained on (files by size and SHA-256, captions, data
settings); resuming on other data is one line naming what differs, nothing of the run changed, unless
--allow_other_data true (or ``module.allow_other_data`` in a library); a dataset moved elsewhere is the same."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
from glance_lightning.datamodules.glance import GlanceDataModule
from lightning.pytorch.callbacks import ModelCheckpoint

from glance_lightning.cli import main
from glance_lightning.errors import ConfigError
from glance_lightning.families.flux import FluxGlance
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.provenance import differences, summary
from glance_lightning.settings import LoraSettings, TimestepSettings

SLOW = [1000.0, 986.9786, 973.2042, 958.6094, 943.1188]
FAST = [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]


def fit_args(repo: Path, root: Path, data: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(repo / "configs/quickstart.yaml"), "--trainer.default_root_dir", str(root),
            "--data.init_args.path", str(data), "--model.init_args.slow_steps", "2",
            "--model.init_args.fast_steps", "2", "--trainer.callbacks.init_args.every_n_steps", "0",
            "--trainer.enable_progress_bar", "false", *extra]


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data(repo: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(repo / "glance_lightning/assets/samples/t2i", tmp_path / "data"))


@pytest.mark.parametrize("change", ["caption", "image", "new pair", "setting"])
def test_resuming_on_other_data_is_refused_naming_what_differs(change, repo, tmp_path, data, capsys):
    root = tmp_path / "runs"
    assert main(fit_args(repo, root, data)) == 0
    before = files(root)
    resume = ["--model.init_args.fast_steps", "3", "--ckpt_path", "last"]
    if change == "caption":
        (data / "red_ball.txt").write_text("a blue cube on a table")
        expected = "other caption: red_ball.png"
    elif change == "image":
        with (data / "red_ball.png").open("ab") as f:
            f.write(b"\0" * 16)  # other bytes, the same picture
        expected = "other image content: red_ball.png ("
    elif change == "new pair":
        shutil.copy(data / "red_ball.png", data / "second.png")
        (data / "second.txt").write_text("a second ball")
        expected = "new in this run's data: second.png"
    else:
        resume += ["--data.init_args.resize", "longest-side"]
        expected = "settings: data.resize 'area' -> 'longest-side'"
    capsys.readouterr()
    assert main(fit_args(repo, root, data, *resume)) == 2
    message = capsys.readouterr().err.strip().splitlines()[0]
    assert "was trained on other data" in message and expected in message and "--allow_other_data true" in message
    assert files(root) == before  # nothing of the run changed, no new run folder

    assert main(fit_args(repo, root, data, *resume, "--allow_other_data", "true")) == 0
    assert "on other data than it was trained on" in capsys.readouterr().err
    assert read_glance_metadata(root / "version_0" / "fast")["trained_steps"] == 3
    assert sorted(p.name for p in root.iterdir()) == ["version_0"]


def test_the_same_data_moved_elsewhere_resumes(repo, tmp_path, data):
    root = tmp_path / "runs"
    assert main(fit_args(repo, root, data)) == 0
    moved = shutil.move(data, tmp_path / "moved")
    assert main(fit_args(repo, root, Path(moved), "--model.init_args.fast_steps", "3", "--ckpt_path", "last")) == 0
    assert read_glance_metadata(root / "version_0" / "fast")["trained_steps"] == 3


def test_a_library_resume_checks_the_data_too(repo, tmp_path, data):
    def fit(ckpt_path: str | None = None, allow: bool = False) -> FluxGlance:
        module = FluxGlance(pretrained_model="tiny:flux", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                            slow_steps=1, fast_steps=2 if ckpt_path else 1, lora=LoraSettings(rank=4, alpha=4),
                            max_sequence_length=16, output_dir=str(tmp_path / "out"))
        module.allow_other_data = allow
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path, max_epochs=-1,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)])
        trainer.fit(module, GlanceDataModule(path=str(data), resolution=64), ckpt_path=ckpt_path)
        return module

    first = fit()
    (data / "red_ball.txt").write_text("another caption")
    with pytest.raises(ConfigError, match="other caption: red_ball.png"):
        fit(str(tmp_path / "ckpt" / "last.ckpt"))
    resumed = fit(str(tmp_path / "ckpt" / "last.ckpt"), allow=True)
    assert resumed.run_id == first.run_id  # the resumed run is the same run
    assert read_glance_metadata(tmp_path / "out" / "fast")["run_id"] == first.run_id


def test_differences_name_each_kind_and_shorten_long_lists():
    def fingerprint(names: list[str], caption: str = "c", **settings) -> dict:
        samples = {n: {"bytes": 10, "sha256": n, "caption_sha256": caption, "controls": []} for n in names}
        return {"samples": samples, "settings": settings, "folder": "/somewhere"}

    same = fingerprint(["a.png"], **{"data.resolution": 64})
    assert differences(same, {**same, "folder": "/elsewhere"}) == {}
    many = [f"{i}.png" for i in range(7)]
    found = differences(fingerprint(["a.png"]), fingerprint(["a.png", *many], caption="d"))
    assert found == {"new in this run's data": sorted(many), "other caption": ["a.png"]}
    assert summary(found) == ("new in this run's data: 0.png, 1.png, 2.png, 3.png and 3 more; "
                              "other caption: a.png")
