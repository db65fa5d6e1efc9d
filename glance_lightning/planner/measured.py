"""The training steps measured on real GPUs, as data: what the planner is checked against (tests/test_planner_time.py,
benchmarks/bench_plan.py).

``OURS``: this project's module (one H200, 2026-12-04, project head 53ce302; GLANCE.md section 8): full-size
transformers with random weights, 1024x1024, LoRA rank 32 on to_q/k/v/out.0, bf16 base, bf16-mixed, gradient
clipping 1.0, torch 2.11.0+cu130, diffusers 0.42.1, peft 0.21.0; median seconds between training-step ends after 3
warm-up steps, peak = ``torch.cuda.max_memory_allocated``. ``PLAIN``: the plain diffusers + peft loop
(benchmarks/bench_training.py ``reference``) on an H200 (same day) and an H100 (GLANCE.md section 6). ``None``: the
figure is kept back for independent checking.
"""

from __future__ import annotations

from dataclasses import dataclass

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


OURS = (
    MeasuredStep("flux", "h200", 1.0, 512, 0.854, 24.77),
    MeasuredStep("flux", "h200", 0.0, 512, 0.566, 46.55),
    MeasuredStep("flux", "h200", 0.5, 512, 0.519, 33.12, compile_blocks=True),
    MeasuredStep("sd3", "h200", 1.0, 256, 0.537, 17.14),
    MeasuredStep("sd3", "h200", 0.0, 256, 0.378, 32.72),
    MeasuredStep("qwen-image", "h200", 1.0, 45, None, 40.75),
    MeasuredStep("qwen-image", "h200", 0.0, 45, None, 68.86),
)
PLAIN = (
    MeasuredStep("flux", "h200", 1.0, 512, 0.789, 25.0),
    MeasuredStep("flux", "h200", 0.0, 512, 0.550, 47.1),
    MeasuredStep("sd3", "h200", 1.0, 256, 0.629, 17.5),
    MeasuredStep("flux", "h100", 0.0, 512, 0.587, 47.1),
    MeasuredStep("flux", "h100", 1.0, 512, 0.823, 25.0),
    MeasuredStep("qwen-image", "h100", 1.0, 512, 1.17, 41.2),
    MeasuredStep("sd3", "h100", 1.0, 435, 0.74, 17.5),
)


def planned_like(row: MeasuredStep) -> tuple[dict, dict, dict]:
    """(model init args, data options, trainer options) of a fit configured as the measured run."""
    init = {"pretrained_model": f"tiny:{row.family}", "torch_dtype": "bfloat16", "max_sequence_length": row.text_tokens,
            "lora": {"rank": row.rank, "alpha": row.rank, "targets": list(TARGETS)},
            "performance": {"gradient_checkpointing": row.checkpointing, "compile_blocks": row.compile_blocks}}
    return init, {"resolution": 1024}, {"precision": "bf16-mixed", "gradient_clip_val": 1.0}
