"""The forward data path: each batch carries its step's draws, a pure function of (seed, step, micro, position in
the global micro-batch)."""

import pytest
import torch

from glance_lightning.draws import DrawSpec, StepDraws, draw_micro_batch

SPEC = DrawSpec(seed=7, phase_steps=(4, 3), list_lengths=(5, 2), caption_dropout=0.25)


def _stream(start: int = 0, **kwargs) -> list[dict[str, torch.Tensor]]:
    return list(StepDraws(SPEC, num_samples=3, batch_size=4, start=lambda: start, **kwargs))


def test_one_batch_per_micro_batch_with_every_draw_the_step_needs():
    batches = _stream(accumulate=2)
    assert len(batches) == len(StepDraws(SPEC, 3, 4, accumulate=2)) == 7 * 2
    assert [b["step"] for b in batches] == [s for s in range(7) for _ in range(2)]
    for b in batches:
        assert set(b) == {"step", "index", "drop", "choice", "noise_seed"} and len(b["index"]) == 4
        assert all(isinstance(v, int) for v in b["index"] + b["choice"] + b["noise_seed"])  # host data
        assert min(b["index"]) >= 0 and max(b["index"]) < 3
        limit = 5 if b["step"] < 4 else 2  # the list of the step's phase
        assert max(b["choice"]) < limit
    assert batches[0]["noise_seed"] != batches[1]["noise_seed"]  # micro-batches differ


def test_draws_are_uniform_over_the_list_and_drop_at_the_configured_rate():
    choice = torch.tensor([c for micro in range(400) for c in draw_micro_batch(SPEC, 0, micro, 0, 64, 3)["choice"]])
    counts = torch.bincount(choice, minlength=5).float() / len(choice)
    assert (counts - 0.2).abs().max() < 0.02
    drops = torch.tensor([d for step in range(400) for d in draw_micro_batch(SPEC, step, 0, 0, 64, 3)["drop"]])
    assert drops.float().mean().item() == pytest.approx(0.25, abs=0.02)


def test_a_resumed_stream_continues_with_exactly_the_uninterrupted_draws():
    full, resumed = _stream(), _stream(start=3)
    assert len(resumed) == 4
    for a, b in zip(full[3:], resumed, strict=True):
        assert a == b


def test_ranks_and_seeds_draw_differently():
    rank0, rank1 = draw_micro_batch(SPEC, 2, 0, 0, 8, 3, world=2), draw_micro_batch(SPEC, 2, 0, 1, 8, 3, world=2)
    other_seed = draw_micro_batch(DrawSpec(8, (4, 3), (5, 2), 0.25), 2, 0, 0, 8, 3)
    assert rank0["noise_seed"] != rank1["noise_seed"] and rank0["noise_seed"] != other_seed["noise_seed"]
    assert draw_micro_batch(SPEC, 2, 0, 0, 8, 3, world=2) == rank0


def test_n_ranks_draw_the_slices_of_what_one_device_draws_at_n_times_the_batch():
    """So a run resumed on another number of ranks continues one stream, and keeps its steps with the global
    batch kept (tests/test_resume_world_size.py)."""
    one = _stream(accumulate=2)
    ranks = [list(StepDraws(SPEC, 3, 2, accumulate=2, rank=r, world=2)) for r in (0, 1)]
    for whole, first, second in zip(one, *ranks, strict=True):
        assert whole["step"] == first["step"] == second["step"]
        for key in ("index", "drop", "choice", "noise_seed"):
            assert first[key] + second[key] == whole[key], key
    assert ranks[0][0]["noise_seed"] != ranks[1][0]["noise_seed"]
    with pytest.raises(ValueError):
        draw_micro_batch(SPEC, 0, 0, 2, 4, 3, world=2)
