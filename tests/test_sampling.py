"""The shared Euler sampler and the exact Slow->Fast chain, against velocity fields with known answers."""

import pytest
import torch

from glance_lightning.sampling import chain_sigmas, sample, sample_chained

SLOW = [1.0, 0.979, 0.958, 0.935, 0.911]
FAST = [0.887, 0.745, 0.563, 0.320, 0.02]


def test_ideal_denoiser_velocity_lands_exactly_on_the_data():
    # For x_t = (1 - s) x0 + s n the true velocity at (x, s) is (x - x0) / s; Euler is then exact.
    x0 = torch.randn(2, 4, 8, 8)
    noise = torch.randn_like(x0)
    out = sample_chained(lambda x, s, phase: (x - x0) / s, noise, SLOW, FAST)
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=0)


def test_constant_velocity_moves_by_sigma_span():
    x = torch.zeros(1, 3)
    c = torch.tensor([[1.0, -2.0, 0.5]])
    out = sample(lambda x, s, i: c, x, [0.8, 0.5, 0.0])
    torch.testing.assert_close(out, -0.8 * c)


def test_chain_steps_through_exactly_the_trained_sigmas_with_the_adapter_switch_at_the_boundary():
    seen = []

    def velocity(x, sigma, phase):
        seen.append((sigma, phase))
        return torch.zeros_like(x)

    ends = []
    sample_chained(velocity, torch.zeros(1), SLOW, FAST, on_step=lambda i, s, x: ends.append(s))
    assert [s for s, _ in seen] == pytest.approx(SLOW + FAST)
    assert [p for _, p in seen] == ["slow"] * 5 + ["fast"] * 5
    # the last Slow step ends at f1, not at 0; the chain ends at 0
    assert ends[4] == pytest.approx(FAST[0]) and ends[-1] == 0.0
    assert chain_sigmas(SLOW, FAST) == pytest.approx(SLOW + FAST + [0.0])


def test_state_is_integrated_in_float32():
    x = torch.zeros(1, dtype=torch.bfloat16)
    out = sample(lambda x, s, i: torch.full_like(x, 1e-3, dtype=torch.bfloat16), x, [1.0, 0.999, 0.0])
    assert out.dtype == torch.float32


def test_sample_needs_two_sigmas():
    with pytest.raises(ValueError, match="two sigmas"):
        sample(lambda x, s, i: x, torch.zeros(1), [1.0])
