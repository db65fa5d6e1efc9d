"""Tests for glance_lightning.schedules: official test vectors, validation, compat plan, the command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from diffusers import FlowMatchEulerDiscreteScheduler

from glance_lightning.commands.schedule import run_schedule_command
from glance_lightning.registry import get_family
from glance_lightning.sampling import official_qwen_plan
from glance_lightning.schedules import (
    ScheduleError,
    derive_sigmas,
    derive_timesteps,
    full_schedule_sigmas,
    image_seq_len,
    load_scheduler_config,
    parse_resolution,
)

QWEN_SLOW = [1000.0, 979.1915, 957.5157, 934.9171, 911.3354]
QWEN_FAST = [886.7053, 745.0728, 562.9505, 320.0802, 20.0]
FLUX_SLOW = [1000.0, 986.9786, 973.2042, 958.6094, 943.1188]
FLUX_FAST = [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]


def _close(actual: list[float], expected: list[float], atol: float = 1e-3) -> None:
    assert len(actual) == len(expected)
    np.testing.assert_allclose(actual, expected, atol=atol, rtol=0)


def _reference_table(config: dict, num_steps: int, seq_len: int | None, linspace: bool) -> list[float]:
    """An independent reconstruction of the pipelines' timestep preparation (mu written out by hand)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
    mu = None
    if seq_len is not None:
        c = scheduler.config
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        mu = c.base_shift + slope * (seq_len - c.base_image_seq_len)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if linspace else None
    scheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)
    return scheduler.sigmas.tolist()


# ------------------------------------------------------------------------------------ official vectors


@pytest.mark.parametrize(
    ("family", "slow", "fast"),
    [
        ("qwen-image", QWEN_SLOW, QWEN_FAST),
        ("qwen-image-edit", QWEN_SLOW, QWEN_FAST),
        ("flux", FLUX_SLOW, FLUX_FAST),
    ],
)
def test_official_vectors(family: str, slow: list[float], fast: list[float]) -> None:
    lists = derive_timesteps(family)
    assert set(lists) == {"slow", "fast"}
    _close(lists["slow"], slow)
    _close(lists["fast"], fast)


def test_official_vectors_match_to_printed_digits() -> None:
    lists = derive_timesteps("qwen-image")
    assert [round(t, 4) for t in lists["slow"] + lists["fast"]] == QWEN_SLOW + QWEN_FAST
    lists = derive_timesteps("flux")
    assert [round(t, 4) for t in lists["slow"] + lists["fast"]] == FLUX_SLOW + FLUX_FAST


def test_qwen_image_edit_equals_qwen_image_everywhere() -> None:
    for resolution in (1024, (1328, 1328), (832, 1216)):
        assert derive_timesteps("qwen-image-edit", resolution=resolution) == derive_timesteps(
            "qwen-image", resolution=resolution
        )


def test_sigmas_are_timesteps_over_1000() -> None:
    sigmas = derive_sigmas("flux")
    timesteps = derive_timesteps("flux")
    for phase in ("slow", "fast"):
        _close([1000 * s for s in sigmas[phase]], timesteps[phase], atol=1e-4)


def test_full_table_shape_and_endpoints() -> None:
    table = full_schedule_sigmas("qwen-image")
    assert len(table) == 51
    assert table[0] == pytest.approx(1.0)
    assert table[-2] == pytest.approx(0.02, abs=1e-6)  # shift_terminal
    assert table[-1] == 0.0
    assert all(a > b for a, b in zip(table, table[1:], strict=False))


def test_image_seq_len() -> None:
    assert image_seq_len(1024) == 4096
    assert image_seq_len((1024, 768)) == 64 * 48
    assert image_seq_len("1024x768") == 3072


# -------------------------------------------------------------------------------------------------- sd3


def test_sd3_matches_pipeline_style_set_timesteps() -> None:
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(get_family("sd3").scheduler())
    scheduler.set_timesteps(50)  # what StableDiffusion3Pipeline does: no sigmas, no mu
    expected = scheduler.timesteps.tolist()
    lists = derive_timesteps("sd3")
    _close(lists["slow"], [expected[i] for i in (0, 2, 4, 6, 8)], atol=1e-4)
    _close(lists["fast"], [expected[i] for i in (10, 20, 30, 40, 49)], atol=1e-4)
    _close(full_schedule_sigmas("sd3"), scheduler.sigmas.tolist(), atol=1e-7)


def test_sd3_static_shift_ignores_resolution() -> None:
    reference = derive_timesteps("sd3")
    for resolution in (512, (768, 1344), 2048):
        assert derive_timesteps("sd3", resolution=resolution) == reference


def test_sd3_is_not_flux_with_static_shift() -> None:
    # SD3 starts from the scheduler's own training range, not linspace(1, 1/N, N): the last entry differs.
    assert derive_timesteps("sd3")["fast"][-1] == pytest.approx(8.9286, abs=1e-3)


# ------------------------------------------------------------------------------- resolution and indices


@pytest.mark.parametrize("family", ["flux", "qwen-image"])
def test_resolution_changes_dynamic_families(family: str) -> None:
    at_1024 = derive_timesteps(family)
    for resolution in (512, (1328, 1328), (1024, 768)):
        other = derive_timesteps(family, resolution=resolution)
        assert other["fast"] != pytest.approx(at_1024["fast"], abs=1e-2)
        seq_len = image_seq_len(resolution)
        table = _reference_table(get_family(family).scheduler(), 50, seq_len, linspace=True)
        _close(full_schedule_sigmas(family, resolution=resolution), table, atol=1e-6)


def test_resolution_is_width_by_height_and_symmetric_in_tokens() -> None:
    landscape = derive_timesteps("flux", resolution=(1024, 768))
    assert landscape == derive_timesteps("flux", resolution=(768, 1024))
    assert parse_resolution("1024x768") == (1024, 768)
    assert parse_resolution(1024) == (1024, 1024)


def test_lower_resolution_means_less_shift() -> None:
    small = derive_timesteps("flux", resolution=512)
    large = derive_timesteps("flux", resolution=1024)
    assert small["fast"][2] < large["fast"][2]


def test_custom_steps_and_indices() -> None:
    lists = derive_timesteps("flux", num_steps=28, slow_indices=[0, 1, 3], fast_indices=(4, 27))
    table = _reference_table(get_family("flux").scheduler(), 28, 4096, linspace=True)
    _close(lists["slow"], [1000 * table[i] for i in (0, 1, 3)], atol=1e-3)
    _close(lists["fast"], [1000 * table[i] for i in (4, 27)], atol=1e-3)


def test_single_step_schedule() -> None:
    with pytest.raises(ScheduleError, match="fast_indices"):
        derive_timesteps("flux", num_steps=1, slow_indices=[0], fast_indices=[0])
    assert full_schedule_sigmas("flux", num_steps=1) == [1.0, 0.0]


# ---------------------------------------------------------------------------------- explicit configs


def test_explicit_config_equal_to_published_gives_same_lists() -> None:
    for family in ("flux", "sd3", "qwen-image"):
        lists = derive_timesteps(family, scheduler_config=get_family(family).scheduler())
        assert lists == derive_timesteps(family)


def test_explicit_config_decides_the_shift() -> None:
    static = {**get_family("flux").scheduler(), "use_dynamic_shifting": False, "shift": 3.0}
    lists = derive_timesteps("flux", scheduler_config=static)
    table = _reference_table(static, 50, None, linspace=True)
    _close(lists["fast"], [1000 * table[i] for i in (10, 20, 30, 40, 49)])
    assert lists != derive_timesteps("flux")
    assert derive_timesteps("flux", scheduler_config=static, resolution=512) == lists


def test_explicit_config_still_needs_a_family() -> None:
    with pytest.raises(ScheduleError, match="family"):
        derive_timesteps(scheduler_config=get_family("flux").scheduler())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"_class_name": "EulerDiscreteScheduler"}, "_class_name"),
        ({"invert_sigmas": True}, "invert_sigmas"),
        ({"num_train_timesteps": 500}, "num_train_timesteps"),
    ],
)
def test_unsupported_configs(change: dict, match: str) -> None:
    with pytest.raises(ScheduleError, match=match) as info:
        derive_timesteps("qwen-image", scheduler_config={**get_family("qwen-image").scheduler(), **change})
    assert info.value.settings == ("scheduler_config",)


def test_config_must_be_a_dict() -> None:
    with pytest.raises(ScheduleError, match="scheduler_config"):
        derive_timesteps("flux", scheduler_config=[1, 2])  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ validation


@pytest.mark.parametrize(
    ("kwargs", "setting", "match"),
    [
        ({"family": None}, "family", "needed"),
        ({"family": "sdxl"}, "family", "unknown family"),
        ({"num_steps": 0}, "num_steps", "positive int"),
        ({"num_steps": 2.5}, "num_steps", "positive int"),
        ({"slow_indices": []}, "slow_indices", "empty"),
        ({"fast_indices": [10, 50]}, "fast_indices", "outside 0..49"),
        ({"slow_indices": [-1, 2]}, "slow_indices", "outside 0..49"),
        ({"slow_indices": [0, 4, 2]}, "slow_indices", "strictly increasing"),
        ({"fast_indices": [10, 10, 20]}, "fast_indices", "strictly increasing"),
        ({"slow_indices": [0, 1.5]}, "slow_indices", "must be ints"),
        ({"slow_indices": [0, 12]}, "slow_indices", "below every fast index"),
        ({"num_steps": 30}, "fast_indices", "outside 0..29"),
        ({"resolution": 1000}, "resolution", "multiple of 16"),
        ({"resolution": (1024, 1000)}, "resolution", "use e.g. 992"),
        ({"resolution": 0}, "resolution", "multiple of 16"),
        ({"resolution": -1024}, "resolution", "multiple of 16"),
        ({"resolution": (1024,)}, "resolution", "width, height"),
        ({"resolution": "big"}, "resolution", "WIDTHxHEIGHT"),
        ({"resolution": 1024.0}, "resolution", "width, height"),
        ({"resolution": True}, "resolution", "width, height"),
    ],
)
def test_validation_errors(kwargs: dict, setting: str, match: str) -> None:
    kwargs = {"family": "flux", **kwargs}
    family = kwargs.pop("family")
    with pytest.raises(ScheduleError, match=match) as info:
        derive_timesteps(family, **kwargs)
    assert setting in info.value.settings
    assert setting in str(info.value)
    assert isinstance(info.value, ValueError)


def test_overlap_names_both_settings() -> None:
    with pytest.raises(ScheduleError) as info:
        derive_timesteps("flux", slow_indices=[0, 10], fast_indices=[10, 20])
    assert info.value.settings == ("slow_indices", "fast_indices")


# ---------------------------------------------------------------------------------------- config files


def _write_config(path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config), encoding="utf-8")


def test_load_scheduler_config_from_model_directory(tmp_path) -> None:
    _write_config(tmp_path / "model" / "scheduler" / "scheduler_config.json", get_family("flux").scheduler())
    assert load_scheduler_config(tmp_path / "model") == get_family("flux").scheduler()
    assert load_scheduler_config(str(tmp_path / "model")) == get_family("flux").scheduler()


def test_load_scheduler_config_from_scheduler_directory_and_file(tmp_path) -> None:
    file = tmp_path / "scheduler" / "scheduler_config.json"
    _write_config(file, get_family("qwen-image").scheduler())
    assert load_scheduler_config(file) == get_family("qwen-image").scheduler()
    assert load_scheduler_config(tmp_path / "scheduler") == get_family("qwen-image").scheduler()
    config = load_scheduler_config(file)
    assert derive_timesteps("qwen-image", scheduler_config=config) == derive_timesteps("qwen-image")


def test_load_scheduler_config_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_scheduler_config(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="scheduler/scheduler_config.json"):
        load_scheduler_config(tmp_path / "empty")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(ScheduleError, match="not valid json"):
        load_scheduler_config(bad)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ScheduleError, match="json object"):
        load_scheduler_config(listed)


# ------------------------------------------------------------------------------------------ compat plan


def _compat_plan(resolution=1024):
    plan = official_qwen_plan([t / 1000 for t in QWEN_SLOW], [t / 1000 for t in QWEN_FAST], "qwen-image",
                              resolution=resolution)
    slow, fast = plan[:5], plan[5:]
    return [slow[0].sigma, *(s.sigma_next for s in slow)], [fast[0].sigma, *(s.sigma_next for s in fast)], plan


def test_compat_plan_official_qwen() -> None:
    slow_steps, fast_steps, plan = _compat_plan()
    table = full_schedule_sigmas("qwen-image")
    assert len(slow_steps) == 6
    _close(slow_steps, table[:6], atol=1e-7)
    assert slow_steps[0] == pytest.approx(1.0)
    assert slow_steps[-1] == pytest.approx(0.946, abs=1e-3)
    _close(fast_steps, [1.0, 0.837, 0.633, 0.370, 0.02, 0.0], atol=1e-3)
    assert fast_steps[-1] == 0.0
    # conditioned on the trained timesteps as the official pipelines hold them (bfloat16: 980, not 979.1915)
    assert [s.condition * 1000 for s in plan[:5]] == pytest.approx([1000, 980, 956, 936, 912], abs=1e-4)
    assert [s.condition * 1000 for s in plan[5:]] == pytest.approx([888, 744, 564, 320, 20], abs=1e-4)


def test_compat_plan_differs_from_the_exact_chain() -> None:
    # The official Slow call stops at ~0.946, not at the first Fast sigma 0.887 as the exact chain does.
    slow_steps, _, _ = _compat_plan()
    assert slow_steps[-1] - QWEN_FAST[0] / 1000 > 0.05


def test_compat_plan_depends_on_resolution() -> None:
    slow_steps, fast_steps, _ = _compat_plan(resolution=(1328, 1328))
    _close(slow_steps, full_schedule_sigmas("qwen-image", resolution=1328)[:6], atol=1e-7)
    assert fast_steps[1] != pytest.approx(0.837, abs=1e-3)


@pytest.mark.parametrize(
    ("slow", "fast"),
    [(QWEN_SLOW[:4], QWEN_FAST), (QWEN_SLOW, QWEN_FAST + [10.0]), (QWEN_SLOW, [])],
)
def test_compat_plan_errors(slow: list[float], fast: list[float]) -> None:
    with pytest.raises(ScheduleError, match="exactly 5 \\+ 5"):
        official_qwen_plan([t / 1000 for t in slow], [t / 1000 for t in fast], "qwen-image")


# ---------------------------------------------------------------------------------------------- command


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = run_schedule_command(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_command_prints_one_json_object(capsys) -> None:
    code, out, _ = _run(capsys, ["--family", "qwen-image"])
    assert code == 0
    assert out.count("\n") == 1
    result = json.loads(out)
    assert result == {"slow": QWEN_SLOW, "fast": QWEN_FAST}


def test_command_options(capsys) -> None:
    argv = ["--family", "flux", "--resolution", "1024x768", "--steps", "28", "--slow-indices", "0,1"]
    code, out, _ = _run(capsys, [*argv, "--fast-indices", "5,27"])
    assert code == 0
    expected = derive_timesteps(
        "flux", resolution=(1024, 768), num_steps=28, slow_indices=[0, 1], fast_indices=[5, 27]
    )
    result = json.loads(out)
    _close(result["slow"], expected["slow"], atol=1e-4)
    _close(result["fast"], expected["fast"], atol=1e-4)


def test_command_sigmas(capsys) -> None:
    code, out, _ = _run(capsys, ["--family", "flux", "--sigmas"])
    assert code == 0
    result = json.loads(out)
    _close(result["slow"], [t / 1000 for t in FLUX_SLOW], atol=1e-6)
    _close(result["fast"], [t / 1000 for t in FLUX_FAST], atol=1e-6)


def test_command_scheduler_config(capsys, tmp_path) -> None:
    static = {**get_family("flux").scheduler(), "use_dynamic_shifting": False}
    _write_config(tmp_path / "scheduler" / "scheduler_config.json", static)
    code, out, _ = _run(capsys, ["--family", "flux", "--scheduler-config", str(tmp_path)])
    assert code == 0
    expected = derive_timesteps("flux", scheduler_config=static)
    _close(json.loads(out)["fast"], expected["fast"], atol=1e-4)


@pytest.mark.parametrize(
    ("argv", "option"),
    [
        ([], "--family"),
        (["--family", "sdxl"], "--family"),
        (["--family", "flux", "--resolution", "1000"], "--resolution"),
        (["--family", "flux", "--resolution", "1024x"], "--resolution"),
        (["--family", "flux", "--steps", "0"], "--steps"),
        (["--family", "flux", "--steps", "many"], "--steps"),
        (["--family", "flux", "--slow-indices", "a,b"], "--slow-indices"),
        (["--family", "flux", "--slow-indices", "0,2,60"], "--slow-indices"),
        (["--family", "flux", "--fast-indices", "20,10"], "--fast-indices"),
        (["--family", "flux", "--slow-indices", "0,12"], "--slow-indices/--fast-indices"),
        (["--family", "flux", "--scheduler-config", "/no/such/model"], "--scheduler-config"),
        (["--family", "flux", "--bogus"], "--bogus"),
    ],
)
def test_command_errors(capsys, argv: list[str], option: str) -> None:
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert out == ""
    assert option in err
    assert "error" in err


def test_command_bad_config_file(capsys, tmp_path) -> None:
    bad = tmp_path / "scheduler_config.json"
    bad.write_text("nope", encoding="utf-8")
    code, out, err = _run(capsys, ["--family", "flux", "--scheduler-config", str(bad)])
    assert code == 2
    assert out == ""
    assert "--scheduler-config" in err and "not valid json" in err


def test_command_help(capsys) -> None:
    code, out, _ = _run(capsys, ["--help"])
    assert code == 0
    assert "python -m glance_lightning schedule" in out
    assert "--family" in out and "token" in out
