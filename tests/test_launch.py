"""The launch examples of docs/distributed.md run as written, on CPU: the torchrun script (one node, 2 processes over
gloo) and the SLURM sbatch script under a stand-in ``srun`` that starts its tasks with the ids SLURM gives them
(Lightning's SLURMEnvironment then reads the ranks). Both shard the base (``fsdp2``), write one run folder
(``GLANCE_LIGHTNING_RUN_DIR``) and fill the encode cache once. Bounded in time, every process reaped."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_sharding import CONFIG, PHASES, TIMEOUT

import reaping

EXAMPLES = Path(__file__).resolve().parents[1] / "docs" / "examples" / "launch"

FAKE_SRUN = """#!/bin/bash
# srun on one node: SLURM_NTASKS_PER_NODE tasks of the command, each with the ids SLURM gives it
pids=()
for ((i = 0; i < SLURM_NTASKS_PER_NODE; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: str, tmp_path: Path, repo: Path, **env: str) -> tuple[Path, str]:
    config = tmp_path / "fit.yaml"
    config.write_text(CONFIG.format(strategy="auto", root=tmp_path / "root", cache=tmp_path / "unused",
                                    checkpointing="false", repo=repo))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    run_dir = tmp_path / "run"
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parent),
                   "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}", "CONFIG": str(config),
                   "ACCELERATOR": "cpu", "GLANCE_LIGHTNING_RUN_DIR": str(run_dir),
                   "ENCODE_CACHE": str(tmp_path / "encode-cache"), "MASTER_PORT": str(free_port()), **env}
    done = reaping.run_reaped(["bash", str(EXAMPLES / script)], timeout=TIMEOUT, cwd=repo, env=environment)
    assert done.returncode == 0, done.stdout[-4000:]
    return run_dir, done.stdout


def check_sharded_run(run_dir: Path, out: str, tmp_path: Path) -> None:
    assert "transformer sharded over 2 ranks" in out and "built on the meta device" in out
    assert out.count("base loaded per shard") == 2  # two processes in all: the launcher's, none of Lightning's
    assert "rank 1: read " in out and "encoded 0" in out  # local rank 0 filled the cache, rank 1 read it
    assert any((tmp_path / "encode-cache").rglob("*.safetensors"))
    for phase in PHASES:
        weights = load_file(run_dir / phase / "pytorch_lora_weights.safetensors")
        assert weights and all(torch.isfinite(v).all() for v in weights.values())
    assert not list((tmp_path / "root").glob("version_*"))  # no rank claimed a folder of its own


def test_the_torchrun_example_shards_over_two_processes(tmp_path, repo):
    run_dir, out = launch("torchrun_fsdp2.sh", tmp_path, repo, NODES="1", GPUS_PER_NODE="2")
    check_sharded_run(run_dir, out, tmp_path)


@pytest.mark.skipif(sys.platform != "linux", reason="the stand-in srun is a bash script for Linux")
def test_the_slurm_example_shards_over_its_tasks_with_lightnings_slurm_environment(tmp_path, repo):
    slurm = {"SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
             "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "glance-fsdp2", "SLURM_NODELIST": "127.0.0.1"}
    run_dir, out = launch("slurm_fsdp2.sbatch", tmp_path, repo, **slurm)
    check_sharded_run(run_dir, out, tmp_path)
