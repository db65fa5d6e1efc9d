"""Peak host memory (RSS) of a fit: everything loaded at once (how glance_lightning loaded before) vs staged.

One run builds a FLUX-architecture pipeline with random float32 weights in which the T5 text encoder and the
transformer are each a few GB in bfloat16 (``--t5-layers``, ``--transformer-layers``; the rest is the tiny FLUX),
then fits it in bfloat16 twice, each in a fresh process so the peaks do not mix:
- ``all at once`` (how glance_lightning loaded before): the whole pipeline loaded before encoding, the text
  encoders kept in host memory after it (``load_base_model()`` before ``fit``, encoders not freed);
- ``staged``: ``fit`` as it runs now: VAE + text encoders, encode, free the text encoders, then the transformer.
Loading converts every weight (float32 on disk, bfloat16 in memory), so each component is anonymous memory from
the moment it is loaded, as it is on a GPU machine once a component has been to the device and back, or with a
base quantised on load. (Same-dtype safetensors on a CPU stay memory-mapped: the kernel can drop those pages, and
neither way then holds much anonymous memory.) Each child reports its peak RSS (``ru_maxrss``, which also counts
the memory-mapped file pages read while converting) and its peak anonymous memory (``RssAnon``, sampled every
10 ms: what the kernel cannot reclaim, so what gets a process killed).
Each child reports its own peak RSS (``ru_maxrss``). The table gives the component sizes on disk, each peak and
the staged peak over the largest component. Below it, the host peaks of FLUX.1-dev and Qwen-Image in bf16
predicted from their real component sizes (parameter counts; arithmetic, not measured).

    python benchmarks/bench_host_memory.py                         # 4.6 and 3.4 GiB components, a few minutes
    python benchmarks/bench_host_memory.py --t5-layers 2 --transformer-layers 1 --width 256   # seconds
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SAMPLE = Path(__file__).resolve().parents[1] / "glance_lightning" / "assets" / "samples" / "t2i"
GIB = 2**30
# Parameter counts of the real components (bf16 = 2 bytes each): FLUX.1-dev transformer, T5-XXL encoder,
# CLIP-L text model, FLUX VAE; Qwen-Image transformer, Qwen2.5-VL-7B, Qwen-Image VAE.
REAL = {
    "FLUX.1-dev": {"transformer": 11.90e9, "text encoders": 4.76e9 + 0.12e9, "vae": 0.084e9},
    "Qwen-Image": {"transformer": 20.43e9, "text encoders": 8.29e9, "vae": 0.127e9},
}


def build(root: Path, width: int, t5_layers: int, transformer_layers: int) -> Path:
    """The tiny FLUX pipeline with a wide T5 and a wide, deeper transformer (random float32 weights)."""
    from diffusers import FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from glance_lightning.tiny import tiny_model_path

    model = root / "flux-wide"
    shutil.copytree(tiny_model_path("tiny:flux"), model)
    t5 = T5Config.from_pretrained(model / "text_encoder_2")
    t5.update({"d_model": width, "d_ff": 4 * width, "num_layers": t5_layers, "num_heads": width // 64,
               "d_kv": 64})
    torch.manual_seed(0)
    shutil.rmtree(model / "text_encoder_2")
    T5EncoderModel(t5).save_pretrained(model / "text_encoder_2")
    config = dict(FluxTransformer2DModel.load_config(model / "transformer"))
    config.update({"num_layers": transformer_layers, "num_single_layers": 2 * transformer_layers,
                   "attention_head_dim": 128, "num_attention_heads": width // 128, "joint_attention_dim": width,
                   "axes_dims_rope": [16, 56, 56]})
    shutil.rmtree(model / "transformer")
    FluxTransformer2DModel.from_config(config).save_pretrained(model / "transformer")
    return model


def anonymous_gib() -> float:
    """Anonymous resident memory now (RssAnon): what the kernel cannot reclaim, unlike memory-mapped weights."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def child(model: Path, staged: bool, out: Path) -> None:
    import threading
    import time

    import lightning as L
    from glance_lightning.datamodules.glance import GlanceDataModule

    from glance_lightning.families.flux import FluxGlance

    module = FluxGlance(pretrained_model=str(model), timesteps={"slow": [1.0], "fast": [0.5]}, slow_steps=1,
                        fast_steps=1, max_sequence_length=16, output_dir=str(out / "loras"), encode_cache=None,
                        torch_dtype="bfloat16")
    if not staged:
        module.load_base_model()  # the whole pipeline in host memory at once, and kept there
        module.free_text_encoders = lambda: None
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=out)
    peak, done = [0.0], threading.Event()

    def watch() -> None:  # the kernel keeps no peak of anonymous memory: sample it
        while not done.is_set():
            peak[0] = max(peak[0], anonymous_gib())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    trainer.fit(module, GlanceDataModule(path=str(SAMPLE), resolution=64))
    done.set()
    watcher.join()
    print(json.dumps({"peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
                      "peak_anonymous_gib": peak[0]}))


def bf16_gib(path: Path) -> float:
    """A float32 component's size once loaded in bfloat16."""
    return sum(f.stat().st_size for f in path.rglob("*.safetensors")) / GIB / 2


def predicted_rows() -> list[str]:
    rows = []
    for name, sizes in REAL.items():
        gib = {k: v * 2 / GIB for k, v in sizes.items()}
        before = sum(gib.values())
        after = max(gib["text encoders"] + gib["vae"], gib["transformer"] + gib["vae"])
        rows.append(f"| {name} (bf16, predicted) | {gib['transformer']:.1f} | {gib['text encoders']:.1f} | "
                    f"{before:.1f} | {after:.1f} | {after / max(gib.values()):.2f} |")
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=3072)
    parser.add_argument("--t5-layers", type=int, default=12)
    parser.add_argument("--transformer-layers", type=int, default=4)
    parser.add_argument("--keep", action="store_true", help="keep the built model in the temporary folder")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="glance-host-memory-"))
    try:
        model = build(root, args.width, args.t5_layers, args.transformer_layers)
        sizes = {c: bf16_gib(model / c) for c in ("transformer", "text_encoder_2", "text_encoder", "vae")}
        results = []
        for label, staged in (("all at once", False), ("staged", True)):
            out = root / label.replace(" ", "-")
            run = subprocess.run([sys.executable, __file__, "--child", str(model), str(int(staged)), str(out)],
                                 capture_output=True, text=True, check=True)
            results.append({"variant": label, **json.loads(run.stdout.strip().splitlines()[-1])})
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    largest = max(sizes.values())
    print(f"\nFLUX-architecture pipeline, random weights; components in bfloat16: "
          f"transformer {sizes['transformer']:.2f} GiB, T5 {sizes['text_encoder_2']:.2f} GiB, "
          f"CLIP {sizes['text_encoder']:.2f} GiB, VAE {sizes['vae']:.3f} GiB\n")
    print("| loading | peak RSS (GiB) | peak anonymous (GiB) | anonymous peak / largest component |")
    print("| --- | --- | --- | --- |")
    for r in results:
        print(f"| {r['variant']} | {r['peak_rss_gib']:.2f} | {r['peak_anonymous_gib']:.2f} | "
              f"{r['peak_anonymous_gib'] / largest:.2f} |")
    print("\n| model | transformer (GiB) | text encoders (GiB) | all at once (GiB) | staged (GiB) | staged / largest |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(predicted_rows()))
    return results


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        child(Path(sys.argv[2]), sys.argv[3] == "1", Path(sys.argv[4]))
    else:
        main()
