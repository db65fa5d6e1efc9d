"""The ``sample`` command: base model + Slow LoRA + Fast LoRA -> images, over the exact chain.

One model load, both adapters loaded once (as named adapters through the pipeline's own
``load_lora_weights``, so files from other tools and the official releases load too), the adapter switched
at the boundary, PNGs written atomically with their settings in the PNG text, time per phase reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from glance_lightning import console, errors
from glance_lightning.atomic import remove_leftovers
from glance_lightning.commands.sample_checks import DTYPES, check_guidance, check_model, check_options, check_size
from glance_lightning.errors import ConfigError
from glance_lightning.performance import QUANTIZATIONS, check_performance_settings
from glance_lightning.registry import family_names, get_family
from glance_lightning.run_folder import check_destination
from glance_lightning.sampling import PLANS, Step
from glance_lightning.settings import OptimizerSettings, PerformanceSettings, TimestepSettings
from glance_lightning.texts import UndecodableText, read_text
from glance_lightning.timesteps import GlanceTimesteps

if TYPE_CHECKING:
    from glance_lightning.model_schedule import ModelSchedule


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glance_lightning sample", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="diffusers model folder, or tiny:<family>")
    p.add_argument("--slow", required=True, help="Slow LoRA: our output folder or a .safetensors file")
    p.add_argument("--fast", required=True, help="Fast LoRA: our output folder or a .safetensors file")
    p.add_argument("--family", choices=family_names(), help="needed only for LoRAs without Glance metadata")
    p.add_argument("--allow-mixed-pair", action="store_true",
                   help="sample a Slow and a Fast LoRA of two runs (other run, base model or lists), each over its "
                        "own list; refused by default")
    p.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    p.add_argument("--prompt-file", default=None, metavar="PATH",
                   help="a text file of prompts, one per line (blank lines skipped), after any --prompt")
    p.add_argument("--negative-prompt", default=None, help="for families with classifier-free guidance")
    p.add_argument("--seed", type=int, action="append", help="repeat for several seeds (default 0)")
    p.add_argument("--height", type=int, default=None,
                   help="default: the LoRAs' training resolution (their metadata), else 1024")
    p.add_argument("--width", type=int, default=None,
                   help="default: the LoRAs' training resolution (their metadata), else 1024")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance scale, for families guided that way (docs/families.md, "
                        "'guidance at sampling'; e.g. SD3, Qwen-Image's true CFG)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance embedding value, for guidance-distilled families (e.g. FLUX.1-dev); default: as "
                        "trained")
    p.add_argument("--control", action="append", default=[], help="control image(s) for edit families")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="multiplies both LoRAs' trained weight change (files without alpha load at 1.0 x this)")
    p.add_argument("--mode", choices=tuple(PLANS), default="exact",
                   help="exact chain (default) or the official Qwen Glance pipelines' arithmetic")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32", choices=DTYPES)
    p.add_argument("--attention-backend", default="sdpa", help="as model.performance.attention_backend")
    p.add_argument("--base-quantization", default="none", choices=QUANTIZATIONS,
                   help="load the transformer quantised (torchao / bitsandbytes), to fit smaller cards")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", required=True, help="output folder (existing files are never overwritten)")
    return p


def _fail(message: str) -> int:
    return errors.report(message, "sample", traceback_hint=False)


def performance_settings(args: argparse.Namespace) -> PerformanceSettings:
    """The speed/memory options of a ``sample`` call (defaults where a caller's namespace lacks them)."""
    return PerformanceSettings(attention_backend=getattr(args, "attention_backend", "sdpa"),
                               base_quantization=getattr(args, "base_quantization", "none"))


def default_size(args: argparse.Namespace, metadata: dict[str, dict | None]) -> tuple[int, int]:
    """(height, width): as given, else the LoRAs' training resolution from their metadata, else 1024."""
    trained = next((m.get("resolution") for m in metadata.values() if m and m.get("resolution")), None)
    fallback = int(trained) if trained else 1024
    height, width = getattr(args, "height", None), getattr(args, "width", None)
    return (height if height is not None else fallback), (width if width is not None else fallback)


def load_sampler(args: argparse.Namespace) -> tuple[Any, dict]:
    """Build the family module, load its base model (in stages when ``args.prompt`` lists the prompts: encoded
    first, text encoders freed, then the transformer) and both LoRAs into it."""
    from glance_lightning.inference import load_glance_loras, pair_differences, pair_timesteps, read_pair_metadata
    from glance_lightning.model_schedule import schedule_notice

    allow_mixed = getattr(args, "allow_mixed_pair", False)
    slow_meta, fast_meta = read_pair_metadata(args.slow, args.fast, allow_mixed)
    family = (slow_meta or {}).get("family") or args.family
    if family is None:
        raise ConfigError("--family is required: these LoRAs carry no Glance metadata naming their family")
    if slow_meta and args.family and args.family != family:
        raise ConfigError(f"--family {args.family} but the LoRAs were trained for {family}")
    check_model(args.model, family, {"slow": slow_meta, "fast": fast_meta})
    spec = get_family(family)
    low, high = spec.control_images
    if not low <= len(args.control) <= high:
        wanted = "no --control images" if high == 0 else f"{low} to {high} --control image(s)"
        raise ConfigError(f"{family} takes {wanted}, got {len(args.control)}")
    fallback = None
    if not (slow_meta and fast_meta):  # the default derivation, off the loaded model's own schedule
        lists = model_schedule_of(args.model, family).derive(family)
        fallback = GlanceTimesteps.from_lists(lists["slow"], lists["fast"], "timesteps")
    chain = pair_timesteps(slow_meta, fast_meta, fallback)
    lists = chain.as_timesteps()
    kwargs: dict[str, Any] = dict((slow_meta or {}).get("family_options") or {})
    check_guidance(args, spec)
    if getattr(args, "mode", "exact") == "official-qwen" and not spec.official_qwen:
        raise ConfigError(f"--mode official-qwen reproduces the official Qwen pipelines; not for {family} (use exact)")
    if args.guidance is not None:
        kwargs["guidance"] = args.guidance
    module = spec.module_class()(
        pretrained_model=args.model, timesteps=TimestepSettings(slow=lists["slow"], fast=lists["fast"]),
        torch_dtype=args.dtype, performance=performance_settings(args), **kwargs,
    )
    height, width = default_size(args, {"slow": slow_meta, "fast": fast_meta})
    check_size(height, width, spec.module_class().size_multiple)
    args.height, args.width = height, width
    if getattr(args, "prompt", None):  # the command: in stages as fit (prompts encoded, encoders freed, transformer)
        scale = args.guidance_scale if args.guidance_scale is not None else 1.0
        prompts = module.sampling_prompts(args.prompt, args.negative_prompt, scale)
        module.load_for_sampling(prompts, control_pixels(args), args.device)
    else:  # a caller without prompts (library use) keeps the text encoders for whatever it asks later
        module.load_base_model(with_adapters=False)
    module.to(args.device)
    loras = load_glance_loras(module.pipe, args.slow, args.fast, chain, lora_scale=getattr(args, "lora_scale", 1.0),
                              family=family, allow_mixed=allow_mixed)
    info = {"family": family, "schedule": lists, "from_metadata": bool(slow_meta and fast_meta),
            "mixed": bool(slow_meta and fast_meta and pair_differences(slow_meta, fast_meta)),
            "lora_scale": loras.lora_scale, "size": [height, width],
            "lora_files": {phase: {"layout": r.layout, "alpha": r.alpha} for phase, r in loras.read.items()}}
    if slow_meta and fast_meta and not info["mixed"]:
        info["schedule_notice"] = schedule_notice(family, module.model_schedule, lists, slow_meta.get("scheduler"))
    return module, info


def model_schedule_of(model: str, family: str) -> ModelSchedule:
    """The schedule of ``--model`` (its scheduler config and declared grid), read before the model is loaded."""
    from glance_lightning.model_schedule import read_model_schedule
    from glance_lightning.models import resolve_pretrained

    return read_model_schedule(resolve_pretrained(model, "--model").path, family)


def lora_notice(info: dict) -> str | None:
    """The line ``sample`` prints about how strongly the LoRAs were loaded, when it is not self-evident."""
    files = info.get("lora_files", {})
    scale = info.get("lora_scale", 1.0)
    bare = [phase for phase, f in files.items() if f["alpha"] == "none" and f["layout"] == "diffusers"]
    if bare:
        return (f"the {' and '.join(bare)} LoRA file(s) carry no alpha (no adapter metadata, no .alpha tensors): "
                f"loaded at 1.0 x --lora-scale {scale:g}. The official Glance releases are such files: they were "
                "trained at alpha/rank = 4 and their published images were made at 1.0; --lora-scale 4 gives the "
                "trained strength")
    if scale != 1.0:
        return f"LoRAs loaded at {scale:g} x their trained strength (--lora-scale)"
    return None


def run_sample_command(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    if args.prompt_file is not None and not Path(args.prompt_file).is_file():
        what = "a folder, not a text file" if Path(args.prompt_file).is_dir() else "no such file"
        return _fail(f"--prompt-file {args.prompt_file}: {what}")
    args.prompt = read_prompts(args)
    if not args.prompt:
        return _fail("give a prompt: --prompt TEXT (repeatable) or --prompt-file PATH (one per line)")
    check_destination(Path(args.output), "--output")
    missing = [c for c in args.control if not Path(c).is_file()]
    if missing:
        folders = [c for c in missing if Path(c).is_dir()]
        what = f"folder(s), not images: {', '.join(folders)}" if folders else f"no such file(s): {', '.join(missing)}"
        return _fail(f"--control: {what}")
    check_options(args)
    try:
        check_performance_settings(performance_settings(args), OptimizerSettings())
    except (ValueError, RuntimeError, ImportError) as err:
        message = str(err).replace("model.performance.attention_backend", "--attention-backend")
        return _fail(message.replace("model.performance.base_quantization", "--base-quantization"))
    try:
        module, info = load_sampler(args)
    except (ValueError, FileNotFoundError) as err:
        return _fail(str(err))
    args.height, args.width = info["size"]
    for notice in (lora_notice(info), info.get("schedule_notice")):
        if notice:
            console.info(notice)
    console.info(chain_line(args, info))
    generate_images(module, args, info)  # prints one line per image
    return 0


def chain_line(args: argparse.Namespace, info: dict) -> str:
    """The line saying which Slow/Fast lists ``sample`` uses and where they come from."""
    from glance_lightning.inference import ALLOW_MIXED

    rounded = {phase: [round(t, 4) for t in lists] for phase, lists in info["schedule"].items()}
    if not info["from_metadata"]:
        source = "derived from the model's scheduler: the LoRAs carry no lists"
    elif info.get("mixed"):
        source = f"a mixed pair ({ALLOW_MIXED}): Slow list from {args.slow}, Fast list from {args.fast}"
    else:
        source = "from the LoRA metadata"
    return f"family {info['family']}; timesteps slow {rounded['slow']} fast {rounded['fast']} ({source})"


def control_pixels(args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """The --control images at about the output's area (read once)."""
    from glance_lightning.datamodules.glance import load_pixels

    if getattr(args, "control_pixels", None) is None:
        area = round((args.width * args.height) ** 0.5)
        args.control_pixels = tuple(load_pixels(Path(c), _control_size(Path(c), area)) for c in args.control)
    return args.control_pixels


def read_prompts(args: argparse.Namespace) -> list[str]:
    """--prompt values, then the lines of --prompt-file."""
    prompts = list(args.prompt)
    if args.prompt_file is not None:
        try:
            lines = read_text(args.prompt_file).splitlines()
        except UndecodableText as err:
            raise errors.ConfigError(f"--prompt-file {args.prompt_file}: {err}") from None
        prompts += [line.strip() for line in lines if line.strip()]
    return prompts


def generate_images(module: Any, args: argparse.Namespace, info: dict) -> list[tuple[Path, dict]]:
    from glance_lightning.callbacks.samples import save_png_atomic, to_pil

    controls = control_pixels(args)
    scale = args.guidance_scale if args.guidance_scale is not None else 1.0
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_leftovers(out_dir)  # images a killed sample run was writing
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
            print(f"{path}  seed {seed}  slow {timing['slow']:.3f}s  fast {timing['fast']:.3f}s", flush=True)
            written.append((path, timing))
    return written


def _control_size(path: Path, area: int) -> tuple[int, int]:
    """A control image keeps its own aspect ratio at about the output's area (the family resizes it further)."""
    from glance_lightning.datamodules.glance import target_size
    from glance_lightning.datamodules.images import upright_size

    width, height = upright_size(path)  # EXIF orientation applied, as the image is loaded
    return target_size(width, height, area, 16)


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
