"""Write Glance LoRAs in another loader's key layout (ComfyUI, kohya, diffusers), at the same weight change.

The default files a run writes already load at the trained strength in diffusers, ComfyUI and kohya-style
loaders (alpha/rank folded into lora_B). ``export`` is for users who want a loader's native key names:

- ``comfyui``: ComfyUI's module names, ``diffusion_model.<name>.lora_down/lora_up.weight`` + ``<name>.alpha``
  (FLUX: BFL names, q/k/v fused into ``qkv``/``linear1``; SD3: MMDiT names; Qwen-Image: diffusers' names);
- ``kohya``: the same modules as ``lora_unet_<name_with_underscores>`` (kohya sd-scripts / musubi-tuner keys);
- ``diffusers``: the diffusers layout, scale folded (re-exports files written before the scale was folded, or
  files in the other layouts).

``--lora`` is a LoRA folder or .safetensors file, or a run folder holding ``slow/`` and ``fast/`` (both are
exported). Each file goes beside its source as ``glance_<phase>_<format>.safetensors`` unless ``--output`` names
a file (one LoRA) or a folder; an existing file is never overwritten. The Glance metadata is kept.

``--hub DIR`` writes a folder ready for ``huggingface_hub.upload_folder``: ``slow/`` and ``fast/`` (the default
files, or ``--format``'s layout), the last chained samples and a ``README.md`` model card
(``glance_lightning.model_card``); ``DIR`` must not exist or be empty.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from glance_lightning import errors
from glance_lightning.atomic import remove_leftovers
from glance_lightning.errors import ConfigError, ExistingFileError, MissingFileError
from glance_lightning.lora_io import LORA_WEIGHT_NAME, read_glance_metadata
from glance_lightning.lora_layouts import FORMATS, LoraLayoutError, export_lora
from glance_lightning.registry import family_names
from glance_lightning.run_folder import check_destination


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m glance_lightning export", description=__doc__.split("\n\n")[0])
    p.add_argument("--lora", required=True,
                   help="a LoRA folder or .safetensors file, or a run folder holding slow/ and fast/")
    p.add_argument("--format", default=None, choices=FORMATS,
                   help="the key layout to write (required unless --hub; with --hub default: the files as trained)")
    p.add_argument("--hub", default=None, metavar="DIR",
                   help="write a folder ready for huggingface_hub.upload_folder: both LoRAs, the last samples and "
                        "a model card (README.md); --lora must be a run folder or hold slow/ and fast/")
    p.add_argument("--output", default=None,
                   help="output file (one LoRA) or folder; default: beside each source, "
                        "glance_<phase>_<format>.safetensors")
    p.add_argument("--family", choices=family_names(), default=None,
                   help="needed only for LoRA files without Glance metadata")
    return p


def _sources(path: Path) -> list[Path]:
    if path.is_dir() and not (path / LORA_WEIGHT_NAME).is_file():
        found = [path / phase for phase in ("slow", "fast") if (path / phase / LORA_WEIGHT_NAME).is_file()]
        if not found:
            raise MissingFileError(f"--lora {path}: no {LORA_WEIGHT_NAME} there nor in its slow/ or fast/")
        return found
    return [path]


def _destination(source: Path, fmt: str, output: Path | None, several: bool) -> Path:
    folder = source if source.is_dir() else source.parent
    meta = read_glance_metadata(source) or {}
    stem = source.name if source.is_dir() else source.stem
    name = f"glance_{meta.get('phase') or stem}_{fmt}.safetensors"
    if output is None:
        return folder / name
    if output.suffix == ".safetensors" and not several:
        return output
    return output / name


def run_export_command(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    output = Path(args.output) if args.output else None
    if output is not None:  # a folder, or one .safetensors file in a folder: writable, before anything is read
        check_destination(output.parent if output.suffix == ".safetensors" else output, "--output", output)
    if args.hub is not None:
        check_destination(Path(args.hub), "--hub")
        try:
            return _export_hub(Path(args.lora), Path(args.hub), args.format, args.family)
        except (ValueError, FileNotFoundError, FileExistsError, LoraLayoutError) as err:
            return errors.report(str(err), "export", traceback_hint=False)
    if args.format is None:
        parser.print_usage()
        return errors.report("--format is required (or --hub DIR)", "export", traceback_hint=False)
    try:
        sources = _sources(Path(args.lora))
        if output is not None and output.suffix == ".safetensors" and len(sources) > 1:
            raise ConfigError(f"--output {output} is one file but --lora holds {len(sources)} LoRAs; give a folder")
        targets = [(s, _destination(s, args.format, output, len(sources) > 1)) for s in sources]
        for folder in {t.parent for _, t in targets}:  # what an export killed while writing left
            remove_leftovers(folder)
        existing = [str(t) for _, t in targets if t.exists()]
        if existing:
            raise ExistingFileError(f"{', '.join(existing)} exist(s); existing files are never overwritten")
        for source, target in targets:
            written = export_lora(source, args.format, target, args.family)
            print(f"{written}  ({args.format}, from {source})", flush=True)
    except (ValueError, FileNotFoundError, FileExistsError, LoraLayoutError) as err:
        return errors.report(str(err), "export", traceback_hint=False)
    return 0


def _export_hub(run: Path, hub: Path, fmt: str | None, family: str | None) -> int:
    """``hub``: slow/, fast/, samples/ and README.md, from the run folder (or LoRA pair folder) ``run``."""
    from glance_lightning import model_card
    from glance_lightning.atomic import write_bytes

    sources = _sources(run)
    if [s.name for s in sources] != ["slow", "fast"] or not all(s.is_dir() for s in sources):
        raise MissingFileError(f"--lora {run}: --hub needs a run folder holding both slow/ and fast/")
    if hub.is_dir():
        remove_leftovers(hub, recursive=True)  # a killed export's temporary files are no content
    if hub.exists() and (not hub.is_dir() or any(p.is_file() for p in hub.rglob("*"))):
        raise ExistingFileError(f"--hub {hub} exists and is not an empty folder; name a new folder")
    samples = model_card.latest_samples(run / "samples")
    for source in sources:
        target = hub / source.name / LORA_WEIGHT_NAME
        if fmt is None:
            write_bytes(target, (source / LORA_WEIGHT_NAME).read_bytes())
        else:
            export_lora(source, fmt, target, family)
    for sample in samples:
        write_bytes(hub / "samples" / sample.name, sample.read_bytes())
    card = model_card.write(hub / model_card.CARD_NAME, hub, [hub / "samples" / s.name for s in samples])
    print(f"{hub}  (slow/, fast/, {len(samples)} sample(s), {card.name}; upload with "
          f"huggingface_hub.upload_folder(repo_id=..., folder_path={str(hub)!r}))", flush=True)
    return 0
