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
OVERLAYS = sorted((Path(__file__).resolve().parents[1] / "configs" / "performance").glob("*.yaml"))


def test_there_are_configs():
    """The parametrised tests below would pass, as empty, if the globs found nothing."""
    assert any(p.name == "quickstart.yaml" for p in CONFIGS) and any(p.name == "flux-dev.yaml" for p in CONFIGS)
    assert any(p.name == "low-memory.yaml" for p in OVERLAYS)


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
    code = main(["fit", "--config", "configs/quickstart.yaml", "--model.init_args.lora.rnak", "4", "--print_config"])
    assert code == 2
    assert "model.init_args.lora.rnak: no such setting" in capsys.readouterr().err


@pytest.mark.parametrize("overlay", OVERLAYS, ids=[p.name for p in OVERLAYS])
@pytest.mark.parametrize("config", ["flux-dev.yaml", "qwen-image.yaml", "sd35-large.yaml"])
def test_performance_overlays_change_only_their_keys(config: str, overlay: Path, repo: Path, monkeypatch, capsys):
    monkeypatch.chdir(repo)
    printed = {}
    for configs in (["configs/" + config], ["configs/" + config, str(overlay)]):
        with pytest.raises(SystemExit):
            main(["fit", *[arg for c in configs for arg in ("--config", c)], "--print_config"])
        printed[len(configs)] = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    base, layered = printed[1], printed[2]
    wanted = yaml.safe_load(overlay.read_text())["model"]["init_args"]
    for group, values in wanted.items():
        assert {k: layered[group][k] for k in values} == values
        assert {k: v for k, v in layered[group].items() if k not in values} == \
            {k: v for k, v in base[group].items() if k not in values}
    assert {k: v for k, v in layered.items() if k not in wanted} == {k: v for k, v in base.items() if k not in wanted}
