"""benchmarks/gpu_acceptance.py cannot rot between lent GPUs: its dry run (the same code on the CPU at CPU sizes)
passes here, its budget cuts a run without losing rows, and benchmarks/gpu_wheels.sh makes the folder the GPU
machine installs from (its logic, with a stand-in for pip: CI does not download for a test)."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_benchmarks import load

ROOT = Path(__file__).resolve().parents[1]
MAIN_SETTINGS = ("ours, every block recomputed", "plain loop, every block recomputed", "ours, no checkpointing",
                 "plain loop, no checkpointing", "ours, every block recomputed + regional compile")


@pytest.mark.timeout(400)
def test_the_dry_run_measures_every_row_with_its_prediction(tmp_path: Path):
    out = tmp_path / "acceptance"
    # A budget no busy machine reaches: the rows' code is under test here, not this machine's speed (the cut is
    # tested below).
    done = subprocess.run([sys.executable, "benchmarks/gpu_acceptance.py", "--dry-run", "--out", str(out),
                           "--budget", "320"], cwd=ROOT, capture_output=True, text=True, timeout=360)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "acceptance.json").read_text())
    assert report["complete"] and report["environment"]["dry_run"]
    rows = report["rows"]
    assert not [r for r in rows if r["note"].startswith(("failed", "cut"))], rows
    for family in ("flux", "qwen-image", "sd3"):
        measured = {r["setting"]: r for r in rows if r["family"] == family and r["section"] == "steps"}
        for name in MAIN_SETTINGS:
            row = measured[name]
            assert row["s_step"] > 0, row
            assert row["predicted"]["step_s"] > 0 and row["predicted"]["peak_gib"] > 0, row
        presets = [p.name for p in load("acceptance_parts").one_device_presets(ROOT / "configs" / "performance")]
        assert presets and not [p for p in presets if "fsdp2" in p]  # several devices: planned per rank only
        assert [n.removeprefix("ours, preset ") for n in measured if "preset" in n] == presets
    ours, plain = (r for r in rows if r["section"] == "profile")  # flux's steps, each phase timed on the host
    for row in (ours, plain):
        assert row["s_step"] > 0 and row["note"].startswith("per step: host forward"), row
        assert row["details"]["host_s"]["forward"] > 0 and row["details"]["host_s"]["backward"] > 0, row
    assert "ours" in ours["setting"] and "plain" in plain["setting"]
    for kind in ("ours", "plain"):  # the whole profile kept, for a closer look than the row's summary
        trace = json.loads(gzip.decompress((out / f"profile-flux-{kind}.json.gz").read_bytes()))
        assert any(e.get("name") == "step_profile::backward" for e in trace["traceEvents"])
    chain, base = (r for r in rows if r["section"] == "chain")
    assert 0 < chain["s_step"] < base["s_step"] and "faster" in base["note"]
    (tests,) = (r for r in rows if r["section"] == "tests")
    assert "(exit 0)" in tests["note"] and "skipped" in tests["note"]
    table = (out / "acceptance.md").read_text()
    assert table.count("\n| steps | ") == sum(r["section"] == "steps" for r in rows)
    stdout_rows = [line for line in done.stdout.splitlines() if line.startswith("| steps |")]
    assert len(stdout_rows) >= len(MAIN_SETTINGS) * 3  # printed as they came, before the closing table


def test_a_row_the_budget_cuts_is_reported_and_the_run_stops(tmp_path: Path):
    gpu = load("gpu_acceptance")
    parts = sys.modules["acceptance_parts"]
    report = parts.Report(tmp_path, {"command": "x", "date": "d", "device": "cpu", "versions": {}})
    budget = gpu.Budget(0.3)
    budget.arm()
    row = parts.Row("steps", "flux", "ours, every block recomputed", "ours")
    try:
        with pytest.raises(parts.OutOfTime), parts.recorded(row, report):
            time.sleep(5)
    finally:
        budget.disarm()
    saved = json.loads((tmp_path / "acceptance.json").read_text())
    assert saved["rows"][0]["note"].startswith("cut") and not saved["complete"]
    assert "(incomplete" in (tmp_path / "acceptance.md").read_text()


def test_sections_pass_on_what_they_leave_and_failures_become_notes(tmp_path: Path, monkeypatch):
    gpu = load("gpu_acceptance")
    parts = sys.modules["acceptance_parts"]
    budget = gpu.Budget(100.0)
    budget.open_section(0.2)
    assert 19 < budget.left() <= 20
    budget.open_section(0.3)  # the first section's unused 20 s come along
    assert 49 < budget.left() <= 50
    report = parts.Report(tmp_path, {"command": "x", "date": "d", "device": "cpu", "versions": {}})
    row = parts.Row("steps", "flux", "s", "ours")
    with parts.recorded(row, report):
        raise RuntimeError("no kernel for this\nsecond line")
    assert row.note == "failed: RuntimeError: no kernel for this"
    from glance_lightning.errors import SetupError

    with parts.recorded(row, report):
        raise SetupError("needs a CUDA GPU")
    assert row.note == "skipped: needs a CUDA GPU"
    nf4 = parts.Setting("n", "ours", {"base_quantization": "nf4"})
    monkeypatch.setattr(parts.importlib.util, "find_spec", lambda name: None)
    assert nf4.missing("cuda") == "skipped: needs bitsandbytes, not installed here"


def test_the_wheel_script_fetches_exactly_what_the_gpu_machine_lacks(tmp_path: Path):
    """gpu_wheels.sh with a stand-in for ``python -m pip``: the versions constraints.txt pins, Python 3.12
    manylinux wheels only, a wheel of the checkout, and the offline install line; a folder over 40 MiB refused."""
    log = tmp_path / "pip.log"
    fake = tmp_path / "python"
    fake.write_text(f"""#!{sys.executable}
import sys, pathlib, os
args = sys.argv[3:]
open({str(log)!r}, "a").write(" ".join(sys.argv[1:]) + "\\n")
out = pathlib.Path(args[args.index("-d" if args[0] == "download" else "-w") + 1])
names = [a.replace("==", "-") for a in args if "==" in a] if args[0] == "download" else ["glance_lightning-0.1.0"]
for name in names:
    (out / f"{{name}}-py3-none-any.whl").write_bytes(os.urandom(int(os.environ.get("FAKE_WHEEL_BYTES", "10"))))
""")
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake)}
    folder = tmp_path / "wheels"
    done = subprocess.run(["bash", "benchmarks/gpu_wheels.sh", str(folder)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    pins = {line.split("==")[0].lower(): line.split("==")[1] for line in (ROOT / "constraints.txt").read_text()
            .splitlines() if "==" in line and not line.startswith("#")}
    wheels = sorted(p.name for p in folder.iterdir())
    for name in ("diffusers", "jsonargparse", "omegaconf", "torchao", "docstring-parser", "typeshed-client",
                 "importlib-metadata"):
        assert f"{name}-{pins[name]}-py3-none-any.whl" in wheels
    assert "glance_lightning-0.1.0-py3-none-any.whl" in wheels and len(wheels) == 8
    download = log.read_text().splitlines()[0]
    assert "--only-binary=:all: --python-version 3.12" in download and "--no-deps" in download
    assert done.stdout.strip() == (f"python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "
                                   f"--upgrade --target /tmp/site {folder}/*.whl && export PYTHONPATH=/tmp/site")
    env["FAKE_WHEEL_BYTES"] = str(6 * 2**20)  # 8 wheels of 6 MiB: over the limit
    done = subprocess.run(["bash", "benchmarks/gpu_wheels.sh", str(folder)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1 and "over the 40 MiB" in done.stderr


class _Event:
    """A kineto event as benchmarks/step_profile.summarize reads it."""

    def __init__(self, name, kind, start, end, corr=0, linked=0):
        self._v = (name, kind, start, end, corr, linked)

    def name(self):
        return self._v[0]

    def activity_type(self):
        return self._v[1]

    def start_ns(self):
        return self._v[2]

    def duration_ns(self):
        return self._v[3] - self._v[2]

    def correlation_id(self):
        return self._v[4]

    def linked_correlation_id(self):
        return self._v[5]


def test_device_idle_is_charged_to_the_host_phase_that_launched_the_kernel_ending_it():
    profile = load("step_profile")
    phases = [profile.Interval(s, e, name=n) for n, s, e in
              (("forward", 0, 100), ("backward", 100, 200), ("optimizer", 200, 260), ("between", 260, 300))]
    kernels = [profile.Interval(10, 90, launched=5), profile.Interval(120, 190, launched=110),
               profile.Interval(185, 195, launched=150), profile.Interval(250, 255, launched=245)]
    charged = profile.charge_idle(kernels, phases, steps=1)
    ns = {k: round(v * 1e9) for k, v in charged.idle.items()}
    # 0-10 waits for a forward launch, 90-120 for a backward one, 195-250 for the optimizer's; 255-300 ends
    # the window in the between phase
    assert ns == {"forward": 10, "backward": 30, "optimizer": 55, "between": 45}
    assert round(charged.busy * 1e9) == 80 + 70 + 5 + 5  # the overlapping kernel counted once
    assert round(charged.busy * 1e9) + sum(ns.values()) == 300
    assert {k: round(v * 1e9) for k, v in charged.wall.items()} == {"forward": 100, "backward": 100,
                                                                     "optimizer": 60, "between": 40}
    halved = profile.charge_idle(kernels, phases, steps=2)
    assert halved.idle["optimizer"] == charged.idle["optimizer"] / 2


def test_a_profile_links_each_kernel_to_the_host_op_that_launched_it_and_counts_syncs():
    profile = load("step_profile")
    prefix = profile.PREFIX
    events = [_Event(prefix + "forward", "user_annotation", 0, 1000),
              _Event(prefix + "optimizer", "user_annotation", 1000, 2000),
              _Event(prefix + "between", "user_annotation", 2000, 3000),
              _Event("aten::mm", "cpu_op", 100, 200, corr=7),
              _Event("aten::_local_scalar_dense", "cpu_op", 1955, 1958, corr=9),
              _Event("aten::_fused_adamw_", "cpu_op", 1900, 1950, corr=8),
              _Event("cudaStreamSynchronize", "cuda_runtime", 1960, 1990),
              _Event("gemm", "kernel", 300, 900, linked=7),
              _Event("adamw", "kernel", 2500, 2600, linked=8),  # runs in "between", launched in "optimizer"
              _Event("Memcpy HtoD", "gpu_memcpy", 2900, 2950, linked=99),  # no host op known: its own start
              _Event(prefix + "forward", "gpu_user_annotation", 0, 1000)]  # the range's copy on the device
    summary = profile.summarize(events, steps=1)
    idle = {k: round(v * 1e9) for k, v in summary["idle_s"].items()}
    assert idle == {"forward": 300, "optimizer": 1600, "backward": 0, "between": 300 + 50}
    assert summary["kernels"] == 2 and summary["syncs"] == 1 and summary["reads"] == 1
    assert round(summary["busy_s"] * 1e9) == 600 + 100 + 50
    line = profile.describe({**summary, "gc_s": 0.001, "collections": 1.0})
    assert "idle while the host was in forward 0.0000, backward 0.0000, optimizer 0.0000" in line
    assert "2 kernels, 1.0 syncs" in line
    class Older(_Event):  # a torch whose kineto events have no activity_type: read from device and name
        activity_type = property()

        def device_type(self):
            return torch.autograd.DeviceType.CPU if self._v[1] in ("cpu_op", "user_annotation", "cuda_runtime") \
                else torch.autograd.DeviceType.CUDA

    older = profile.summarize([Older(*e._v) for e in events], steps=1)
    assert {k: older[k] for k in ("idle_s", "kernels", "syncs", "reads")} == \
        {k: summary[k] for k in ("idle_s", "kernels", "syncs", "reads")}
    faster = {**summary, "device_s_by_name": {"gemm": 500e-9, "adamw": 100e-9}}
    assert profile.kernel_differences(summary, faster).startswith("device time per step, ours - plain: +0.00 ms")
    assert "gemm" in profile.kernel_differences(summary, faster)
