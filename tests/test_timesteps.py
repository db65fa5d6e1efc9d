"""Timestep lists: unit detection, validation messages and uniform drawing."""

import math

import pytest

from glance_lightning.timesteps import GlanceTimesteps, TimestepListError, to_sigmas

QWEN_SLOW = [1000, 979.1915, 957.5157, 934.9171, 911.3354]
QWEN_FAST = [886.7053, 745.0728, 562.9505, 320.0802, 20.0]


def test_timesteps_and_sigmas_give_the_same_lists():
    a = GlanceTimesteps.from_lists(QWEN_SLOW, QWEN_FAST)
    b = GlanceTimesteps.from_lists([t / 1000 for t in QWEN_SLOW], [t / 1000 for t in QWEN_FAST])
    assert a.unit == "timesteps" and b.unit == "sigmas"
    assert a.slow == pytest.approx(b.slow) and a.fast == pytest.approx(b.fast)
    assert a.slow[0] == 1.0 and a.fast[-1] == pytest.approx(0.02)
    assert "understood as timesteps" in a.describe()


def test_explicit_unit_overrides_detection():
    # [1.0, 0.5] read as timesteps is 0.001 and 0.0005 in sigmas
    assert to_sigmas([1.0, 0.5], "timesteps") == pytest.approx((0.001, 0.0005))


@pytest.mark.parametrize(
    ("slow", "fast", "needle"),
    [
        ([], [0.5], "empty"),
        ([1.0, math.nan], [0.5], "non-finite"),
        ([1200, 900], [500], "outside"),
        ([900, 950], [500], "descending"),
        ([1000, 900], [950, 100], "above every Fast"),
        ([1000, 900], [900], "above every Fast"),
        ([1.0, 0.0], [0.5], "outside"),
        ([1000, 900], [-5], "outside"),
    ],
)
def test_bad_lists_fail_with_a_message_naming_the_problem(slow, fast, needle):
    with pytest.raises(TimestepListError, match=needle):
        GlanceTimesteps.from_lists(slow, fast)


def test_error_names_the_list():
    with pytest.raises(TimestepListError, match=r"timesteps\.fast"):
        GlanceTimesteps.from_lists([1000, 900], [800, 850])


def test_a_module_with_no_lists_derives_its_family_schedule():
    from glance_lightning.families.flux import FluxGlance
    from glance_lightning.settings import ScheduleDerivation, TimestepSettings

    derived = FluxGlance(pretrained_model="tiny:flux").glance_timesteps.as_timesteps()
    assert derived["slow"] == pytest.approx([1000.0, 986.9786, 973.2042, 958.6094, 943.1188], abs=1e-3)
    assert derived["fast"] == pytest.approx([926.6473, 825.7017, 677.9868, 441.1997, 60.5503], abs=1e-3)
    other = FluxGlance(pretrained_model="tiny:flux", timesteps=TimestepSettings(
        derive=ScheduleDerivation(resolution=512, num_steps=20, slow_indices=[0, 1], fast_indices=[5, 19])))
    lists = other.glance_timesteps.as_timesteps()
    assert len(lists["slow"]) == 2 and len(lists["fast"]) == 2 and lists["slow"][1] != derived["slow"][1]


def test_lists_and_derive_together_are_refused():
    from glance_lightning.families.flux import FluxGlance
    from glance_lightning.settings import ScheduleDerivation, TimestepSettings

    with pytest.raises(ValueError, match="not both"):
        FluxGlance(pretrained_model="tiny:flux",
                   timesteps=TimestepSettings(slow=[1000], fast=[500], derive=ScheduleDerivation()))
    with pytest.raises(ValueError, match="both `slow` and `fast`"):
        FluxGlance(pretrained_model="tiny:flux", timesteps=TimestepSettings(slow=[1000]))


def test_lists_in_different_units_are_refused_not_read_as_one():
    with pytest.raises(TimestepListError, match=r"slow=\[1000, 950\] reads as timesteps but fast=\[0.5, 0.1\]"):
        GlanceTimesteps.from_lists([1000, 950], [0.5, 0.1])
