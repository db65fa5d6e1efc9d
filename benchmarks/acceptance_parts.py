"""The pieces of benchmarks/gpu_acceptance.py: the settings a family's rows run, a row and how it is recorded, the
report (Markdown and JSON, rewritten after every row), the planner's predictions in worker processes, and the
child-process helpers for the CUDA tests."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import datetime
import gc
import importlib.util
import json
import multiprocessing
import os
import platform
import re
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import yaml

from glance_lightning.errors import UserError


class OutOfTime(BaseException):
    """The whole run's budget is spent (raised by the alarm wherever the run is; a BaseException so that no
    library's ``except Exception`` swallows it, and Lightning re-raises it)."""


@dataclass(frozen=True)
class Setting:
    """One training row's configuration: ``kind`` plain (the diffusers + peft loop) or ours (``Trainer.fit``)."""

    name: str
    kind: str
    options: dict[str, Any]

    @property
    def checkpointing(self) -> float:
        return float(self.options.get("gradient_checkpointing") or 0.0)

    @property
    def moves_base(self) -> bool:
        """Quantises or offloads the frozen base: the kept bf16 weights must leave the device first."""
        return self.options.get("base_quantization", "none") != "none" or self.options.get("offload", "none") != "none"

    def missing(self, device: str) -> str | None:
        """Why this row cannot run here (a library or CUDA it needs), or None."""
        needs = []
        if self.options.get("base_quantization") == "nf4" or self.options.get("optimizer") == "adamw8bit":
            needs.append("bitsandbytes")
        if str(self.options.get("base_quantization", "none")).startswith(("int8", "float8")):
            needs.append("torchao")
        absent = [n for n in needs if importlib.util.find_spec(n) is None]
        if absent:
            return f"skipped: needs {', '.join(absent)}, not installed here"
        if "bitsandbytes" in needs and not device.startswith("cuda"):
            return "skipped: bitsandbytes NF4 and 8-bit AdamW need a CUDA device"
        return None


def one_device_presets(presets: Path) -> list[Path]:
    """The presets of configs/performance/ for one device (those for several, with trainer.devices, are planned
    per rank: docs/distributed.md)."""
    return [path for path in sorted(presets.glob("*.yaml"))
            if not ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}).get("devices")]


def settings(presets: Path, compile_backend: str = "inductor") -> list[Setting]:
    """A family's rows, most valuable first: ours and the plain loop with every block recomputed and with none,
    every block recomputed + regional compile (at the plain loop's checkpointed memory: where ours should be faster,
    and what performance auto picks for FLUX on a 25 GB budget), each one-device preset of configs/performance/, an
    int8 base."""
    rows = [
        Setting("ours, every block recomputed", "ours", {"gradient_checkpointing": 1.0}),
        Setting("plain loop, every block recomputed", "plain", {"gradient_checkpointing": 1.0}),
        Setting("ours, no checkpointing", "ours", {"gradient_checkpointing": 0.0}),
        Setting("plain loop, no checkpointing", "plain", {"gradient_checkpointing": 0.0}),
        Setting("ours, every block recomputed + regional compile", "ours",
                {"gradient_checkpointing": 1.0, "compile_blocks": True, "compile_backend": compile_backend}),
    ]
    for path in one_device_presets(presets):
        init = (yaml.safe_load(path.read_text()) or {}).get("model", {}).get("init_args", {})
        options = dict(init.get("performance") or {})
        if (init.get("optimizer") or {}).get("name"):
            options["optimizer"] = init["optimizer"]["name"]
        if options.get("gradient_checkpointing") is True:
            options["gradient_checkpointing"] = 1.0
        rows.append(Setting(f"ours, preset {path.name}", "ours", options))
    rows.append(Setting("ours, int8 weight-only base, every block recomputed", "ours",
                        {"base_quantization": "int8-weight-only", "gradient_checkpointing": 1.0}))
    return rows


@dataclass
class Row:
    section: str
    family: str
    setting: str
    kind: str
    checkpointing: float | None = None
    s_step: float | None = None
    peak_gib: float | None = None
    note: str = ""
    wall_s: float | None = None
    details: dict[str, Any] | None = None  # a profile row's figures (benchmarks/step_profile.py)
    prediction: Any = field(default=None, repr=False)  # a Future of predict()'s dict, or the dict

    def predicted(self) -> dict[str, Any] | None:
        if isinstance(self.prediction, cf.Future):
            if not self.prediction.done() or self.prediction.cancelled():
                return None
            error = self.prediction.exception()
            self.prediction = {"error": f"{type(error).__name__}: {error}"} if error else self.prediction.result()
        return self.prediction

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "prediction"}
        data["predicted"] = self.predicted()
        return data


def _ratio(measured: float | None, predicted: float | None) -> str:
    ok = measured and predicted and measured == measured and predicted == predicted  # not None, 0 or nan
    return f"{measured / predicted:.2f}" if ok else "-"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


@contextlib.contextmanager
def recorded(row: Row, report: Report) -> Iterator[None]:
    """Runs a row; a user-level refusal (a setting this machine cannot run) or any failure becomes its note; a row
    the run's end cuts off is reported as such before the run stops."""
    try:
        yield
    except OutOfTime:
        row.note = "cut: the run's budget ran out during this row"
        report.add(row)
        raise
    except UserError as err:
        row.note = f"skipped: {err}"
    except torch.OutOfMemoryError:
        row.note = "out of device memory"
    except Exception as err:  # one row failing must not lose the others
        row.note = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"


def free_device() -> None:
    gc.collect()
    torch._dynamo.reset()  # compiled graphs hold the run's modules
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def environment(args: Any, argv: list[str]) -> dict[str, Any]:
    import diffusers
    import lightning
    import peft
    import transformers

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "python benchmarks/gpu_acceptance.py " + " ".join(argv[1:] if argv and argv[0].endswith(
                ".py") else argv), "device": device, "dry_run": args.dry_run, "budget_s": args.budget,
            "size": args.size, "rank": args.rank, "steps": args.steps, "warmup": args.warmup,
            "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
                         "transformers": transformers.__version__, "lightning": lightning.__version__,
                         "python": platform.python_version()}}


class Report:
    """The rows so far as ``acceptance.md`` and ``acceptance.json`` in ``out``, each written to a temporary file
    and renamed, after every row; each row is also printed as it comes."""

    HEADER = ("| section | family | setting | s/step | peak GiB | predicted s/step | predicted GiB | s ratio | "
              "GiB ratio | note |")

    def __init__(self, out: Path, env: dict[str, Any]) -> None:
        self.out, self.env, self.rows, self.notes, self.complete = out, env, [], [], False
        out.mkdir(parents=True, exist_ok=True)
        print(f"gpu_acceptance: {env['device']}, {env['versions']}\n{self.HEADER}", flush=True)
        self.write()

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(self._line(row), flush=True)
        self.write()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"gpu_acceptance: {text}", flush=True)
        self.write()

    def _line(self, row: Row) -> str:
        p = row.predicted() or {}
        note = row.note or ("" if row.prediction is None else p.get("error", "") if p else "prediction pending")
        plain = next((r for r in self.rows if r.kind == "plain" and r.family == row.family and r.section == "steps"
                      and r.checkpointing == row.checkpointing and r.s_step), None)
        if row.kind == "ours" and row.s_step and plain is not None:
            note = f"{plain.s_step / row.s_step:.2f}x the plain loop's speed{'; ' + note if note else ''}"
        return (f"| {row.section} | {row.family} | {row.setting} | {_num(row.s_step)} | {_num(row.peak_gib, 2)} | "
                f"{_num(p.get('step_s'))} | {_num(p.get('peak_gib'), 2)} | {_ratio(row.s_step, p.get('step_s'))} | "
                f"{_ratio(row.peak_gib, p.get('peak_gib'))} | {note} |")

    def markdown(self) -> str:
        env = self.env
        lines = [f"`{env['command']}` ({env['date']}, {env['device']}; " +
                 ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + ")", "",
                 "ratio = measured / predicted; s/step: median after the warm-up steps; peak: "
                 "torch.cuda.max_memory_allocated over the timed steps", "",
                 self.HEADER, "|" + " --- |" * 10, *(self._line(r) for r in self.rows), "", *self.notes]
        if not self.complete:
            lines.append("(incomplete: the run stopped before its last section)")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        data = {"environment": self.env, "complete": self.complete, "notes": self.notes,
                "rows": [r.as_dict() for r in self.rows]}
        for name, text in (("acceptance.json", json.dumps(data, indent=1)), ("acceptance.md", self.markdown())):
            tmp = self.out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, self.out / name)


def predict(family: str, options: dict[str, Any], arch: dict[str, Any], tokens: int, size: int, rank: int,
            gpu: Any, precision: str, clip: float | None) -> dict[str, Any]:
    """``plan``'s prediction for a row (in a worker process): our module with these settings; the plain loop's
    rows as our module configured like it (no clipping), which the planner predicts within 1% of the loop."""
    import contextlib as _contextlib
    import io

    from glance_lightning.planner.plan import make_plan
    from glance_lightning.planner.request import build_request
    from glance_lightning.registry import get_family

    torch.set_num_threads(1)
    options = dict(options)
    kind = options.pop("kind")
    optimizer = options.pop("optimizer", "adamw")
    init = {"pretrained_model": f"tiny:{family}", "torch_dtype": "bfloat16", "max_sequence_length": tokens,
            "lora": {"rank": rank, "alpha": rank, "targets": ["to_q", "to_k", "to_v", "to_out.0"]},
            "performance": options, "optimizer": {"name": optimizer}}
    trainer = {"precision": precision, "gradient_clip_val": None if kind == "plain" else clip}
    request = build_request(get_family(family).module_class(), init, {"resolution": size}, trainer, gpu,
                            text_tokens=tokens, architecture=arch)
    with _contextlib.redirect_stdout(io.StringIO()):
        plan = make_plan(request)
    return {"step_s": plan.memory.step_s, "peak_gib": plan.peak_gib, "fits": plan.fits, "gpu": gpu.name,
            "derivation": plan.memory.time.derivation() if plan.memory.time else None}


class Predictor:
    """The planner's predictions for every row, simulated in worker processes while the rows run."""

    def __init__(self, args: Any, workers: int) -> None:
        from glance_lightning.planner.runtime import detect_gpu, get_gpu

        self.args = args  # the card as the table has it (this device's own memory and SM count), or the one named
        self.gpu = get_gpu(args.gpu) if args.gpu else detect_gpu() if args.device.startswith("cuda") else \
            get_gpu("h200")
        self.pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
        self.futures: list[cf.Future] = []

    def submit(self, family: str, setting: Setting, arch: dict[str, Any], run_args: Any) -> cf.Future:
        a = self.args
        future = self.pool.submit(predict, family, {**setting.options, "kind": setting.kind}, dict(arch),
                                  run_args.text_tokens, a.size, a.rank, self.gpu, a.precision, a.clip)
        self.futures.append(future)
        return future

    def close(self, wait_s: float) -> None:
        """Waits up to ``wait_s`` for the predictions still running, then ends the workers."""
        cf.wait(self.futures, timeout=wait_s)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for process in list((getattr(self.pool, "_processes", None) or {}).values()):
            process.terminate()
            process.join(5)


def pytest_summary(output: str, returncode: int) -> str:
    """pytest's closing counts (e.g. "3 passed, 2 skipped") and its exit status."""
    lines = [line.strip("= ") for line in output.strip().splitlines() if re.search(r"\d+ (passed|failed|skipped|"
                                                                                   r"deselected|error)", line)]
    return f"{lines[-1] if lines else output.strip().splitlines()[-1:] or 'no output'} (exit {returncode})"


def kill_group(child: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()
