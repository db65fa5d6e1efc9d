"""The search's anchors and what the pick trusts: the interpolation is close to each candidate's own simulation
(close enough for ``search.TRUSTED_BELOW``), helper processes simulate exactly the anchors this process does (and
a helper that fails costs nothing but time), a pick far under the card is taken without a simulation and one near
it is simulated, and the simulated step is the second phase's steady state (both adapters' AdamW states).
A shallow FLUX.1 (full width, 2 double and 4 single blocks, 1024x1024) keeps each simulation to a second or two.
No GPU, no hub."""

from __future__ import annotations

import math

import pytest

from glance_lightning.families.flux import FluxGlance
from glance_lightning.planner import anchors as anchor_steps
from glance_lightning.planner import search
from glance_lightning.planner.plan import CUDA_CONTEXT_GIB, make_plan
from glance_lightning.planner.quant import adamw8bit_state_bytes
from glance_lightning.planner.request import build_request
from glance_lightning.registry import get_family

SHALLOW = {"_class_name": "FluxTransformer2DModel", **get_family("flux").architecture, "num_layers": 2,
           "num_single_layers": 4}
INIT = {"pretrained_model": "tiny:flux", "torch_dtype": "bfloat16", "lora": {"rank": 16, "alpha": 16}}
TRAINER = {"precision": "bf16-mixed", "gradient_clip_val": 1.0}


class ElsewhereFlux(FluxGlance):
    """Pickled by its module's name, which a fresh process cannot import (tests/ is not on its path)."""


def _request(cls: type = FluxGlance):
    return build_request(cls, INIT, {"resolution": 1024}, TRAINER, "h100", architecture=dict(SHALLOW))


@pytest.fixture(scope="module")
def shallow():
    request = _request()
    return request, anchor_steps.simulate_anchors(request, cpus=1)


def test_interpolated_candidates_are_close_to_their_own_simulation(shallow):
    request, anchors = shallow
    candidates = search.search(request, 80.0, anchors, check=False).candidates
    wanted = {(0.0, "full", "nf4", True, "none"), (0.25, "full", "nf4", True, "none"),
              (0.5, "full", "none", False, "none"), (0.5, "save-matmuls", "none", False, "block"),
              (0.75, "full", "int8-weight-only", False, "none"), (0.75, "save-matmuls", "int8-weight-only", False,
                                                                   "none")}
    errors = []
    for c in candidates:
        if (c.share, c.policy, c.quantization, c.compile, c.offload) in wanted and c.optimizer == "adamw":
            plan = make_plan(search.with_candidate(request, c))
            errors.append(c.peak_gib / plan.peak_gib - 1)
            assert c.step_s == pytest.approx(plan.memory.step_s, rel=0.05)
    assert len(errors) == len(wanted)
    assert max(abs(e) for e in errors) < 0.06
    # a pick trusted without its own simulation has more room than the interpolation's error
    assert max(-e for e in errors) + 0.03 < 1 - search.TRUSTED_BELOW


def test_helper_processes_simulate_the_same_anchors(shallow, monkeypatch):
    request, serial = shallow
    monkeypatch.setattr(anchor_steps, "PARALLEL_FROM", 0)  # the shallow model is worth helpers for this test
    helped = anchor_steps.simulate_anchors(request, cpus=3)
    assert helped.helpers == 2 and serial.helpers == 0

    def steps(anchors) -> list[dict]:  # all but the simulation's own wall time
        rows = anchor_steps.anchors_to_dict(anchors)["steps"]
        return [{k: v for k, v in row.items() if k != "wall_s"} for row in rows]

    assert steps(helped) == steps(serial)


@pytest.mark.parametrize("cls", [ElsewhereFlux, type("LocalFlux", (FluxGlance,), {})],
                         ids=["helper-fails", "cannot-be-pickled"])
def test_a_step_a_helper_cannot_simulate_is_simulated_here(cls, shallow, monkeypatch):
    monkeypatch.setattr(anchor_steps, "PARALLEL_FROM", 0)
    anchors = anchor_steps.simulate_anchors(_request(cls), cpus=2)
    assert anchors.helpers == 0
    assert [m.peak for m in anchors.steps.values()] == [m.peak for m in shallow[1].steps.values()]


def test_a_pick_far_under_the_card_is_taken_as_interpolated_and_one_near_it_simulated(shallow, monkeypatch):
    request, anchors = shallow
    fastest = search.search(request, 80.0, anchors, check=False).candidates[0]
    with monkeypatch.context() as patch:
        patch.setattr(search, "make_plan", lambda *a: pytest.fail("simulated a pick with room to spare"))
        roomy = search.pick(request, anchors, card_gib=80.0)
    assert (roomy.label(), roomy.simulated) == (fastest.label(), False)

    tight = fastest.peak_gib + CUDA_CONTEXT_GIB + 0.01  # the fastest only just fits as interpolated
    near = search.pick(request, anchors, card_gib=tight)
    assert near is not None and near.simulated and near.peak_gib + CUDA_CONTEXT_GIB <= tight

    offloading = next(c for c in search.search(request, 80.0, anchors, check=False).candidates if c.offload != "none")
    simulated = []
    with monkeypatch.context() as patch:  # far under the card, yet simulated: offload's formula is coarser
        real = search.make_plan
        patch.setattr(search, "make_plan", lambda *a: simulated.append(1) or real(*a))
        assert search._first_that_fits(request, [offloading], 80.0).simulated and simulated == [1]


def test_the_step_is_the_second_phase_with_both_adapters_states(shallow):
    request, anchors = shallow
    step = anchors.steps[(1.0, "full")]
    module = request.module
    module.adapt_transformer(_meta_transformer())
    both = [p for phase in ("slow", "fast") for p in module.adapter_parameters(phase)]
    assert both and step.lora_numel == sum(p.numel() for p in both)
    assert step.optimizer_8bit == sum(math.ceil(adamw8bit_state_bytes(p.numel()) / 512) * 512 for p in both)


def _meta_transformer():
    import torch

    from glance_lightning.planner.memory import build_transformer

    with torch.device("meta"):
        return build_transformer(dict(SHALLOW), torch.bfloat16)


def test_a_quantised_base_only_where_no_bf16_setting_fits_and_its_speed_is_named(shallow):
    request, anchors = shallow
    candidates = search.search(request, 80.0, anchors, check=False).candidates
    exact = [c for c in candidates if search.fidelity(c) == 0 and c.offload == "none"]
    # a card where the bf16 base fits only by recomputing blocks, while an NF4 base fits without: NF4 is faster
    card = 1.08 * min(c.peak_gib for c in exact) + CUDA_CONTEXT_GIB
    fitting = [c for c in candidates if c.peak_gib + CUDA_CONTEXT_GIB <= card]
    assert fitting[0].quantization != "none"  # the fastest that fits is a quantised base
    chosen = search.pick(request, anchors, card_gib=card)
    assert chosen is not None and search.fidelity(chosen) == 0
    assert "faster" in chosen.faster and "model.performance.base_quantization: " in chosen.faster
    assert search.search(request, card, anchors, check=False).best.label() == chosen.label()  # plan --search agrees

    nothing_exact = min(c.peak_gib for c in candidates if search.fidelity(c) == 0) - 0.05  # no bf16 setting fits
    fallback = search.pick(request, anchors, card_gib=nothing_exact + CUDA_CONTEXT_GIB)
    assert fallback is not None and search.fidelity(fallback) > 0 and fallback.peak_gib <= nothing_exact

    roomy = search.pick(request, anchors, card_gib=80.0)  # a bf16 step that is also the fastest: nothing to name
    assert search.fidelity(roomy) == 0 and roomy.faster == ""
