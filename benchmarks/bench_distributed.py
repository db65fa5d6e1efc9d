"""Per-rank memory and step time of a fit on 1 process and sharded over 2 (``strategy: fsdp2``), on this machine.

Builds a FLUX-architecture model whose transformer is wide (random float32 weights, ``--width``, ``--layers``; the
rest is the tiny FLUX), then fits it in bfloat16 through the real command line, each run in fresh processes:
- ``1 process``: the whole base on one device (``strategy: auto``);
- ``2 processes``: ``strategy: fsdp2``: each rank builds the transformer on the meta device and reads only its rows
  of every weight (``glance_lightning.shard_loading``), so no rank ever holds the whole base in host memory;
- ``2 processes, whole reads``: the same with the transformer given as one file (``model.transformer``), which every
  rank reads whole before FSDP2 keeps its shard (how every sharded fit loaded before).
Each rank reports (benchmarks/distributed_probe.py) its peak RSS, its peak anonymous memory (what the kernel cannot
reclaim: memory-mapped weight files are not in it), its device peak on a GPU (on a CPU the host is the device) and
its median seconds per training step; the anonymous peak is given until training starts (loading) and over the
whole fit (training adds the blocks FSDP2 gathers). On the CPU the processes share the machine's cores and gloo
moves every gathered block through host memory: the step times say what sharding costs here, not what N GPUs gain.

    python benchmarks/bench_distributed.py                                   # a 0.8 GiB (bf16) transformer, minutes
    python benchmarks/bench_distributed.py --width 512 --layers 1 --steps 2  # seconds
    python benchmarks/bench_distributed.py --accelerator gpu --devices 2     # on a machine with 2 GPUs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "glance_lightning" / "assets" / "samples" / "t2i"
GIB = 2**30

CONFIG = """seed_everything: 0
trainer:
  accelerator: {accelerator}
  devices: {devices}
  strategy: {strategy}
  precision: bf16-mixed
  default_root_dir: {root}
  enable_progress_bar: false
  enable_checkpointing: false
  logger: false
  callbacks:
    - class_path: distributed_probe.RankProbe
      init_args: {{folder: {probe}}}
model:
  class_path: glance_lightning.families.flux.FluxGlance
  init_args:
    pretrained_model: {model}
    torch_dtype: bfloat16
    timesteps: {{slow: [1000.0, 943.1], fast: [677.9, 60.5]}}
    slow_steps: {slow}
    fast_steps: {fast}
    lora: {{rank: 16, alpha: 16}}
    max_sequence_length: 16
    encode_cache: {cache}
data:
  class_path: glance_lightning.datamodules.glance.GlanceDataModule
  init_args: {{path: {sample}, resolution: {resolution}, size_multiple: 16}}
"""


def build(root: Path, width: int, layers: int) -> Path:
    """The tiny FLUX pipeline with a wide transformer (random float32 weights, one safetensors file)."""
    from diffusers import FluxTransformer2DModel

    from glance_lightning.tiny import tiny_model_path

    model = root / "flux-wide"
    shutil.copytree(tiny_model_path("tiny:flux"), model)
    config = dict(FluxTransformer2DModel.load_config(model / "transformer"))
    config.update({"num_layers": layers, "num_single_layers": 2 * layers, "attention_head_dim": 128,
                   "num_attention_heads": width // 128, "axes_dims_rope": [16, 56, 56]})
    shutil.rmtree(model / "transformer")
    torch.manual_seed(0)
    FluxTransformer2DModel.from_config(config).save_pretrained(model / "transformer", max_shard_size="20GB")
    return model


def fit(root: Path, model: Path, name: str, devices: int, strategy: str, args: argparse.Namespace,
        *extra: str) -> list[dict]:
    """One fit through the command line; every rank's probe record."""
    folder = root / name
    config = folder / "fit.yaml"
    folder.mkdir(parents=True)
    config.write_text(CONFIG.format(accelerator=args.accelerator, devices=devices, strategy=strategy,
                                    root=folder / "runs", probe=folder / "probe", model=model,
                                    slow=args.steps, fast=args.steps, cache=folder / "cache", sample=SAMPLE,
                                    resolution=args.resolution))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parent)}
    env.pop("GLANCE_LIGHTNING_RUN_DIR", None)
    done = subprocess.run([sys.executable, "-m", "glance_lightning", "fit", "--config", str(config), *extra],
                          capture_output=True, text=True, env=env, cwd=folder, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{name}: the fit failed (rc {done.returncode}):\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return [json.loads(p.read_text()) for p in sorted((folder / "probe").glob("rank*.json"))]


def row(name: str, record: dict) -> str:
    steps = record["step_s"][1:] or record["step_s"]  # the first step warms up
    device = "host" if record["device_peak_gib"] is None else f"{record['device_peak_gib']:.2f}"
    return (f"| {name} | {record['rank']} | {record['peak_rss_gib']:.2f} | {record['load_anonymous_gib']:.2f} | "
            f"{record['peak_anonymous_gib']:.2f} | {device} | {statistics.median(steps):.3f} |")


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=1024, help="transformer width (a multiple of 128)")
    parser.add_argument("--layers", type=int, default=6, help="double blocks (single blocks: twice as many)")
    parser.add_argument("--steps", type=int, default=3, help="steps per phase")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2, help="processes of the sharded run")
    parser.add_argument("--timeout", type=int, default=1800)
    parser.add_argument("--keep", action="store_true", help="keep the built model and the runs")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="glance-distributed-"))
    try:
        model = build(root, args.width, args.layers)
        base_gib = sum(f.stat().st_size for f in (model / "transformer").glob("*.safetensors")) / GIB / 2
        one_file = root / "transformer.safetensors"
        shutil.copy(model / "transformer" / "diffusion_pytorch_model.safetensors", one_file)
        sharded = f"{args.devices} processes (fsdp2)"
        results = {"1 process": fit(root, model, "one", 1, "auto", args),
                   sharded: fit(root, model, "sharded", args.devices, "fsdp2", args),
                   f"{sharded}, whole reads": fit(root, model, "whole", args.devices, "fsdp2", args,
                                                  "--model.init_args.transformer", str(one_file))}
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\nFLUX-architecture transformer, random weights: {base_gib:.2f} GiB in bfloat16 (float32 on disk); "
          f"{args.accelerator}, {args.resolution}px, LoRA r16, {2 * args.steps} steps\n")
    print("| run | rank | peak RSS (GiB) | anonymous, loading (GiB) | anonymous, whole fit (GiB) | device peak (GiB) "
          "| median s/step |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, records in results.items():
        for record in records:
            print(row(name, record))
    one = results["1 process"][0]["load_anonymous_gib"]
    for name in (sharded, f"{sharded}, whole reads"):
        largest = max(r["load_anonymous_gib"] for r in results[name])
        print(f"\n{name}: largest rank's anonymous peak while loading / 1 process's: {largest / one:.2f}")
    return results


if __name__ == "__main__":
    main()
