"""Shared fixtures: offline hub, a per-session cache of tiny models, the repo root; no process left behind.

Time limits live in pyproject ([tool.pytest.ini_options]): pytest-timeout fails a test that runs too long with
the stacks of all threads, and faulthandler ends the whole run a little later if that could not interrupt it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import reaping

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` are skipped where no CUDA device is (they run on a lent GPU: ``pytest -m cuda``, which
    benchmarks/gpu_acceptance.py runs); each has CPU tests of its logic beside it."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (pytest -m cuda on a GPU machine)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models are built once per test session into a private cache (never the user's)."""
    cache = tmp_path_factory.mktemp("glance_cache")
    previous = os.environ.get("GLANCE_LIGHTNING_CACHE")
    os.environ["GLANCE_LIGHTNING_CACHE"] = str(cache)
    yield cache
    if previous is None:
        os.environ.pop("GLANCE_LIGHTNING_CACHE", None)
    else:
        os.environ["GLANCE_LIGHTNING_CACHE"] = previous


@pytest.fixture(autouse=True)
def no_process_left_behind():
    """A test that starts processes ends them: whatever it left running is killed, and the test fails."""
    before = {p.pid for p in reaping.descendants()}
    yield
    left = reaping.reap(reaping.leftovers(before))
    if left:
        pytest.fail(f"the test left {len(left)} process(es) running, now killed: " + "; ".join(left), pytrace=False)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    reaping.reap(reaping.leftovers(set()))  # what session-scoped fixtures started


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if any model weights are read."""
    import glance_lightning.families.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the mistake was reported")

    monkeypatch.setattr(loading, "load_pipeline", refuse)
    monkeypatch.setattr(loading, "load_transformer", refuse)


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


def _fit_config(config: str, root: Path, *overrides: str) -> Path:
    """`python -m glance_lightning fit --config CONFIG` from the repo root, as a user runs it; the run dir."""
    from glance_lightning.cli import main

    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)
        assert main(["fit", "--config", config, "--trainer.default_root_dir", str(root), *overrides]) == 0
    (run,) = sorted(root.glob("version_*"))
    return run


@pytest.fixture(scope="session")
def fit_config():
    return _fit_config


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, fit_config):
    """`fit --config CONFIG [OVERRIDES...]` run once per session and shared: the family contract and the CLI
    tests read the same quick-start runs as the testing kit's contract (``fit_once``: readers only; nothing may
    write into a shared run)."""
    from glance_lightning.testing import fit_once

    def run(config: str, *overrides: str) -> Path:
        return fit_once(config, tmp_path_factory.mktemp("quickstart"), *overrides, workdir=REPO)

    return run
