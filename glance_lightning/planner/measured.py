"""The training steps measured on real GPUs (the data: ``measured_steps.json`` beside this file): what the planner is
checked against (tests/test_planner_time.py, benchmarks/bench_plan.py).

``OURS``: this project's module (one H200, 2026-12-04, project head 53ce302; GLANCE.md section 8): full-size
transformers with random weights, 1024x1024, LoRA rank 32 on to_q/k/v/out.0, bf16 base, bf16-mixed, gradient
clipping 1.0, torch 2.11.0+cu130, diffusers 0.42.1, peft 0.21.0; median seconds between training-step ends after 3
warm-up steps, peak = ``torch.cuda.max_memory_allocated``. ``PLAIN``: the plain diffusers + peft loop
(benchmarks/bench_training.py ``reference``) on an H200 (same day) and an H100 (GLANCE.md section 6). ``None``: the
figure is kept back for independent checking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


@dataclass(frozen=True)
class MeasuredStep:
    family: str
    gpu: str
    checkpointing: float  # share of the repeated blocks recomputed
    text_tokens: int  # max_sequence_length (SD3: T5 tokens; its 77 CLIP tokens come on top)
    step_s: float | None
    peak_gib: float | None
    compile_blocks: bool = False
    rank: int = 32

    @property
    def label(self) -> str:
        compiled = ", regional compile" if self.compile_blocks else ""
        return f"{self.family} on {self.gpu}, checkpointing {self.checkpointing:g}{compiled}"


def _load(kind: str) -> tuple[MeasuredStep, ...]:
    rows = json.loads((Path(__file__).with_name("measured_steps.json")).read_text())[kind]
    return tuple(MeasuredStep(**row) for row in rows)


OURS = _load("ours")
PLAIN = _load("plain")


def planned_like(row: MeasuredStep) -> tuple[dict, dict, dict]:
    """(model init args, data options, trainer options) of a fit configured as the measured run."""
    init = {"pretrained_model": f"tiny:{row.family}", "torch_dtype": "bfloat16", "max_sequence_length": row.text_tokens,
            "lora": {"rank": row.rank, "alpha": row.rank, "targets": list(TARGETS)},
            "performance": {"gradient_checkpointing": row.checkpointing, "compile_blocks": row.compile_blocks}}
    return init, {"resolution": 1024}, {"precision": "bf16-mixed", "gradient_clip_val": 1.0}
