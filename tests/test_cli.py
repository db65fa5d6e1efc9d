"""The command line: top-level help, LightningCLI help, and bad data found before any model is loaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from glance_lightning.cli import main


def test_top_level_help_lists_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("fit", "validate-data", "schedule"):
        assert command in out


def test_fit_help_is_lightning_cli(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    assert "--print_config" in capsys.readouterr().out


def test_fit_on_a_broken_dataset_names_every_file_before_loading_a_model(repo: Path, tmp_path: Path, monkeypatch,
                                                                          capsys):
    data = tmp_path / "data"
    shutil.copytree(repo / "glance_lightning/assets/samples/t2i", data)
    (data / "orphan.txt").write_text("a caption without an image")
    (data / "broken.png").write_text("not an image")
    (data / "broken.txt").write_text("caption")
    monkeypatch.chdir(repo)
    loaded = []
    from glance_lightning.families import base

    monkeypatch.setattr(base.GlanceModule, "load_base_model", lambda self: loaded.append(True))
    code = main(["fit", "--config", "configs/quickstart.yaml", "--data.init_args.path", str(data),
                 "--trainer.default_root_dir", str(tmp_path / "run")])
    message = capsys.readouterr().err
    assert code == 2 and "Traceback" not in message
    assert "orphan.txt" in message and "broken.png" in message
    assert not loaded


def test_validate_data_command_on_the_bundled_samples(repo: Path, capsys):
    assert main(["validate-data", "--path", str(repo / "glance_lightning/assets/samples/t2i")]) == 0
    assert main(["validate-data", "--path", str(repo / "glance_lightning/assets/samples/edit")]) == 0
    assert main(["validate-data", "--path", str(repo / "nonexistent")]) == 1
