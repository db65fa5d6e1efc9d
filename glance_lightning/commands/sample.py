"""The ``sample`` command: base model + Slow LoRA + Fast LoRA -> images, over the exact chain.

One model load, both adapters loaded once (as named adapters through the pipeline's own
``load_lora_weights``, so files from other tools and the official releases load too), the adapter switched
at the boundary, PNGs written atomically with their settings in the PNG text, time per phase reported.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from glance_lightning.performance import QUANTIZATIONS, check_performance_settings
from glance_lightning.registry import family_names, get_family
from glance_lightning.sampling import PLANS, Step
from glance_lightning.settings import OptimizerSettings, PerformanceSettings, TimestepSettings
from glance_lightning.timesteps import GlanceTimesteps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glance_lightning sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers model folder, or tiny:<family>")
    p.add_argument("--slow", required=True, help="Slow LoRA: our output folder or a .safetensors file")
    p.add_argument("--fast", required=True, help="Fast LoRA: our output folder or a .safetensors file")
    p.add_argument("--family", choices=family_names(), help="needed only for LoRAs without Glance metadata")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--negative-prompt", default=None, help="for families with classifier-free guidance")
    p.add_argument("--seed", type=int, action="append", help="repeat for several seeds (default 0)")
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale (SD3, Qwen true CFG); FLUX.1-dev uses its guidance embedding (--guidance)")
    p.add_argument("--guidance", type=float, default=None, help="FLUX.1-dev guidance embedding (default: as trained)")
    p.add_argument("--control", action="append", default=[], help="control image(s) for edit families")
    p.add_argument("--mode", choices=tuple(PLANS), default="exact",
                   help="exact chain (default) or the official Qwen Glance pipelines' arithmetic")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    p.add_argument("--attention-backend", default="sdpa", help="as model.performance.attention_backend")
    p.add_argument("--base-quantization", default="none", choices=QUANTIZATIONS,
                   help="load the transformer quantised (torchao / bitsandbytes), to fit smaller cards")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", required=True, help="output folder (existing files are never overwritten)")
    return p


def _fail(message: str) -> int:
    print(f"sample: error: {message}", file=sys.stderr)
    return 2


def performance_settings(args: argparse.Namespace) -> PerformanceSettings:
    """The speed/memory options of a ``sample`` call (defaults where a caller's namespace lacks them)."""
    return PerformanceSettings(attention_backend=getattr(args, "attention_backend", "sdpa"),
                               base_quantization=getattr(args, "base_quantization", "none"))


def load_sampler(args: argparse.Namespace) -> tuple[Any, dict]:
    """Build the family module around one ``from_pretrained`` and load both LoRAs into it."""
    from glance_lightning.inference import load_glance_loras, pair_timesteps, read_pair_metadata
    from glance_lightning.schedules import derive_timesteps

    slow_meta, fast_meta = read_pair_metadata(args.slow, args.fast)
    family = (slow_meta or {}).get("family") or args.family
    if family is None:
        raise ValueError("--family is required: these LoRAs carry no Glance metadata naming their family")
    if slow_meta and args.family and args.family != family:
        raise ValueError(f"--family {args.family} but the LoRAs were trained for {family}")
    spec = get_family(family)
    low, high = spec.control_images
    if not low <= len(args.control) <= high:
        wanted = "no --control images" if high == 0 else f"{low} to {high} --control image(s)"
        raise ValueError(f"{family} takes {wanted}, got {len(args.control)}")
    fallback = None
    if not (slow_meta and fast_meta):
        lists = derive_timesteps(family)
        fallback = GlanceTimesteps.from_lists(lists["slow"], lists["fast"], "timesteps")
    chain = pair_timesteps(slow_meta, fast_meta, fallback)
    lists = chain.as_timesteps()
    kwargs: dict[str, Any] = dict((slow_meta or {}).get("family_options") or {})
    if args.guidance is not None:
        if family != "flux":
            raise ValueError(f"--guidance is FLUX.1-dev's guidance embedding; {family} uses --guidance-scale")
        kwargs["guidance"] = args.guidance
    module = spec.module_class()(
        pretrained_model=args.model, timesteps=TimestepSettings(slow=lists["slow"], fast=lists["fast"]),
        torch_dtype=args.dtype, performance=performance_settings(args), **kwargs,
    )
    module.load_base_model(with_adapters=False)
    module.to(args.device)
    load_glance_loras(module.pipe, args.slow, args.fast, chain)
    info = {"family": family, "schedule": lists, "from_metadata": bool(slow_meta and fast_meta)}
    return module, info


def run_sample_command(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        return _fail(f"--output {out_dir} exists and is not a folder")
    missing = [c for c in args.control if not Path(c).is_file()]
    if missing:
        return _fail(f"--control: no such file(s): {', '.join(missing)}")
    try:
        check_performance_settings(performance_settings(args), OptimizerSettings())
    except (ValueError, RuntimeError, ImportError) as err:
        message = str(err).replace("model.performance.attention_backend", "--attention-backend")
        return _fail(message.replace("model.performance.base_quantization", "--base-quantization"))
    try:
        module, info = load_sampler(args)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    rounded = {phase: [round(t, 4) for t in lists] for phase, lists in info["schedule"].items()}
    print(f"family {info['family']}; chain {json.dumps(rounded)} "
          f"({'from the LoRA metadata' if info['from_metadata'] else 'derived: the LoRAs carry no schedule'})")
    written = generate_images(module, args, info)
    for path, timing in written:
        print(f"{path}  slow {timing['slow']:.3f}s  fast {timing['fast']:.3f}s")
    return 0


def generate_images(module: Any, args: argparse.Namespace, info: dict) -> list[tuple[Path, dict]]:
    from glance_lightning.callbacks.samples import save_png_atomic, to_pil
    from glance_lightning.datamodules.glance import load_pixels

    area = round((args.width * args.height) ** 0.5)
    controls = tuple(load_pixels(Path(c), _control_size(Path(c), area)) for c in args.control)
    scale = args.guidance_scale if args.guidance_scale is not None else 1.0
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for p_index, prompt in enumerate(args.prompt):
        for seed in args.seed or [0]:
            timing = {"slow": 0.0, "fast": 0.0}
            latents = _timed_generate(module, prompt, seed, args, scale, controls, timing)
            image = to_pil(module.decode_to_images(latents)[0])
            path = _free_path(out_dir, f"p{p_index}_s{seed}")
            text = {"prompt": prompt, "seed": seed, "height": args.height, "width": args.width, "mode": args.mode,
                    "guidance_scale": scale, "negative_prompt": args.negative_prompt, "model": args.model,
                    "slow": args.slow, "fast": args.fast, "controls": args.control, **info, "seconds": timing}
            save_png_atomic(image, path, {"glance": json.dumps(text)})
            written.append((path, timing))
    return written


def _control_size(path: Path, area: int) -> tuple[int, int]:
    """A control image keeps its own aspect ratio at about the output's area (the family resizes it further)."""
    from PIL import Image

    from glance_lightning.datamodules.glance import target_size

    with Image.open(path) as img:
        return target_size(img.width, img.height, area, 16)


def _timed_generate(module: Any, prompt: str, seed: int, args: argparse.Namespace, scale: float,
                    controls: tuple, timing: dict) -> torch.Tensor:
    clock = {"t": time.perf_counter()}

    def on_step(i: int, step: Step, x: torch.Tensor) -> None:
        if x.is_cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        timing[step.adapter or "slow"] += now - clock["t"]
        clock["t"] = now

    return module.generate_latents(prompt, seed, args.height, args.width, scale, args.negative_prompt, controls,
                                   mode=args.mode, on_step=on_step)


def _free_path(folder: Path, stem: str) -> Path:
    """``stem.png``, or ``stem-1.png``, ... : an existing image is never overwritten."""
    path, n = folder / f"{stem}.png", 0
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.png"
    return path
