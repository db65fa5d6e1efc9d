"""Derived Slow/Fast lists come from the loaded model's own scheduler (and the sample grid its pipeline declares),
not from the family's built-in copy; the schedule used is recorded in the LoRA metadata and ``sample`` says when the
loaded model would derive other lists."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from glance_lightning.cli import main
from glance_lightning.commands.sample import run_sample_command
from glance_lightning.commands.schedule import run_schedule_command
from glance_lightning.families.flux import FluxGlance
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.model_schedule import (
    ModelSchedule,
    builtin_schedule,
    read_model_schedule,
    schedule_notice,
)
from glance_lightning.schedules import ScheduleError, derive_timesteps
from glance_lightning.tiny import tiny_model_path

REPO = Path(__file__).resolve().parents[1]
SHIFTED = {"base_shift": 0.9, "max_shift": 1.6}  # a fine-tune with another dynamic shift
GRID = [1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]  # a pipeline's declared sample_sigmas


def _model_copy(root: Path, scheduler: dict | None = None, index: dict | None = None) -> Path:
    """The tiny FLUX model, copied, with scheduler config / model_index.json entries changed."""
    folder = root / "model"
    shutil.copytree(tiny_model_path("tiny:flux"), folder)
    for file, changes in ((folder / "scheduler" / "scheduler_config.json", scheduler),
                          (folder / "model_index.json", index)):
        if changes:
            file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))
    return folder


def _config(root: Path, model: Path, derive: dict | None = None) -> Path:
    """The quick start on ``model`` with derived lists (1 + 1 steps, no samples)."""
    config = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    init = config["model"]["init_args"]
    init.update(pretrained_model=str(model), slow_steps=1, fast_steps=1, timesteps={"derive": derive or {}})
    config["trainer"]["callbacks"] = []
    config["data"]["init_args"].update(batch_size=1)
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path, root: Path) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        code = main(["fit", "--config", str(config), "--trainer.default_root_dir", str(root / "runs")])
    assert code == 0
    (run,) = sorted((root / "runs").glob("version_*"))
    return run


def _schedule(capsys, *argv: str) -> dict[str, list[float]]:
    capsys.readouterr()
    assert run_schedule_command(list(argv)) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def shifted_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """A fit on a model whose scheduler has another shift: (model folder, run folder, console output)."""
    root = tmp_path_factory.mktemp("shifted")
    model = _model_copy(root, scheduler=SHIFTED)
    with pytest.MonkeyPatch.context() as mp:
        import io
        import sys

        err = io.StringIO()
        mp.setattr(sys, "stderr", err)
        run = _fit(_config(root, model), root)
    return model, run, err.getvalue()


def test_a_model_with_another_shift_trains_on_lists_derived_from_its_own_scheduler(shifted_run, capsys):
    model, run, console = shifted_run
    expected = _schedule(capsys, "--family", "flux", "--scheduler-config", str(model), "--resolution", "64")
    builtin = derive_timesteps("flux", resolution=64)
    for phase in ("slow", "fast"):
        meta = read_glance_metadata(run / phase)
        assert meta["timesteps"] == pytest.approx(expected[phase], abs=1e-4)
        assert meta["timesteps"] != pytest.approx(builtin[phase], abs=1e-2)  # the built-in copy gives others
        record = meta["scheduler"]
        assert record["source"] == "model" and record["config"]["max_shift"] == SHIFTED["max_shift"]
        assert record["derivation"]["resolution"] == 64 and record["derivation"]["slow_indices"] == [0, 2, 4, 6, 8]
    assert "differs from the built-in flux one" in console and "max_shift 1.6 vs 1.15" in console


def test_sample_says_when_the_loaded_model_would_derive_other_lists(shifted_run, tmp_path: Path, capsys):
    model, run, _ = shifted_run
    argv = ["--slow", str(run / "slow"), "--fast", str(run / "fast"), "--prompt", "a ball", "--height", "64",
            "--width", "64"]
    capsys.readouterr()
    assert run_sample_command([*argv, "--model", "tiny:flux", "--output", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "the loaded model's scheduler" in err and "would derive slow" in err and "max_shift 1.15 vs 1.6" in err
    assert run_sample_command([*argv, "--model", str(model), "--output", str(tmp_path / "b")]) == 0
    assert "would derive" not in capsys.readouterr().err  # the model they were trained on: nothing to say


def test_a_model_declaring_sample_sigmas_trains_on_lists_taken_from_them(tmp_path: Path, capsys):
    model = _model_copy(tmp_path, index={"sample_sigmas": GRID})
    derive = {"slow_indices": [0, 1, 2], "fast_indices": [4, 8, 11]}
    run = _fit(_config(tmp_path, model, derive), tmp_path)
    # What a pipeline with sample_sigmas runs (QwenImage21Pipeline): set_timesteps(sigmas=the grid, mu=...).
    config = json.loads((model / "scheduler" / "scheduler_config.json").read_text())
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = calculate_shift(16, config["base_image_seq_len"], config["max_image_seq_len"], config["base_shift"],
                         config["max_shift"])  # 64x64 pixels: 4x4 = 16 image tokens
    scheduler.set_timesteps(sigmas=GRID, mu=mu)
    table = scheduler.timesteps.tolist()
    for phase, indices in (("slow", derive["slow_indices"]), ("fast", derive["fast_indices"])):
        meta = read_glance_metadata(run / phase)
        assert meta["timesteps"] == pytest.approx([table[i] for i in indices], abs=1e-3)
        assert meta["scheduler"]["sample_sigmas"] == GRID
    printed = _schedule(capsys, "--family", "flux", "--scheduler-config", str(model), "--resolution", "64",
                        "--slow-indices", "0,1,2", "--fast-indices", "4,8,11")
    assert printed["slow"] == pytest.approx(read_glance_metadata(run / "slow")["timesteps"], abs=1e-4)


def test_the_default_indices_on_a_short_declared_grid_are_one_line_before_loading(tmp_path: Path, capsys,
                                                                                no_model_load):
    model = _model_copy(tmp_path, index={"sample_sigmas": GRID})
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        code = main(["fit", "--config", str(_config(tmp_path, model)), "--trainer.default_root_dir",
                     str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert "model.timesteps.derive" in err and "12-step sample_sigmas grid" in err and "0..11" in err
    assert not list((tmp_path / "runs").rglob("*.safetensors"))


def test_the_module_keeps_the_built_in_schedule_until_the_model_is_read(tmp_path: Path):
    model = _model_copy(tmp_path, scheduler=SHIFTED)
    module = FluxGlance(pretrained_model=str(model), resolution=64)
    assert module.model_schedule.source == "built-in"
    builtin = module.glance_timesteps
    module.resolve_model()
    assert module.model_schedule.source == "model" and module.model_schedule.config["base_shift"] == 0.9
    assert module.glance_timesteps.slow != builtin.slow
    assert len(module.glance_timesteps.slow) == len(builtin.slow)  # the draws' shape is unchanged
    given = FluxGlance(pretrained_model=str(model), timesteps={"slow": [1000.0, 950.0], "fast": [500.0, 100.0]})
    given.resolve_model()
    assert given.glance_timesteps.as_timesteps()["slow"] == pytest.approx([1000.0, 950.0])  # given lists stay


def test_read_model_schedule_and_differences(tmp_path: Path):
    assert read_model_schedule(tmp_path, "flux") == builtin_schedule("flux")  # no scheduler config: built-in
    same = read_model_schedule(tiny_model_path("tiny:flux"), "flux")
    assert same.source == "model" and same.differences(builtin_schedule("flux")) == []  # _diffusers_version ignored
    model = _model_copy(tmp_path, scheduler={"shift": 2.0}, index={"sample_sigmas": GRID})
    changed = read_model_schedule(model, "flux").differences(builtin_schedule("flux"))
    assert changed == ["sample_sigmas [12 values: 1 .. 0.05] vs unset", "shift 2.0 vs 3.0"]
    (model / "model_index.json").write_text(json.dumps({"sample_sigmas": [0.5, 0.9]}))
    with pytest.raises(ScheduleError, match="model_index.json.*strictly descending"):
        read_model_schedule(model, "flux")


def test_schedule_notice_rules():
    builtin = builtin_schedule("flux")
    lists = derive_timesteps("flux")
    derivation = {"resolution": 1024, "num_steps": None, "slow_indices": [0, 2, 4, 6, 8],
                  "fast_indices": [10, 20, 30, 40, 49]}
    record = {**builtin.as_metadata(), "derivation": derivation}
    assert schedule_notice("flux", builtin, lists, record) is None
    assert schedule_notice("flux", builtin, lists, None) is None  # no record, the family's own scheduler
    shifted = ModelSchedule({**builtin.config, **SHIFTED}, None, "model")
    line = schedule_notice("flux", shifted, lists, record)
    assert line and "base_shift 0.9 vs 0.5" in line and "would derive slow" in line
    assert "would derive" in schedule_notice("flux", shifted, lists, None)  # given lists, a model unlike its family
    with_grid = ModelSchedule(builtin.config, tuple(GRID), "model")
    assert "cannot derive" in schedule_notice("flux", with_grid, lists, record)


def test_a_declared_grid_fixes_the_number_of_steps():
    table = derive_timesteps("flux", sample_sigmas=GRID, slow_indices=[0, 1], fast_indices=[2, 11])
    assert table == derive_timesteps("flux", sample_sigmas=GRID, num_steps=12, slow_indices=[0, 1],
                                     fast_indices=[2, 11])
    with pytest.raises(ScheduleError, match="fixed 12-step sample_sigmas grid"):
        derive_timesteps("flux", sample_sigmas=GRID, num_steps=50)
    assert np.isclose(table["slow"][0], 1000.0)


class _Planned(Exception):
    pass


def test_generation_steps_the_loaded_models_scheduler(tmp_path: Path, monkeypatch):
    """The official-mode plan and the base model's comparison sample use the loaded model's scheduler config (and
    its declared grid instead of a step count), not the built-in copy."""
    import glance_lightning.families.generation as generation
    import glance_lightning.schedules as schedules

    model = _model_copy(tmp_path, scheduler=SHIFTED, index={"sample_sigmas": GRID})
    module = FluxGlance(pretrained_model=str(model), timesteps={"slow": [1000.0, 950.0], "fast": [500.0, 100.0]})
    module.resolve_model()
    seen = {}

    def plan_spy(mode, timesteps, family, resolution, scheduler_config=None):
        seen["plan"] = scheduler_config
        raise _Planned

    def table_spy(family, **kwargs):
        seen["table"] = kwargs
        raise _Planned

    monkeypatch.setattr(generation, "build_plan", plan_spy)
    monkeypatch.setattr(schedules, "full_schedule_sigmas", table_spy)
    with pytest.raises(_Planned):
        module.generate_latents("x", 0, 64, 64)
    with pytest.raises(_Planned):
        module.generate_base_latents("x", 0, 64, 64, num_steps=50)
    assert seen["plan"]["max_shift"] == SHIFTED["max_shift"]
    table = seen["table"]
    assert table["scheduler_config"]["base_shift"] == SHIFTED["base_shift"]
    assert table["sample_sigmas"] == tuple(GRID) and table["num_steps"] is None
