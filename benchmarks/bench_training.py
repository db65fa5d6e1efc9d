"""Time one Glance training step through our LightningModule against a plain diffusers + peft loop.

Everything runs in ONE process on the same weights from the same folder, one variant after the other, so
the ratios are measured in the same run:
- reference: the loop of the diffusers LoRA examples (train_dreambooth_lora_*.py): the transformer from
  ``from_pretrained``, one peft adapter via ``add_adapter``, torch's AdamW, precomputed embeddings and
  latents, ``loss.item()`` logged each step; ``reference-ckpt`` adds ``enable_gradient_checkpointing()``.
  Its forward is the family's pack/call/unpack (the same maths the examples write out).
- glance variants: ``Trainer.fit`` of our family module with the options named below, the step measured
  between consecutive ``on_train_batch_end`` calls (Lightning's own overhead included).

Seconds per step are medians after warm-up; peak GiB is ``torch.cuda.max_memory_allocated`` over the timed
steps, "fit peak" also over loading, encoding and the warm-up steps (CUDA only). ``--full-size`` builds the
registry's real transformer architecture (FLUX.1-dev, Qwen-Image, SD3.5-Large: what ``plan`` simulates) once
with random weights and hands it to every variant from memory (``full_size.py``); latents and prompt embeddings
come at the real widths from the family's planner hooks (``--text-tokens`` tokens), the tiny VAE and text
encoders being only stood in for.

    python benchmarks/bench_training.py --family flux                              # tiny, CPU
    python benchmarks/bench_training.py --family flux --full-size --device cuda --dtype bfloat16 --size 1024
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from glance_lightning.datamodules.glance import GlanceDataModule
from peft import LoraConfig

from glance_lightning.families import family_class
from glance_lightning.settings import LoraSettings, OptimizerSettings, PerformanceSettings
from glance_lightning.tiny import build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_size  # noqa: E402

SAMPLE = Path(__file__).resolve().parents[1] / "glance_lightning" / "assets" / "samples" / "t2i"
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "ckpt": {"gradient_checkpointing": 1.0},
    "ckpt-half": {"gradient_checkpointing": 0.5},
    "ckpt-save-matmuls": {"gradient_checkpointing": 1.0, "checkpoint_policy": "save-matmuls"},
    "compile": {"compile_blocks": True},
    "compile+ckpt-half": {"compile_blocks": True, "gradient_checkpointing": 0.5},
    "compile+ckpt": {"compile_blocks": True, "gradient_checkpointing": 1.0},  # the plain loop's checkpointed memory
    "fp8": {"base_quantization": "float8-dynamic"},
    "int8+ckpt+adamw8bit": {"base_quantization": "int8-weight-only", "gradient_checkpointing": 1.0,
                            "optimizer": "adamw8bit"},
    "nf4+ckpt+adamw8bit": {"base_quantization": "nf4", "gradient_checkpointing": 1.0, "optimizer": "adamw8bit"},
    # Frozen weights of the recomputed blocks in pinned host memory, one block per transfer, prefetched on a side
    # stream (GPU only; on a CPU host and device are one and nothing moves).
    "offload+ckpt": {"offload": "block", "gradient_checkpointing": 1.0},
}
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_memory(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


class StepTimer(L.Callback):
    """Wall time between consecutive ends of training steps, with the device synchronised."""

    def __init__(self, warmup: int, device: str) -> None:
        self.warmup, self.device = warmup, device
        self.times: list[float] = []
        self.peak = self.setup_peak = float("nan")
        self._last: float | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        sync(self.device)
        now = time.perf_counter()
        if trainer.global_step == self.warmup:
            self.setup_peak = peak_gib(self.device)  # loading, encoding and the warm-up steps
            reset_memory(self.device)
            now = time.perf_counter()  # the collection above is not the next step's time (as in run_reference)
        elif trainer.global_step > self.warmup and self._last is not None:
            self.times.append(now - self._last)
        self._last = now
        if trainer.global_step > self.warmup:
            self.peak = peak_gib(self.device)


def module_for(args: argparse.Namespace, model: Path, options: dict[str, Any]) -> Any:
    """Our family module as every variant configures it; with ``args.arch`` (a full-size run) it encodes at that
    architecture's widths."""
    options = dict(options)
    optimizer = OptimizerSettings(name=options.pop("optimizer", "adamw"), lr=1e-4, warmup_steps=1)
    steps = args.warmup + args.steps
    module = family_class(args.family)(
        pretrained_model=str(model), slow_steps=steps, fast_steps=0, torch_dtype=args.dtype,
        lora=LoraSettings(rank=args.rank, alpha=args.rank, targets=["to_q", "to_k", "to_v", "to_out.0"]),
        optimizer=optimizer, performance=PerformanceSettings(**options), encode_cache=None,
    )
    if getattr(args, "arch", None) is not None:
        full_size.real_width_inputs(module, args.arch, args.text_tokens)
    return module


def run_glance(args: argparse.Namespace, model: Path, options: dict[str, Any],
               callbacks: tuple[L.Callback, ...] = ()) -> tuple[list[float], float, float]:
    """``callbacks`` run after the step timer (benchmarks/step_profile.py's marks, for one)."""
    module = module_for(args, model, options)
    timer = StepTimer(args.warmup, args.device)
    with tempfile.TemporaryDirectory() as out:
        module.lora_dir = Path(out) / "loras"
        trainer = L.Trainer(
            accelerator="cuda" if args.device.startswith("cuda") else "cpu", devices=1, max_steps=-1,
            logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            callbacks=[timer, *callbacks], default_root_dir=out, precision=getattr(args, "precision", "32-true"),
            gradient_clip_val=getattr(args, "clip", None),
        )
        data = GlanceDataModule(str(SAMPLE), resolution=args.size, size_multiple=16)
        trainer.fit(module, datamodule=data)
    del module, trainer
    return timer.times, timer.peak, max(timer.peak, timer.setup_peak)


def run_reference(args: argparse.Namespace, model: Path, checkpointing: bool,
                  profiler: Any = None) -> tuple[list[float], float, float]:
    """The diffusers examples' loop around the same transformer forward (under bf16 autocast where
    ``args.precision`` is bf16-mixed, as ``accelerate --mixed_precision bf16`` runs it); ``profiler`` (a
    benchmarks/step_profile.StepProfiler) is told where each step and phase starts."""
    module = module_for(args, model, {})
    module.load_base_model(with_adapters=False)
    device = torch.device(args.device)
    module.to(device)
    data = GlanceDataModule(str(SAMPLE), resolution=args.size, size_multiple=16)
    data.setup("fit")
    item = data.train_samples[0]
    with module.encoders_on_device():
        latents = module.encode_sample_latents(item).to(device)
        cond = {k: v.to(device) for k, v in module.conditioning_for(item.caption).items()}
    transformer = module.transformer
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    transformer.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian",
                                       target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sigmas = torch.tensor(module.glance_timesteps.slow)
    autocast = torch.autocast(device.type, torch.bfloat16) if getattr(args, "precision", "") == "bf16-mixed" \
        else contextlib.nullcontext()
    times: list[float] = []
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            setup_peak = peak_gib(args.device)
            reset_memory(args.device)
        sync(args.device)
        start = time.perf_counter()
        if profiler is not None:
            profiler.step_started(step)
        noise = torch.randn_like(latents)
        sigma = sigmas[torch.randint(len(sigmas), (1,))].to(device)
        noisy = (1 - sigma) * latents + sigma * noise
        with autocast:
            pred = module.predict_velocity(noisy, sigma, cond)
        loss = torch.nn.functional.mse_loss(pred.float(), (noise - latents).float())
        if profiler is not None:
            profiler.marks.enter("backward")
        loss.backward()
        if profiler is not None:
            profiler.marks.enter("optimizer")
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # the examples log the loss every step
        sync(args.device)
        if profiler is not None:
            profiler.step_ended(step)
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    peak = peak_gib(args.device)
    del module, transformer, optimizer, params
    return times, peak, max(peak, setup_peak)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", default="flux")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--full-size", action="store_true")
    parser.add_argument("--text-tokens", type=int, default=512, help="text tokens of a --full-size run")
    parser.add_argument("--variants", default="reference,reference-ckpt,default,ckpt,ckpt-save-matmuls",
                        help=f"comma list of reference, reference-ckpt and {', '.join(VARIANTS)}")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default); 1 keeps CPU timings stable on a busy machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS and n not in ("reference", "reference-ckpt")]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    rows = []
    args.arch = full_size.architecture(args.family) if args.full_size else None
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        model = build_tiny_model(args.family, Path(tmp) / "model")
        if args.full_size:
            kept = full_size.KeptTransformer(args.arch, args.device, getattr(torch, args.dtype))
            stack.enter_context(full_size.serving(kept, Path(tmp)))
        for name in names:
            reset_memory(args.device)
            try:
                if name.startswith("reference"):
                    times, peak, fit_peak = run_reference(args, model, checkpointing=name == "reference-ckpt")
                else:
                    times, peak, fit_peak = run_glance(args, model, VARIANTS[name])
                rows.append((name, statistics.median(times), peak, fit_peak, ""))
            except Exception as err:  # one variant failing (e.g. fp8 on an old GPU) must not lose the table
                nan = float("nan")
                rows.append((name, nan, nan, nan, f"{type(err).__name__}: {str(err)[:80]}"))
            print(f"{name}: done", flush=True)
    reference = next((row[1] for row in rows if row[0] == "reference"), float("nan"))
    print(f"\n{args.family} {'full-size random' if args.full_size else 'tiny'}, {args.size}x{args.size}, "
          f"{args.device}, {args.dtype}, rank {args.rank}, median of {args.steps} steps after {args.warmup}")
    print(f"| {'variant':22s} | s/step | peak GiB | fit peak GiB | vs reference | note")
    print(f"|{'-' * 24}|--------|----------|--------------|--------------|-----")
    for name, seconds, peak, fit_peak, note in rows:
        print(f"| {name:22s} | {seconds:6.3f} | {peak:8.2f} | {fit_peak:12.2f} | {reference / seconds:11.2f}x | {note}")


if __name__ == "__main__":
    main()
