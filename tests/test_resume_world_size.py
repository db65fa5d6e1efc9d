"""Resuming across world sizes: a checkpoint written by 2 sharded ranks (``strategy: fsdp2``, 2 CPU processes over
gloo) resumes on 1 device and one written by 1 device resumes on 2 ranks, continuing to the LoRAs of a run that
never stopped at the new world size (same seed, same samples per step: 2 ranks x batch 1 = 1 device x batch 2).
The checkpoints' optimizer state is keyed by parameter name (glance_lightning.optimizer_state) and the draws are
a function of the position in the global batch (glance_lightning.draws), so both directions continue exactly
(within float summation order).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from test_sharding import assert_loras_close, fit, loras

from glance_lightning.errors import ConfigError
from glance_lightning.families import resume
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.optimizer_state import by_name, by_position

ONE = ("auto", False, "--trainer.devices", "1", "--data.init_args.batch_size", "2")
TWO = ("fsdp2", False, "--data.init_args.batch_size", "1")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> dict[str, Path]:
    """The same 3 + 3 step fit, 2 samples per step, uninterrupted: on 1 device and sharded on 2 ranks."""
    tmp = tmp_path_factory.mktemp("worlds")
    return {"one": fit(tmp, repo, "one", *ONE)[0], "two": fit(tmp, repo, "two", *TWO)[0]}


def resume_from(tmp_path: Path, repo: Path, source: Path, step: int, world: tuple,
                returncode: int = 0) -> tuple[Path, str]:
    """Resume ``source``'s step-``step`` checkpoint, copied into a fresh run folder, with ``world``'s settings."""
    checkpoint = tmp_path / "resumed" / "version_0" / "checkpoints" / f"epoch=0-step={step}.ckpt"
    checkpoint.parent.mkdir(parents=True)
    shutil.copy(source / "checkpoints" / checkpoint.name, checkpoint)
    return fit(tmp_path, repo, "resumed", *world, "--ckpt_path", str(checkpoint), returncode=returncode)


def test_two_ranks_at_batch_one_train_what_one_device_at_batch_two_trains(worlds):
    """The reference both directions are held to: the same draws, the same mean gradient."""
    assert_loras_close(loras(worlds["two"]), loras(worlds["one"]), atol=1e-5)


def test_a_two_rank_checkpoint_resumes_on_one_device(worlds, tmp_path, repo):
    """At step 4: Slow finished, Fast one step in (its sharded AdamW moments gathered into the file, continued by
    a plain AdamW)."""
    resumed, out = resume_from(tmp_path, repo, worlds["two"], 4, ONE)
    assert "(written by 2 rank(s)) on 1 rank(s)" in out and "samples per step instead" not in out
    assert_loras_close(loras(resumed), loras(worlds["one"]), atol=1e-5)
    assert read_glance_metadata(resumed / "fast")["trained_steps"] == 3


@pytest.mark.parametrize("step", [2, 4])
def test_a_one_device_checkpoint_resumes_on_two_ranks(worlds, tmp_path, repo, step):
    """At step 2 (Slow mid-way, Fast not started: its adapter gets no optimizer state) and at step 4 (Slow
    finished, Fast mid-way): each rank takes its shard of the LoRAs and of AdamW's moments."""
    resumed, out = resume_from(tmp_path, repo, worlds["one"], step, TWO)
    assert "(written by 1 rank(s)) on 2 rank(s)" in out
    assert_loras_close(loras(resumed), loras(worlds["two"]), atol=1e-5)


def test_checkpoints_key_the_optimizer_state_by_parameter_name(worlds):
    checkpoint = torch.load(worlds["two"] / "checkpoints" / "epoch=0-step=4.ckpt", weights_only=True)
    (state,) = checkpoint["optimizer_states"]
    slow, fast = (g["params"] for g in state["param_groups"])
    assert all(".lora_" in n and ".slow." in n for n in slow) and all(".fast." in n for n in fast)
    assert set(state["state"]) == set(slow) | set(fast)  # both phases have trained by step 4
    assert checkpoint[resume.WORLD_KEY] == {"world_size": 2, "batch_size": 1}
    one = torch.load(worlds["one"] / "checkpoints" / "epoch=0-step=2.ckpt", weights_only=True)
    assert set(one["optimizer_states"][0]["state"]) == set(one["optimizer_states"][0]["param_groups"][0]["params"])


GROUPS = [["m.a.slow", "m.b.slow"], ["m.a.fast", "m.b.fast"]]
MODULE = ["m.a.base", "m.a.slow", "m.a.fast", "m.b.base", "m.b.slow", "m.b.fast"]


def _state(keys: list, groups: list[list]) -> dict:
    return {"state": {k: {"step": torch.tensor(float(i))} for i, k in enumerate(keys)},
            "param_groups": [{"lr": 0.1, "params": g} for g in groups]}


def test_every_layout_a_checkpoint_was_written_in_reads_by_name():
    """Positional (one device, DDP), module-index (Lightning's sharded files written before) and names."""
    positional = by_name(_state([0, 1], [[0, 1], [2, 3]]), GROUPS, MODULE)
    indexed = by_name(_state([1, 4], [[1, 4], [2, 5]]), GROUPS, MODULE)
    named = by_name(_state(["m.a.slow", "m.b.slow"], GROUPS), GROUPS, MODULE)
    for state in (positional, indexed, named):
        assert [g["params"] for g in state["param_groups"]] == GROUPS
        assert {k: v["step"].item() for k, v in state["state"].items()} == {"m.a.slow": 0.0, "m.b.slow": 1.0}
    assert by_name({}, GROUPS, MODULE) == {}  # another rank's empty state


def test_a_named_state_is_put_back_in_this_runs_optimizer_order():
    named = by_name(_state(["m.b.fast"], [["m.b.slow", "m.a.slow"], ["m.a.fast", "m.b.fast"]]), GROUPS, MODULE)
    state = by_position(named, GROUPS)
    assert [g["params"] for g in state["param_groups"]] == [[1, 0], [2, 3]]
    assert list(state["state"]) == [3]
    with pytest.raises(ConfigError, match="does not match this run's LoRA parameters"):
        by_position(named, [["m.a.slow"], ["m.a.fast"]])


def test_a_resume_on_another_world_size_with_other_samples_per_step_is_refused_with_the_batch_size_to_set(
        worlds, tmp_path, repo):
    """Two ranks x batch 1 resumed on one device x batch 1 would halve the samples per step (the draws would no
    longer continue): refused before any model loads, naming the per-rank batch size that keeps them."""
    _, out = resume_from(tmp_path, repo, worlds["two"], 4, (*ONE[:-1], "1"), returncode=2)
    assert "was trained on other data: settings: data.batch_size x ranks 2 -> 1" in out
    assert "data.batch_size: 2 keeps its 2 samples per step on 1 rank(s)" in out and "Traceback" not in out
    assert "loading tiny:flux" not in out


def test_which_batch_size_keeps_the_samples_per_step():
    two_by_two = {"world_size": 2, "batch_size": 2}
    assert "data.batch_size: 4 keeps its 4" in resume.keeps_global_batch(two_by_two, {"world_size": 1,
                                                                                         "batch_size": 2})
    assert "no data.batch_size keeps that on 3" in resume.keeps_global_batch(two_by_two, {"world_size": 3,
                                                                                           "batch_size": 1})
    assert resume.keeps_global_batch(two_by_two, {"world_size": 2, "batch_size": 1}) == ""  # same world size
    fingerprint = {"settings": {"data.batch_size": 2, "data.resolution": 64}}
    assert resume.with_global_batch(fingerprint, two_by_two)["settings"] == {"data.resolution": 64,
                                                                              resume.GLOBAL_BATCH: 4}
