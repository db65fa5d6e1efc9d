"""Every file in configs/ parses through the real CLI and its model/data sections instantiate (no rot)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning import LightningDataModule

from glance_lightning.cli import main
from glance_lightning.families.base import GlanceModule

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert any(p.name == "quickstart.yaml" for p in CONFIGS) and any(p.name == "flux-dev.yaml" for p in CONFIGS)


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_parses_with_print_config(config: Path, repo: Path, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["class_path"].startswith("glance_lightning.families.")


@pytest.mark.parametrize("config", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_model_and_data_instantiate(config: Path):
    raw = yaml.safe_load(config.read_text())
    parser = ArgumentParser()
    parser.add_subclass_arguments(GlanceModule, "model")
    parser.add_subclass_arguments(LightningDataModule, "data")
    cfg = parser.parse_object({"model": raw["model"], "data": raw["data"]})
    objects = parser.instantiate_classes(cfg)
    module = objects.model
    assert isinstance(module, GlanceModule) and module.total_steps > 0
    assert len(module.glance_timesteps.slow) > 0 and len(module.glance_timesteps.fast) > 0


def test_unknown_config_key_is_an_error(repo: Path, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/quickstart.yaml", "--model.init_args.lora.rnak", "4", "--print_config"])
    assert exit_info.value.code != 0
    assert "rnak" in capsys.readouterr().err
