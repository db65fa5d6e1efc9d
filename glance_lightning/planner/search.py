"""``plan --search`` and ``performance.auto``: the fastest combination of the performance switches predicted to fit.

Switches searched: gradient checkpointing share (0, 1/4, 1/2, 3/4, 1) and policy (full, save-matmuls), regional
compile, the quantised base (none, int8-weight-only, nf4; float8 weight-only plans like int8), AdamW or 8-bit AdamW,
and block offload (with a bf16 base and checkpointing, without compile, as ``performance`` allows), for the config's
family, resolution and rank; ``Constraints`` fix the switches a user gave and leave out what the machine lacks. It
is cheap because peak memory is close to additive: base weights + LoRA/grads/optimizer state + activations, with
activations close to linear in the checkpointed share. So only three steps are simulated (share 0, compiled; share
1 with each policy; all with a bf16 base and AdamW); every other candidate is interpolated from them, with the
base's bytes per layout, the 8-bit states, torchao's kept bf16 weights (in blocks that are not recomputed),
compile's smaller saved activations (in blocks not recomputed) and the offloaded blocks by formula. Times come
from the anchors' op traces priced on the card (``timing``), eager or fused, plus dequantisation traffic and
offload transfers. ``search`` simulates its best candidate as a check and reports both figures; ``pick`` (what
``performance.auto`` takes) simulates a candidate only when its interpolated peak is near the card's limit.
The anchors are ``anchors``' (simulated at once in helper processes where the machine has CPUs to spare).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from typing import Any

from glance_lightning import performance as perf_ops
from glance_lightning.planner.anchors import QUANTS, Anchors, simulate_anchors, variant
from glance_lightning.planner.memory import GIB, StepMemory
from glance_lightning.planner.plan import CUDA_CONTEXT_GIB, PlanRequest, make_plan, offloaded_bytes
from glance_lightning.planner.runtime import get_gpu
from glance_lightning.planner.timing import step_time

SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)
POLICIES = ("full", "save-matmuls")
# Under strategy fsdp2 only checkpointing is searched: sharding refuses the other switches.
SHARDED_ALLOWS = {"base_quantization": ("none",), "offload": ("none",), "compile_blocks": (False,),
                  "optimizer": ("adamw",)}
OPTIMIZERS = ("adamw", "adamw8bit")
# An interpolated peak (+ CUDA context) within this share of the card is trusted without its own simulation: the
# interpolation has been within 6% of the simulated peak either way (tests/test_search_anchors.py, a shallow FLUX;
# 2.5% at full size), so 10% leaves room to spare. Not for block offload, whose formula is coarser (it took a third
# off the shallow FLUX's every-block-recomputed peak): an offload candidate is always simulated.
TRUSTED_BELOW = 0.9


@dataclass
class Candidate:
    share: float
    policy: str
    quantization: str
    optimizer: str
    offload: str
    peak_gib: float
    step_s: float
    compile: bool = False
    simulated: bool = False  # peak and time from its own simulated step (else interpolated from the anchors)
    faster: str = ""  # a less exact candidate that is predicted clearly faster, and the settings to choose it

    def overlay(self) -> dict[str, Any]:
        """The config overlay (model.init_args) of this candidate."""
        perf: dict[str, Any] = {"gradient_checkpointing": self.share, "base_quantization": self.quantization,
                                "offload": self.offload, "compile_blocks": self.compile}
        if self.share:
            perf["checkpoint_policy"] = self.policy
        return {"performance": perf, "optimizer": {"name": self.optimizer}}

    def switches(self) -> dict[str, Any]:
        """As ``settings.with_defaults``' ``chosen``."""
        return {"gradient_checkpointing": self.share, "checkpoint_policy": self.policy, "compile_blocks": self.compile,
                "base_quantization": self.quantization, "offload": self.offload, "optimizer": self.optimizer}

    def label(self) -> str:
        policy = f" {self.policy}" if self.share else ""
        offload = " +offload" if self.offload != "none" else ""
        compiled = " +compile" if self.compile else ""
        return f"ckpt {self.share:g}{policy}, {self.quantization}, {self.optimizer}{offload}{compiled}"


@dataclass
class Constraints:
    """What the search may choose: ``fixed`` switches (given by the user: ``Candidate.switches`` keys) and, for the
    others, the values this machine can run (``allowed``; all when absent)."""

    fixed: dict[str, Any] = field(default_factory=dict)
    allowed: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def admits(self, candidate: Candidate) -> bool:
        values = candidate.switches()
        for key, value in self.fixed.items():
            if key == "checkpoint_policy" and not candidate.share:
                continue
            want = float(value) if key == "gradient_checkpointing" else value
            if values[key] != want:
                return False
        return all(values[k] in allowed for k, allowed in self.allowed.items() if k not in self.fixed)


@dataclass
class SearchResult:
    card_gib: float
    candidates: list[Candidate]
    best: Candidate | None
    simulated_best: dict[str, Any] | None
    simulations: int
    seconds: float
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "predicted": True, "card_gib": self.card_gib,
            "best": None if self.best is None else {**self.best.__dict__, "overlay": self.best.overlay()},
            "best_simulated": self.simulated_best,
            "fitting": [c.__dict__ for c in self.candidates if c.peak_gib + CUDA_CONTEXT_GIB <= self.card_gib][:10],
            "simulations": self.simulations, "search_s": round(self.seconds, 1), "notes": self.notes,
        }

    def format(self) -> str:
        fitting = [c for c in self.candidates if c.peak_gib + CUDA_CONTEXT_GIB <= self.card_gib]
        lines = [f"search for a {self.card_gib:.1f} GiB card ({self.simulations} steps simulated in "
                 f"{self.seconds:.0f} s, the rest interpolated; all figures predicted):"]
        for c in fitting[:8]:
            lines.append(f"  {c.step_s:6.2f} s/step  {c.peak_gib:6.2f} GiB  {c.label()}")
        if self.best is None:
            lines.append("nothing fits: lower the resolution or the rank, or use a card with more memory")
        else:
            sim = self.simulated_best or {}
            lines.append(f"best: {self.best.label()}: interpolated {self.best.peak_gib:.2f} GiB, simulated "
                         f"{sim.get('peak_gib', float('nan')):.2f} GiB, {sim.get('step_s') or self.best.step_s:.2f} "
                         "s/step")
            lines.append("as a config overlay (model.init_args):")
            for key, value in self.best.overlay().items():
                lines.append(f"  {key}: {value}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def with_candidate(request: PlanRequest, c: Candidate) -> PlanRequest:
    """``request`` with the candidate's switches."""
    return variant(request, c.share, c.policy, c.quantization, c.optimizer, c.offload, c.compile)


def search(request: PlanRequest, card_gib: float | None = None, anchors: Anchors | None = None,
           constraints: Constraints | None = None, check: bool = True) -> SearchResult:
    """Every candidate ``constraints`` admit, fastest first, and the best: the fastest predicted to fit ``card_gib``
    (default: the request's card) among the most exact that fit (``fidelity``), checked by one more simulation
    unless ``check`` is False; ``anchors`` from an earlier search of the same config are reused."""
    import time

    started = time.perf_counter()
    card = card_gib or request.gpu_memory_gib or (request.gpu.memory_gib if request.gpu else 0.0)
    simulated_anchors = anchors is None
    anchors = anchors or simulate_anchors(request)
    if request.step.ranks.sharded:  # what strategy fsdp2 refuses (glance_lightning.sharding.check_sharding)
        constraints = constraints or Constraints()
        constraints = Constraints(constraints.fixed, {**constraints.allowed, **SHARDED_ALLOWS})
    encode = anchors.encode_gib
    candidates = [c for c in _candidates(request, anchors.steps, anchors.layouts, anchors.blocks)
                  if constraints is None or constraints.admits(c)]
    # equal times: the fewest approximations first (8-bit states cost no time but change the update), then memory
    candidates.sort(key=lambda c: (c.step_s, fidelity(c), c.peak_gib))
    fitting = [c for c in candidates if c.peak_gib + CUDA_CONTEXT_GIB <= card]
    best = min(fitting, key=lambda c: (fidelity(c), c.step_s, c.peak_gib)) if fitting else None
    simulated = None
    if best is not None and check:
        from glance_lightning import console

        with console.quiet_info(True), contextlib.redirect_stdout(io.StringIO()):
            check_plan = make_plan(with_candidate(request, best))
        simulated = {"peak_gib": round(check_plan.peak_gib, 3), "step_s": check_plan.memory.step_s,
                     "fits": check_plan.peak_gib + CUDA_CONTEXT_GIB <= card}
    notes = ["3 anchor steps simulated (share 0 compiled, share 1 x 2 policies; bf16 base, AdamW); others "
             "interpolated: activations linear in the checkpointed share, quantised layouts / 8-bit states / offload "
             "by formula; times from the anchors' op traces priced on the card"]
    if encode + CUDA_CONTEXT_GIB > card:
        notes.append(f"the encode stage needs {encode:.1f} GiB on the device: fill the encode cache first on the "
                     "CPU (python -m glance_lightning cache --config ... --trainer.accelerator cpu); fit then "
                     "loads no text encoder")
    seconds = time.perf_counter() - started  # the anchors' simulation included when done here
    return SearchResult(card, candidates, best, simulated, 3 * simulated_anchors + (simulated is not None),
                        seconds, notes)


def pick(request: PlanRequest, anchors: Anchors, constraints: Constraints | None = None,
         card_gib: float | None = None, tries: int = 3) -> Candidate | None:
    """The fastest admitted candidate predicted to fit the card among the most exact ones that fit (``fidelity``:
    a quantised base or 8-bit states only where nothing more exact fits; ``Candidate.faster`` names a less exact
    one that would be clearly faster and fits with room to spare). Interpolation is within a few percent, so a
    candidate whose interpolated peak leaves ``TRUSTED_BELOW`` of the card to spare is taken as it is (unless it
    offloads); nearer the card's limit the first ``tries`` of a fidelity level are simulated in turn and the first
    whose own simulation fits is taken, with the simulated peak and time (``Candidate.simulated``); if none does,
    the next level is tried."""
    result = search(request, card_gib, anchors, constraints, check=False)
    fitting = [c for c in result.candidates if c.peak_gib + CUDA_CONTEXT_GIB <= result.card_gib]
    for level in sorted({fidelity(c) for c in fitting}):
        tier = [c for c in fitting if fidelity(c) == level]  # fastest first
        chosen = _first_that_fits(request, tier[:tries], result.card_gib)
        if chosen is not None:
            faster = next((c for c in fitting if fidelity(c) > level and _trusted(c, result.card_gib)), None)
            if faster is not None and faster.step_s < chosen.step_s / 1.1:
                chosen.faster = _faster_note(faster, chosen)
            return chosen
    return None


def _first_that_fits(request: PlanRequest, candidates: list[Candidate], card_gib: float) -> Candidate | None:
    from glance_lightning import console

    for candidate in candidates:
        if _trusted(candidate, card_gib):
            return candidate
        with console.quiet_info(True), contextlib.redirect_stdout(io.StringIO()):
            plan = make_plan(with_candidate(request, candidate))
        if plan.peak_gib + CUDA_CONTEXT_GIB <= card_gib:
            candidate.peak_gib, candidate.step_s = plan.peak_gib, plan.memory.step_s
            candidate.simulated = True
            return candidate
    return None


def _trusted(candidate: Candidate, card_gib: float) -> bool:
    """Whether the interpolated figures are good enough to take (or name) the candidate without simulating it."""
    return candidate.offload == "none" and candidate.peak_gib + CUDA_CONTEXT_GIB <= TRUSTED_BELOW * card_gib


def fidelity(c: Candidate) -> int:
    """How far the candidate's training step is from the exact one (0): 8-bit AdamW states change the update a
    little (1); a quantised base changes the model the LoRA learns against (int8 2, NF4 4; with 8-bit states one
    more), so the LoRA then meets another base at inference."""
    return {"none": 0, "int8-weight-only": 2, "nf4": 4}.get(c.quantization, 2) + (c.optimizer == "adamw8bit")


def _faster_note(faster: Candidate, chosen: Candidate) -> str:
    settings = []
    if faster.quantization != chosen.quantization:
        settings.append(f"model.performance.base_quantization: {faster.quantization}")
    if faster.optimizer != chosen.optimizer:
        settings.append(f"model.optimizer.name: {faster.optimizer}")
    return (f"{faster.label()} is predicted {chosen.step_s / faster.step_s:.1f}x faster, less exact; set "
            f"{' and '.join(settings)} to trade fidelity for that speed")


def _candidates(request: PlanRequest, anchors: dict[tuple[float, str], StepMemory],
                layouts: dict[str, tuple[int, int]], blocks: int) -> list[Candidate]:
    gpu = request.gpu or get_gpu("h100")  # a card given by its memory alone is timed as an H100
    bandwidth = gpu.bandwidth_gbs * 0.8e9
    host_link = gpu.host_link_gbs * 1e9
    zero, per_group = anchors[(0.0, "full")], int(request.settings.get("offload_blocks_per_group", 1))
    out = []
    for policy in POLICIES:
        one = anchors[(1.0, policy)]
        block_bytes = one.recomputed_block_bytes
        for share in SHARES:
            if share == 0 and policy != "full":
                continue
            lora_part = [m.lora + m.gradients + m.optimizer for m in (zero, one)]
            zero_peak = zero.peak + zero.compile_saving  # the share-0 anchor is simulated compiled
            rest = _lerp(zero_peak - zero.base - lora_part[0], one.peak - one.base - lora_part[1], share)
            times = {c: _lerp(step_time(zero.trace, gpu, c).seconds, step_time(one.trace, gpu, c).seconds, share)
                     for c in (False, True)}
            chosen = len(perf_ops.chosen_for_checkpointing(blocks, share))
            for quant in QUANTS:
                bf16, packed = layouts[quant]
                base = one.base - bf16 + packed
                # torchao keeps a bf16 copy of each weight whose input needs a gradient, in blocks not recomputed
                extra = (1 - share) * zero.grad_input_linear_bytes if quant == "int8-weight-only" else 0.0
                passes = {"none": 0.0, "int8-weight-only": 1 + share, "nf4": 2 + share}[quant]
                quant_time = passes * (bf16 + packed) / bandwidth
                # peft makes the LoRA in the base weight's dtype, float32 over bitsandbytes' uint8 weights
                widen = 4 * one.lora_numel / max(1, one.lora) if quant == "nf4" else 1.0
                for optimizer in OPTIMIZERS:
                    states = one.optimizer_8bit if optimizer == "adamw8bit" else one.optimizer * widen
                    peak = base + rest + extra + (one.lora + one.gradients) * widen + states
                    out.append(Candidate(share, policy, quant, optimizer, "none", peak / GIB,
                                         times[False] + quant_time))
                    if quant in ("none", "nf4"):  # compile cannot yet differentiate through torchao's weights
                        saved = (1 - share) * zero.compile_saving
                        out.append(Candidate(share, policy, quant, optimizer, "none", (peak - saved) / GIB,
                                             times[True] + quant_time, compile=True))
                    if quant == "none" and chosen:
                        mean = sum(block_bytes) / max(1, len(block_bytes))
                        moved = offloaded_bytes([int(mean)] * chosen, per_group)
                        transfer = 2 * chosen * mean / host_link
                        out.append(Candidate(share, policy, quant, optimizer, "block", (peak - moved) / GIB,
                                             max(times[False], transfer)))
    return out


def _lerp(a: float, b: float, t: float) -> float:
    return a + (b - a) * t
