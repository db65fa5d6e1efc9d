"""One run folder per fit, whatever the logger: everything under <default_root_dir>/version_N, a second run gets
the next folder, `--ckpt_path last` resumes in place, folders are claimed exclusively, bad roots and loggers
that cannot start are one line before any model loads."""

from __future__ import annotations

import multiprocessing
import os
import sys
from pathlib import Path

import pytest

from glance_lightning.cli import main
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.run_folder import RUN_DIR_ENV, claim, place_loggers

import reaping

LOGGERS = {  # the logger's own offline mode: W&B offline (conftest), TensorBoard and CSV files
    "tensorboard": [],  # Lightning's default
    "wandb": ["--config", "configs/logging/wandb.yaml"],
    "csv": ["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "elsewhere"],
    "none": ["--trainer.logger", "false"],
}
LOGGER_FILES = {"tensorboard": "tensorboard", "wandb": "wandb", "csv": "metrics.csv", "none": None}
RUN_FILES = ("config.yaml", "README.md", "slow/pytorch_lora_weights.safetensors",
             "fast/pytorch_lora_weights.safetensors", "checkpoints/last.ckpt")


def fit_args(repo: Path, root: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(repo / "configs/quickstart.yaml"), "--trainer.default_root_dir", str(root),
            "--data.init_args.path", str(repo / "glance_lightning/assets/samples/t2i"),
            "--model.init_args.slow_steps", "2", "--model.init_args.fast_steps", "2",
            "--trainer.callbacks.init_args.every_n_steps", "0", "--trainer.enable_progress_bar", "false", *extra]


def fit(repo: Path, root: Path, logger: str, *extra: str) -> int:
    args = [str(repo / a) if a.startswith("configs/") else a for a in LOGGERS[logger]]
    code = main(fit_args(repo, root, *args, *extra))
    if logger == "wandb":
        import wandb

        wandb.finish()  # a process ends its run at exit; here the next fit starts another
    return code


@pytest.mark.parametrize("logger", list(LOGGERS))
def test_every_output_of_a_run_is_in_one_version_folder(logger, repo, tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # nothing may land in the working folder
    monkeypatch.delenv("WANDB_DIR", raising=False)
    root = tmp_path / "X"
    assert fit(repo, root, logger) == 0
    assert sorted(p.name for p in root.iterdir()) == ["version_0"]
    run = root / "version_0"
    for name in RUN_FILES:
        assert (run / name).is_file(), name
    assert list((run / "samples").glob("*.png"))
    if LOGGER_FILES[logger]:
        assert (run / LOGGER_FILES[logger]).exists()
    assert not (run / "lightning_logs").exists() and not (tmp_path / "elsewhere").exists()
    assert list(cwd.iterdir()) == [], "the run wrote into the working folder"

    assert fit(repo, root, logger) == 0  # a second run: the next folder, the first untouched
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]
    assert all((root / "version_1" / name).is_file() for name in RUN_FILES)

    assert fit(repo, root, logger, "--model.init_args.fast_steps", "3", "--ckpt_path", "last") == 0
    assert sorted(p.name for p in root.iterdir()) == ["version_0", "version_1"]  # resumed in place
    assert read_glance_metadata(root / "version_1" / "fast")["trained_steps"] == 3
    assert read_glance_metadata(root / "version_0" / "fast")["trained_steps"] == 2
    assert list(cwd.iterdir()) == []


def _claim_together(root: str, barrier, results) -> None:
    barrier.wait()
    results.put(str(claim(Path(root))))


def test_runs_started_together_claim_distinct_folders(tmp_path):
    # fork: the children run only claim() (os.mkdir), nothing of torch's; spawn would import the test module again
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    barrier, results = context.Barrier(8), context.Queue()
    workers = [context.Process(target=_claim_together, args=(str(tmp_path), barrier, results)) for _ in range(8)]
    for worker in workers:
        worker.start()
    claimed = [results.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert sorted(claimed) == sorted({str(tmp_path / f"version_{i}") for i in range(8)})


def test_two_fit_processes_into_one_root_get_their_own_folders(repo, tmp_path):
    """Two real `fit` processes started together: each folder holds one run's files only."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    env.pop(RUN_DIR_ENV, None)
    commands = [[sys.executable, "-m", "glance_lightning", *fit_args(repo, tmp_path / "X", "--trainer.logger",
                                                                       "false", "--model.init_args.lora.rank", rank)]
                for rank in ("2", "4")]
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        done = list(pool.map(lambda cmd: reaping.run_reaped(cmd, timeout=240, cwd=repo, env=env), commands))
    assert all(result.returncode == 0 for result in done), [r.stdout[-2000:] for r in done]
    runs = sorted((tmp_path / "X").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    ranks = set()
    for run in runs:
        config_rank = next(line.split(":")[1].strip() for line in (run / "config.yaml").read_text().splitlines()
                           if line.strip().startswith("rank:"))
        for phase in ("slow", "fast"):
            assert str(read_glance_metadata(run / phase)["rank"]) == config_rank, run
        ranks.add(config_rank)
    assert ranks == {"2", "4"}


def test_loggers_are_pointed_into_the_run_folder(tmp_path):
    run = tmp_path / "version_3"
    logger, notes = place_loggers(None, run, resuming=False)
    assert logger["init_args"]["save_dir"] == str(tmp_path) and logger["init_args"]["version"] == "version_3"
    wandb = {"class_path": "lightning.pytorch.loggers.WandbLogger", "init_args": {"save_dir": "/somewhere"}}
    placed, notes = place_loggers([wandb], run, resuming=False)
    assert placed[0]["init_args"]["save_dir"] == str(run)
    assert notes and "save_dir='/somewhere' replaced" in notes[0]
    assert place_loggers(False, run, resuming=False) == (False, [])


def test_a_logger_that_cannot_start_is_one_line_before_any_model_loads(repo, tmp_path, monkeypatch, capsys,
                                                                       no_model_load):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    # online without an API key: wandb refuses to start (the mode as a logger setting: wandb reads WANDB_MODE
    # once per process, and other tests ran offline in this one)
    code = fit(repo, tmp_path / "X", "wandb", "--trainer.logger.init_args.mode", "online")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "trainer.logger: WandbLogger cannot start" in err and "WANDB_MODE=offline" in err, err
    assert not list((tmp_path / "X").glob("version_*"))  # the refused run leaves no empty folder


@pytest.mark.parametrize("kind", ["file", "under-a-file"])
def test_an_unusable_root_is_one_line_before_any_model_loads(kind, repo, tmp_path, capsys, no_model_load):
    (tmp_path / "file").write_text("x")
    root = tmp_path / "file" if kind == "file" else tmp_path / "file" / "runs"
    code = main(fit_args(repo, root))
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "trainer.default_root_dir: " in err and str(root) in err, err
    assert (tmp_path / "file").read_text() == "x"


def test_a_moved_run_folder_resumes_where_it_is_now(repo, tmp_path):
    assert fit(repo, tmp_path / "A", "none") == 0
    (tmp_path / "B").mkdir()
    (tmp_path / "A" / "version_0").rename(tmp_path / "B" / "version_0")
    moved = tmp_path / "B" / "version_0"
    assert fit(repo, tmp_path / "B", "none", "--model.init_args.fast_steps", "3",
               "--ckpt_path", str(moved / "checkpoints" / "last.ckpt")) == 0
    assert read_glance_metadata(moved / "fast")["trained_steps"] == 3
    assert not list((tmp_path / "A").iterdir())  # nothing written back into the old place


def test_ddp_worker_processes_write_into_the_folder_their_launcher_claimed(repo, tmp_path):
    """Lightning's DDP launcher starts the other rank by running the same command again: it must not claim a
    second folder."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop(RUN_DIR_ENV, None)
    command = [sys.executable, "-m", "glance_lightning", *fit_args(
        repo, tmp_path / "X", "--trainer.devices", "2", "--trainer.strategy", "ddp_find_unused_parameters_true")]
    done = reaping.run_reaped(command, timeout=240, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:]
    assert [p.name for p in (tmp_path / "X").iterdir()] == ["version_0"]
    assert all((tmp_path / "X" / "version_0" / name).is_file() for name in RUN_FILES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["X"]
