"""Samplers shared by every family: ``sample(velocity_fn, x, sigmas)`` and the exact Slow->Fast chain.

A family only says how to predict a velocity. The chain over slow = [s1..sN] and fast = [f1..fM] is ONE
Euler schedule s1 -> ... -> sN -> f1 -> ... -> fM -> 0; the Slow adapter runs the steps that start at
s1..sN, the Fast adapter those that start at f1..fM, and the model is conditioned on the trained sigmas.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

VelocityFn = Callable[[torch.Tensor, float, int], torch.Tensor]
PhaseVelocityFn = Callable[[torch.Tensor, float, str], torch.Tensor]


def sample(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    sigmas: Sequence[float],
    on_step: Callable[[int, float, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Euler-integrate dx/dsigma = v from sigmas[0] to sigmas[-1]; the state is kept in float32.

    ``velocity_fn(x, sigma, step_index)`` is called once per interval with the sigma the step starts at.
    """
    sigmas = [float(s) for s in sigmas]
    if len(sigmas) < 2:
        raise ValueError("sample() needs at least two sigmas (a start and an end)")
    x = x.float()
    for i, (sigma, sigma_next) in enumerate(zip(sigmas, sigmas[1:])):
        v = velocity_fn(x, sigma, i).float()
        x = x + (sigma_next - sigma) * v
        if on_step is not None:
            on_step(i, sigma_next, x)
    return x


def chain_sigmas(slow: Sequence[float], fast: Sequence[float]) -> list[float]:
    """The exact chained schedule: slow sigmas, fast sigmas, terminal 0."""
    return [*map(float, slow), *map(float, fast), 0.0]


def phase_of_step(step_index: int, num_slow: int) -> str:
    return "slow" if step_index < num_slow else "fast"


def sample_chained(
    velocity_fn: PhaseVelocityFn,
    x: torch.Tensor,
    slow: Sequence[float],
    fast: Sequence[float],
    on_step: Callable[[int, float, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Run the exact chain; ``velocity_fn(x, sigma, phase)`` gets phase "slow" or "fast"."""
    num_slow = len(slow)

    def phased(x: torch.Tensor, sigma: float, i: int) -> torch.Tensor:
        return velocity_fn(x, sigma, phase_of_step(i, num_slow))

    return sample(phased, x, chain_sigmas(slow, fast), on_step=on_step)
