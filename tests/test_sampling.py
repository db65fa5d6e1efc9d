"""The sampler contract: plans as data, one Euler walker, against velocity fields with known answers."""

import pytest
import torch

from glance_lightning.sampling import PLANS, Step, base_plan, build_plan, exact_plan, official_qwen_plan, sample
from glance_lightning.timesteps import GlanceTimesteps

SLOW = [1.0, 0.979, 0.958, 0.935, 0.911]
FAST = [0.887, 0.745, 0.563, 0.320, 0.02]


def test_ideal_denoiser_velocity_lands_exactly_on_the_data():
    # For x_t = (1 - s) x0 + s n the true velocity at (x, s) is (x - x0) / s; Euler is then exact.
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(x0)
    out = sample(lambda x, step: (x - x0) / step.sigma, noise, exact_plan(SLOW, FAST))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_constant_velocity_moves_by_sigma_span():
    x = torch.zeros(1, 3)
    c = torch.tensor([[1.0, -2.0, 0.5]])
    out = sample(lambda x, step: c, x, base_plan([0.8, 0.5, 0.0]))
    torch.testing.assert_close(out, -0.8 * c)


def test_exact_plan_steps_through_the_trained_sigmas_with_the_adapter_switch_at_the_boundary():
    plan = exact_plan(SLOW, FAST)
    assert [s.sigma for s in plan] == pytest.approx(SLOW + FAST)
    assert [s.condition for s in plan] == pytest.approx(SLOW + FAST)  # conditioned where each step starts
    assert [s.adapter for s in plan] == ["slow"] * 5 + ["fast"] * 5
    # the last Slow step ends at f1, not at 0; the chain ends at 0
    assert plan[4].sigma_next == pytest.approx(FAST[0]) and plan[-1].sigma_next == 0.0
    seen, ends = [], []
    sample(lambda x, step: seen.append(step) or torch.zeros_like(x), torch.zeros(1), plan,
           callback=lambda i, step, x: ends.append((i, step.sigma_next)))
    assert tuple(seen) == plan and ends[-1] == (9, 0.0)


def test_official_qwen_plan_walks_the_shifted_tables_but_conditions_on_the_trained_sigmas():
    slow = [t / 1000 for t in (1000.0, 979.1915, 957.5157, 934.9171, 911.3354)]
    fast = [t / 1000 for t in (886.7053, 745.0728, 562.9505, 320.0802, 20.0)]
    plan = official_qwen_plan(slow, fast, "qwen-image")
    assert [s.adapter for s in plan] == ["slow"] * 5 + ["fast"] * 5
    # the trained timesteps as the official pipelines hold them: a bfloat16 tensor (980, not 979.1915), / 1000
    bf16 = [1000.0, 980.0, 956.0, 936.0, 912.0, 888.0, 744.0, 564.0, 320.0, 20.0]
    assert [s.condition for s in plan] == [float(torch.tensor(t, dtype=torch.float32) / 1000) for t in bf16]
    assert all(s.as_scheduler for s in plan) and not any(s.as_scheduler for s in exact_plan(slow, fast))
    assert plan[4].sigma_next == pytest.approx(0.946, abs=1e-3)  # 5 intervals of the 50-step table
    assert [plan[5].sigma, *(s.sigma_next for s in plan[5:])] == pytest.approx(
        [1.0, 0.837, 0.633, 0.370, 0.02, 0.0], abs=1e-3)  # the shifted 5-step table
    assert plan[5].sigma > plan[4].sigma_next  # it jumps back up: not one schedule


def test_the_cli_modes_are_the_plan_table_and_official_qwen_is_refused_for_other_families():
    assert set(PLANS) == {"exact", "official-qwen"}
    t = GlanceTimesteps.from_lists(SLOW, FAST)
    assert build_plan("exact", t, "flux", (64, 64)) == exact_plan(SLOW, FAST)
    assert build_plan("official-qwen", t, "qwen-image-edit", (1024, 1024))[0].condition == 1.0
    with pytest.raises(ValueError, match="not for flux"):
        build_plan("official-qwen", t, "flux", (1024, 1024))
    with pytest.raises(ValueError, match="expected one of exact, official-qwen"):
        build_plan("karras", t, "flux", (1024, 1024))
    with pytest.raises(ValueError, match="exactly 5 \\+ 5"):
        official_qwen_plan(SLOW[:4], FAST, "qwen-image")


def test_state_is_integrated_in_float32():
    x = torch.zeros(1, dtype=torch.bfloat16)
    out = sample(lambda x, step: torch.full_like(x, 1e-3, dtype=torch.bfloat16), x, base_plan([1.0, 0.999, 0.0]))
    assert out.dtype == torch.float32


def test_scheduler_steps_round_the_state_to_the_model_dtype_as_diffusers_does():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = [1.0, 0.9461, 0.5, 0.0]
    v = torch.randn(1, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    plan = tuple(Step(s, n, s, None, as_scheduler=True) for s, n in zip(sigmas[:-1], sigmas[1:]))
    ours = sample(lambda x, step: v, torch.ones(1, 64), plan)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.sigmas = torch.tensor(sigmas)
    scheduler.set_begin_index(0)
    latents = torch.ones(1, 64).to(torch.bfloat16)  # the official pipelines hold latents in the model dtype
    for _ in plan:
        latents = scheduler.step(v, torch.tensor(500.0), latents, return_dict=False)[0]
    assert latents.dtype == torch.bfloat16 and torch.equal(ours, latents.float())
    assert not torch.equal(sample(lambda x, step: v, torch.ones(1, 64), base_plan(sigmas)), ours)


def test_plans_need_steps():
    with pytest.raises(ValueError, match="two sigmas"):
        base_plan([1.0])
    with pytest.raises(ValueError, match="at least one step"):
        sample(lambda x, step: x, torch.zeros(1), ())
    assert isinstance(exact_plan([0.5], [0.2])[0], Step)
