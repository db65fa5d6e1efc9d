"""The project's own training step at full size on fake tensors: peak GPU memory, its breakdown and its op trace.

``simulate_step`` builds the family's transformer from its full-size config on fake CPU tensors, quantised where
configured (``quant``), hands it to the module's own ``adapt_transformer`` (the same peft adapters, LoRA targets,
gradient checkpointing share and policy as ``fit``), fills the module's encode-once caches through the family's own
hooks (``fake_inputs``: latents of its ``latent_shape``, its ``encode_condition`` with the text encoders stood in by
``planned_prompt_embeds``; text encoders are never simulated in the step: the module trains from its caches), and runs
two optimizer steps the way Lightning's automatic optimisation does (autocast forward, zero_grad, backward, gradient
clipping, AdamW step) under ``PlannerMemTracker`` and, for the second step, ``TraceRecorder``, whose op trace ``timing``
prices on the card. Logging (``self.log``) is not part of it: it needs a Trainer and allocates only scalars.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import diffusers
import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from glance_lightning import performance as perf_ops
from glance_lightning.draws import draw_micro_batch
from glance_lightning.errors import ConfigError
from glance_lightning.planner.compiled import ElementwiseSaved
from glance_lightning.planner.fake import PlannerMemTracker, cuda_behaviour
from glance_lightning.planner.quant import QUANTIZED, emulate_quantised_base, optimizer_state_bytes
from glance_lightning.planner.ranks import Ranks, communication_s, fake_world, full_bytes, shard_for_plan
from glance_lightning.planner.runtime import GpuSpec
from glance_lightning.planner.timing import StepTime, step_time
from glance_lightning.planner.trace import OpTrace, TraceRecorder

GIB = 2**30
LATENT_CHANNELS = 16  # the planned VAE's latent channels (FLUX/SD3 AutoencoderKL, Qwen's causal VAE)
VAE_FACTOR = 8


@dataclass
class StepPlan:
    """What one simulated training step needs besides the module (read from the fit config by ``plan``)."""

    architecture: dict[str, Any]
    height: int = 1024
    width: int = 1024
    batch: int = 1
    text_tokens: int = 512
    precision: str = "bf16-mixed"
    gradient_clip: float | None = 1.0
    quantization: str = "none"
    optimizer: str = "adamw"
    gpu: GpuSpec | None = None
    other_gpus: tuple[GpuSpec, ...] = ()  # more cards to time the same ops on (step_s_on)
    compiled: bool = False  # regional compile of the repeated blocks (timed with fused elementwise runs)
    latent_channels: int = LATENT_CHANNELS  # of the model's VAE (a tiny model's has fewer)
    ranks: Ranks = field(default_factory=Ranks)  # several devices: the step of one rank (planner.ranks)


@dataclass
class StepMemory:
    """Bytes at the peak by kind, the step's op trace and its time on the card, and what the simulation took."""

    peak: int
    base: int
    lora: int
    optimizer: int
    gradients: int
    activations: int
    step_s: float | None
    flops: int
    wall_s: float
    notes: list[str] = field(default_factory=list)
    time: StepTime | None = None  # step_s by part (planner.timing)
    recomputed_block_bytes: list[int] = field(default_factory=list)  # frozen weights of each checkpointed block
    step_s_on: dict[str, float] = field(default_factory=dict)  # s/step on each of StepPlan.other_gpus
    optimizer_adamw: int = 0  # optimizer state bytes as torch AdamW (simulated) ...
    optimizer_8bit: int = 0  # ... and as bitsandbytes AdamW8bit (formula)
    grad_input_linear_bytes: int = 0  # bf16 bytes of the nn.Linear weights whose input needs a gradient
    lora_numel: int = 0  # LoRA parameters of both adapters
    trace: OpTrace | None = None  # the second step's ops (planner.trace), what the time model prices
    compile_saving: int = 0  # bytes regional compile does not keep for backward (taken off ``peak`` when compiled)

    def breakdown_gib(self) -> dict[str, float]:
        return {"base_weights": self.base / GIB, "lora_and_optimizer": (self.lora + self.optimizer + self.gradients)
                / GIB, "activations": self.activations / GIB}


class _PlanPipe:
    """Stands in for the loaded pipeline: the family hooks use only its static helpers, its VAE factor and its
    VAE's latent channels."""

    vae_scale_factor = VAE_FACTOR

    def __init__(self, pipeline_class: type, latent_channels: int = LATENT_CHANNELS) -> None:
        self._pipeline_class = pipeline_class
        self.vae = SimpleNamespace(config=SimpleNamespace(latent_channels=latent_channels, z_dim=latent_channels),
                                   dtype=torch.float32)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipeline_class, name)

    def register_modules(self, **modules: Any) -> None:
        pass


@dataclass
class _PlanTrainer:
    """What the training step reads of its Trainer."""

    global_step: int = 0
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 0
    should_stop: bool = False


def build_transformer(architecture: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """The family's transformer at full size (call under a FakeTensorMode: no memory is allocated)."""
    config = dict(architecture)
    cls = getattr(diffusers, config.pop("_class_name"))
    for key, value in config.items():
        if isinstance(value, list):
            config[key] = tuple(value)
    model = cls.from_config(config)
    for module in model.modules():  # ``.to(dtype)`` would swap tensors, which fake tensors refuse
        for name, param in module.named_parameters(recurse=False):
            if param.is_floating_point():
                module._parameters[name] = torch.nn.Parameter(param.to(dtype), requires_grad=param.requires_grad)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer.is_floating_point():
                module._buffers[name] = buffer.to(dtype)
    return model


def fake_inputs(module: Any, plan: StepPlan) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The latents and conditioning of one training sample at full size, made by the family's own hooks (call
    under a FakeTensorMode): ``encode_images`` answers latents of the family's ``latent_shape`` (the VAE is not
    simulated), and ``planned_condition`` runs the family's ``encode_condition`` with its text encoders stood in
    by ``planned_prompt_embeds``; the control images (as many as the family needs at least) are the target's
    size."""
    def fake_vae(pixels: torch.Tensor) -> torch.Tensor:
        return torch.randn(pixels.shape[0], *module.latent_shape(pixels.shape[-2], pixels.shape[-1]))

    module.encode_images = fake_vae
    try:
        latents = module.encode_images(torch.empty(1, 3, plan.height, plan.width))
        controls = [torch.empty(3, plan.height, plan.width) for _ in range(module.family_spec.control_images[0])]
        try:
            cond = module.planned_condition(controls, plan.text_tokens, plan.architecture)
        except NotImplementedError as err:
            raise ConfigError(str(err)) from None
    finally:
        del module.encode_images
    return latents, cond


def _linears_with_grad_inputs(transformer: torch.nn.Module) -> dict[str, int]:
    """Filled during the step: bf16 bytes of each frozen ``nn.Linear`` whose input needs a gradient (torchao keeps a
    dequantised copy of exactly those for backward); the search reads it."""
    found: dict[str, int] = {}

    def hook(name: str, module: torch.nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].requires_grad and name not in found:
            shape = getattr(module, "_planned_shape", None) or tuple(module.weight.shape)
            found[name] = _rounded(shape[0] * shape[1] * 2)

    for name, module in transformer.named_modules():
        if type(module) is torch.nn.Linear and "lora_" not in name:
            module.register_forward_pre_hook(lambda m, a, name=name: hook(name, m, a))
    return found


def _collate_keeping_host(module: Any, keys: list[str]) -> None:
    """The module's collate, with ``keys`` (real host tensors the step reads as lists, such as an edit family's
    control grid) batched as real tensors rather than turned into fake ones."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    collate = module.collate_conditions

    def collate_conditions(conds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = collate([{k: v for k, v in c.items() if k not in keys} for c in conds])
        with unset_fake_temporarily():
            for key in keys:
                batch[key] = torch.cat([c[key] for c in conds])
        return batch

    module.collate_conditions = collate_conditions


def _autocast(precision: str) -> Any:
    if precision.endswith("-mixed"):
        dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
        return torch.autocast("cpu", dtype=dtype)
    return nullcontext()


def _rounded(n: int) -> int:
    return math.ceil(n / 512) * 512


def simulate_step(module: Any, plan: StepPlan, steps: int = 1, fake: bool = True) -> StepMemory:
    """A training step of ``module`` (a GlanceModule, not set up) at full size on fake tensors (``fake=False``: on
    real CPU tensors, with the same CUDA behaviours: what the planner's test compares against), in the steady state
    of the run's second phase: what the steps before leave (``_prime``) is made without running them."""
    started = time.perf_counter()
    notes: list[str] = []
    dtype = getattr(torch, module.dtype_name)
    spec = module.draw_spec()
    draws = [draw_micro_batch(spec, s, 0, 0, plan.batch, 1) for s in range(1, steps + 1)]
    with ExitStack() as stack:  # FSDP2's own sharding over a fake process group: this is rank 0's step
        mesh = stack.enter_context(fake_world(plan.ranks.world)) if plan.ranks.sharded else None
        stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext())
        stack.enter_context(cuda_behaviour())
        transformer = build_transformer(plan.architecture, dtype)
        if plan.quantization in QUANTIZED:
            emulate_quantised_base(transformer, plan.quantization, dtype)
        module._pipe = _PlanPipe(module.family_spec.pipeline_class(), plan.latent_channels)
        module.adapt_transformer(transformer)
        unsharded = full_bytes(transformer)
        if mesh is not None:
            shard_for_plan(module, mesh)
        if plan.precision.startswith(("bf16-true", "16-true")):
            module.to(torch.bfloat16 if plan.precision.startswith("bf16") else torch.float16)
        latents, cond = fake_inputs(module, plan)
        host = [k for k, v in cond.items() if fake and not is_fake(v)]
        if host:
            _collate_keeping_host(module, host)
        module.latent_cache, module.cond_cache, module.dropout_cache = [latents], [cond], [cond]
        module._trainer = _PlanTrainer()
        module._log_losses = lambda *args, **kwargs: None  # logging needs a Trainer; it allocates only scalars
        groups = [{"params": module.adapter_parameters(p), "name": p} for p in ("slow", "fast")]
        optimizer = torch.optim.AdamW(groups, lr=1e-4, foreach=False)  # as fused AdamW: no multi-tensor temps
        params = [p for g in groups for p in g["params"]]
        lora_bytes = sum(_storage_bytes(p) for p in params)
        grad_inputs = _linears_with_grad_inputs(transformer)
        tracker = PlannerMemTracker()
        tracker.track_external(transformer, latents, *cond.values())
        recorder = TraceRecorder()
        kept = ElementwiseSaved(_not_recomputed(module)) if plan.compiled else nullcontext()
        with tracker:
            _prime(optimizer, params, module.adapter_parameters(module.phase_at(1)))
            for step, batch in enumerate(draws):
                with recorder if step == steps - 1 else nullcontext():
                    module._trainer.global_step = step + 1
                    recorder.phase = "forward"
                    with _autocast(plan.precision), kept if step == steps - 1 else nullcontext():
                        loss = module.training_step(batch, step)
                    optimizer.zero_grad(set_to_none=True)
                    recorder.phase = "backward"
                    loss.backward()
                    recorder.phase = "clip"
                    if plan.gradient_clip:
                        torch.nn.utils.clip_grad_norm_(params, plan.gradient_clip)
                    recorder.phase = "optimizer"
                    optimizer.step()
                del loss
        peak = tracker.peak_breakdown()
        recomputed = [_frozen_bytes(b) for b in _checkpointed(module)]
        simulated_opt, eight_bit = optimizer_state_bytes(optimizer)
    opt = peak.get("Optstate", 0)
    total = peak.get("Total", 0)
    if plan.optimizer == "adamw8bit":
        total += eight_bit - simulated_opt
        opt = opt - simulated_opt + eight_bit
        notes.append("8-bit AdamW states by formula (bitsandbytes refuses fake tensors)")
    if plan.quantization in QUANTIZED:
        notes.append(f"{plan.quantization} base emulated on fake tensors (library storage layout and what its "
                     "backward keeps)")
    base = peak.get("Parameter", 0) + peak.get("Buffer", 0) - lora_bytes
    recomputed_by_compile = kept.saved if plan.compiled else 0
    if recomputed_by_compile:
        total -= recomputed_by_compile
        notes.append(f"regional compile: {recomputed_by_compile / GIB:.2f} GiB of elementwise outputs that eager "
                     "autograd keeps for backward are recomputed in the compiled backward instead "
                     "(planner/compiled.py)")
    if not plan.ranks.sharded and plan.ranks.world > 1:  # DDP's buckets: the LoRA gradients once more
        total += peak.get("Gradient", 0) or lora_bytes
        notes.append("ddp: each rank holds the whole base and DDP's gradient buckets (the LoRA gradients again)")
    timed = step_time(recorder.trace, plan.gpu, plan.compiled) if plan.gpu is not None else None
    if timed is not None and plan.ranks.world > 1:
        blocks = len(perf_ops.repeated_blocks(module.transformer, module.repeated_blocks))
        timed.comm_s, timed.comm = communication_s(*unsharded, blocks, plan.ranks, plan.gpu, timed.seconds)
    return StepMemory(
        peak=total, base=base, lora=lora_bytes, optimizer=opt, gradients=peak.get("Gradient", 0),
        activations=peak.get("Activation", 0) + peak.get("Temp", 0) + peak.get("Other", 0) - recomputed_by_compile,
        step_s=timed.seconds if timed is not None else None, flops=recorder.trace.flops,
        wall_s=time.perf_counter() - started, notes=notes,
        time=timed,
        recomputed_block_bytes=recomputed,
        step_s_on={g.name: step_time(recorder.trace, g, plan.compiled).seconds for g in plan.other_gpus},
        optimizer_adamw=simulated_opt, optimizer_8bit=eight_bit,
        grad_input_linear_bytes=sum(grad_inputs.values()), lora_numel=sum(p.numel() for p in params),
        trace=recorder.trace, compile_saving=recomputed_by_compile,
    )


def _prime(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], trained: list[torch.Tensor]) -> None:
    """What the steps before leave for a step of the second phase (the peak of the run): AdamW's states of both
    adapters (the first phase's stay, its adapter trained), made by one optimizer step on zero gradients, and the
    gradients of the adapter this step trains (``zero_grad`` runs after the next forward, as in Lightning's
    closure)."""
    for param in params:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    kept = {id(p) for p in trained}
    for param in params:
        if id(param) not in kept:
            param.grad = None


def _not_recomputed(module: Any) -> list[torch.nn.Module]:
    """The repeated blocks the checkpointing share leaves out (they keep their activations for backward)."""
    chosen = {id(b) for b in _checkpointed(module)}
    return [b for b in perf_ops.repeated_blocks(module.transformer, module.repeated_blocks) if id(b) not in chosen]


def _checkpointed(module: Any) -> list[torch.nn.Module]:
    """The repeated blocks the module's checkpointing share selects (after ``adapt_transformer``)."""
    blocks = perf_ops.repeated_blocks(module.transformer, module.repeated_blocks)
    share = float(module.perf.gradient_checkpointing)
    return [blocks[i] for i in perf_ops.chosen_for_checkpointing(len(blocks), share)]


def _frozen_bytes(block: torch.nn.Module) -> int:
    """Device bytes of a block's frozen parameters and buffers (what block offloading moves to the host)."""
    frozen = [p for n, p in block.named_parameters() if "lora_" not in n] + list(block.buffers())
    return sum(_storage_bytes(t) for t in frozen)


def _storage_bytes(tensor: torch.Tensor) -> int:
    """Allocated bytes of ``tensor``'s storage (a sharded DTensor's: this rank's shard)."""
    from torch.distributed.tensor import DTensor

    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return _rounded(local.untyped_storage().nbytes())
