"""One sampler contract: a plan is data, ``sample(velocity_fn, x, plan)`` walks it.

A plan is a tuple of ``Step``s: the sigma a step starts at, the sigma it ends at, the sigma the model is
conditioned on, and the adapter that runs it ("slow", "fast", or None for the base model). A family only says
how to predict a velocity; every sampling mode is a plan builder in ``PLANS``:

- ``exact`` (the default): ONE Euler schedule s1 -> ... -> sN -> f1 -> ... -> fM -> 0 over the trained sigmas;
  the Slow adapter runs the steps that start at s1..sN, the Fast adapter those that start at f1..fM, and the
  model is conditioned on the sigma each step starts at.
- ``official-qwen``: what the official Glance Qwen pipelines (GlanceQwenSlowPipeline / GlanceQwenFastPipeline)
  compute, bit for bit (GLANCE.md section 3): the first 5 intervals of the shifted 50-step table conditioned on
  the 5 Slow timesteps, then the shifted 5-step table conditioned on the 5 Fast timesteps. The pipelines hold
  the timestep lists as bfloat16 tensors (``torch.tensor([1000.0, 979.1915, ...], dtype=torch.bfloat16)``), so
  the model is conditioned on the rounded values (980, not 979.1915) divided by 1000; and they step with
  diffusers' scheduler, which keeps the latents in the model's dtype between steps. Both are reproduced. Only
  5 + 5 steps, only for families that declare ``official_qwen``.

``base_plan`` is the base model's own schedule (no adapter), for comparison samples.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from glance_lightning.errors import ConfigError
from glance_lightning.timesteps import GlanceTimesteps

OFFICIAL_QWEN_TABLE_STEPS = 50
OFFICIAL_QWEN_PHASE_STEPS = 5


@dataclass(frozen=True)
class Step:
    sigma: float  # where the step starts
    sigma_next: float  # where it ends
    condition: float  # the sigma the model is conditioned on
    adapter: str | None  # "slow", "fast", or None for the base model
    # step as diffusers' FlowMatchEulerDiscreteScheduler.step does: state in the model's (velocity's) dtype
    # between steps, float32 sigmas, dt * v in the velocity's dtype. False: the state stays float32 throughout.
    as_scheduler: bool = False


Plan = tuple[Step, ...]
VelocityFn = Callable[[torch.Tensor, Step], torch.Tensor]
StepCallback = Callable[[int, Step, torch.Tensor], None]


def sample(velocity_fn: VelocityFn, x: torch.Tensor, plan: Plan, callback: StepCallback | None = None) -> torch.Tensor:
    """Euler-integrate dx/dsigma = v along ``plan``; the state is kept in float32.

    ``velocity_fn(x, step)`` is called once per step; ``callback(i, step, x)`` after each, with the new state.
    """
    if not plan:
        raise ValueError("sample() needs a plan of at least one step")
    x = x.float()
    for i, step in enumerate(plan):
        v = velocity_fn(x, step)
        if step.as_scheduler:
            dt = torch.tensor(step.sigma_next, dtype=torch.float32) - torch.tensor(step.sigma, dtype=torch.float32)
            x = (x.to(v.dtype).float() + dt.to(v.device) * v).to(v.dtype).float()
        else:
            x = x + (step.sigma_next - step.sigma) * v.float()
        if callback is not None:
            callback(i, step, x)
    return x


def _walk(sigmas: Sequence[float], adapter: str | None, conditions: Sequence[float] | None = None,
          as_scheduler: bool = False) -> list[Step]:
    sigmas = [float(s) for s in sigmas]
    conditions = sigmas[:-1] if conditions is None else [float(c) for c in conditions]
    return [Step(s, n, c, adapter, as_scheduler) for s, n, c in zip(sigmas[:-1], sigmas[1:], conditions, strict=True)]


def bf16_conditions(sigmas: Sequence[float]) -> list[float]:
    """What the official Qwen pipelines condition on for trained ``sigmas``: the timesteps held as a bfloat16
    tensor, cast to float32 and divided by 1000 there (``t.expand(b).to(latents.dtype) / 1000``)."""
    timesteps = torch.tensor([float(s) * 1000.0 for s in sigmas], dtype=torch.bfloat16)
    return (timesteps.to(torch.float32) / 1000).tolist()


def exact_plan(slow: Sequence[float], fast: Sequence[float]) -> Plan:
    """The exact chain over slow and fast sigmas, ending at 0."""
    chain = [*map(float, slow), *map(float, fast), 0.0]
    steps = _walk(chain, None)
    return tuple(Step(s.sigma, s.sigma_next, s.condition, "slow" if i < len(slow) else "fast")
                 for i, s in enumerate(steps))


def base_plan(sigmas: Sequence[float]) -> Plan:
    """A schedule (ending at its terminal sigma) walked by the base model, no adapter."""
    if len(sigmas) < 2:
        raise ValueError("a schedule needs at least two sigmas (a start and an end)")
    return tuple(_walk(sigmas, None))


def official_qwen_plan(
    slow: Sequence[float], fast: Sequence[float], family: str,
    resolution: int | tuple[int, int] = 1024, scheduler_config: dict | None = None,
) -> Plan:
    """The official Glance Qwen two-call arithmetic; ``slow``/``fast`` are the trained sigmas (5 each), which the
    model is conditioned on rounded as the official pipelines round them (``bf16_conditions``)."""
    from glance_lightning.schedules import ScheduleError, full_schedule_sigmas

    for name, values in (("slow", slow), ("fast", fast)):
        if len(values) != OFFICIAL_QWEN_PHASE_STEPS:
            raise ScheduleError(
                name, f"the official Qwen compatibility mode only works at exactly {OFFICIAL_QWEN_PHASE_STEPS} + "
                f"{OFFICIAL_QWEN_PHASE_STEPS} steps, got {len(values)}; use the exact chained schedule instead")
    common = {"scheduler_config": scheduler_config, "resolution": resolution}
    slow_table = full_schedule_sigmas(family, num_steps=OFFICIAL_QWEN_TABLE_STEPS, **common)
    fast_table = full_schedule_sigmas(family, num_steps=OFFICIAL_QWEN_PHASE_STEPS, **common)
    return (*_walk(slow_table[: OFFICIAL_QWEN_PHASE_STEPS + 1], "slow", bf16_conditions(slow), as_scheduler=True),
            *_walk(fast_table, "fast", bf16_conditions(fast), as_scheduler=True))


def _exact(timesteps: GlanceTimesteps, family: str, resolution: tuple[int, int], config: dict | None) -> Plan:
    return exact_plan(timesteps.slow, timesteps.fast)


def _official_qwen(timesteps: GlanceTimesteps, family: str, resolution: tuple[int, int],
                   config: dict | None) -> Plan:
    from glance_lightning.registry import get_family

    if not get_family(family).official_qwen:
        raise ConfigError(f"mode 'official-qwen' reproduces the official Qwen pipelines; not for {family}")
    return official_qwen_plan(timesteps.slow, timesteps.fast, family, resolution, config)


PLANS: dict[str, Callable[[GlanceTimesteps, str, tuple[int, int], dict | None], Plan]] = {
    "exact": _exact,
    "official-qwen": _official_qwen,
}
# Where each mode draws its seeded initial noise (``GenerationMixin.initial_noise``): "cpu" draws float32 noise with
# a CPU generator and moves it, so a seed gives the same image on every device; "pipeline" draws it as the official
# pipelines' prepare_latents does with the official scripts' generator (torch.Generator(device=<pipeline device>)):
# diffusers' randn_tensor on the pipeline's device, in the model's dtype, so a seed gives the official images there.
NOISE = {"exact": "cpu", "official-qwen": "pipeline"}


def build_plan(mode: str, timesteps: GlanceTimesteps, family: str, resolution: tuple[int, int],
               scheduler_config: dict | None = None) -> Plan:
    """The plan of a sampling ``mode`` for trained ``timesteps`` at ``resolution`` (width, height);
    ``scheduler_config``: the loaded model's (None: the family's built-in one), for modes that step a scheduler."""
    if mode not in PLANS:
        raise ConfigError(f"mode={mode!r}; expected one of {', '.join(PLANS)}")
    return PLANS[mode](timesteps, family, resolution, scheduler_config)


def noise_draw(mode: str, device: torch.device | str, dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """(the generator's and the draw's device, the draw's dtype) of ``mode``'s seeded noise on a model on
    ``device`` in ``dtype`` (see ``NOISE``)."""
    if NOISE.get(mode, "cpu") == "pipeline":
        return torch.device(device), dtype
    return torch.device("cpu"), torch.float32
