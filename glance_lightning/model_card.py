"""The model card of a Glance LoRA pair: ``README.md`` in the Hugging Face format, written into every run folder
and into an ``export --hub`` folder.

Everything comes from what the run left on disk, so any run folder gets the same card: the ``glance`` metadata
of ``slow/`` and ``fast/`` (family, base model, both lists, rank, resolution, steps) and the PNG text of the
last chained samples (prompt, seed). The YAML front matter is ``huggingface_hub.ModelCardData``'s: ``base_model``
(only for a hub repo id; a local folder or a tiny model is named in the text instead), ``library_name:
diffusers``, tags, the base model's license when it is one we know, ``instance_prompt`` and a ``widget`` with
the sample images. The body says how to load the pair in diffusers (the exact chain, with or without
glance_lightning) and in ComfyUI, and lists the timesteps each LoRA was trained for.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from glance_lightning.atomic import write_text
from glance_lightning.lora_io import LORA_WEIGHT_NAME, read_glance_metadata

CARD_NAME = "README.md"
PHASES = ("slow", "fast")
# license, license_name, license_link of the base models the shipped configs use (from their model cards)
KNOWN_LICENSES: dict[str, tuple[str, str | None, str | None]] = {
    "black-forest-labs/FLUX.1-dev": ("other", "flux-1-dev-non-commercial-license",
                                     "https://huggingface.co/black-forest-labs/FLUX.1-dev/blob/main/LICENSE.md"),
    "black-forest-labs/FLUX.1-schnell": ("apache-2.0", None, None),
    "stabilityai/stable-diffusion-3.5-large": (
        "other", "stabilityai-ai-community",
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-large/blob/main/LICENSE.md"),
    "stabilityai/stable-diffusion-3.5-medium": (
        "other", "stabilityai-ai-community",
        "https://huggingface.co/stabilityai/stable-diffusion-3.5-medium/blob/main/LICENSE.md"),
    "Qwen/Qwen-Image": ("apache-2.0", None, None),
    "Qwen/Qwen-Image-Edit": ("apache-2.0", None, None),
    "Qwen/Qwen-Image-Edit-2509": ("apache-2.0", None, None),
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` reads as a Hugging Face repo id (not a path, not ``tiny:...``)."""
    return bool(name) and _HUB_ID.fullmatch(str(name)) is not None and not Path(str(name)).exists()


def sample_info(path: Path) -> dict[str, Any]:
    """The prompt/seed/step a chained sample PNG carries in its ``glance`` text chunk (empty when it has none)."""
    from PIL import Image

    with Image.open(path) as image:
        raw = image.text.get("glance") if hasattr(image, "text") else None
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


def latest_samples(samples_dir: Path) -> list[Path]:
    """The PNGs of the last render (``step<N>_p<i>_s<seed>.png`` with the highest N)."""
    found = sorted(samples_dir.glob("step*_p*_s*.png")) if samples_dir.is_dir() else []
    if not found:
        return []
    last = found[-1].name.split("_")[0]
    return [p for p in found if p.name.split("_")[0] == last]


def card_data(meta: dict[str, Any], samples: list[tuple[str, dict[str, Any]]]) -> Any:
    """``huggingface_hub.ModelCardData`` for the pair (``samples``: image path relative to the card, its info)."""
    from huggingface_hub import ModelCardData

    base = meta.get("base_model")
    license_, name, link = KNOWN_LICENSES.get(str(base), (None, None, None))
    prompts = [info.get("prompt") for _, info in samples if info.get("prompt")]
    return ModelCardData(
        base_model=base if is_hub_id(base) else None,
        library_name="diffusers",
        license=license_, license_name=name, license_link=link,
        tags=["text-to-image", "lora", "diffusers", "glance", "glance-lightning", str(meta.get("family"))],
        instance_prompt=prompts[0] if prompts else None,
        widget=[{"text": info.get("prompt", ""), "output": {"url": path}} for path, info in samples] or None,
    )


def render(meta: dict[str, dict[str, Any]], lora_paths: dict[str, str],
           samples: list[tuple[str, dict[str, Any]]]) -> str:
    """The card's text: front matter and body. ``meta`` and ``lora_paths`` are per phase, paths relative to the
    card's folder."""
    from huggingface_hub import ModelCard

    slow = meta["slow"]
    family, base = slow.get("family"), slow.get("base_model")
    lists = {p: [float(t) for t in meta[p].get("timesteps", [])] for p in PHASES}
    sigmas = [t / 1000 for t in lists["slow"] + lists["fast"]]
    pipeline = _pipeline_name(family)
    base_text = f"[{base}](https://huggingface.co/{base})" if is_hub_id(base) else f"`{base}`"
    prompt = samples[0][1].get("prompt", "a prompt") if samples else "a prompt"
    load_from = base if is_hub_id(base) or (base and Path(str(base)).is_dir()) else "path/to/the/base/model"
    call = f"prompt={json.dumps(prompt)}" + (', image=load_image("control.png")' if _takes_controls(family) else "")
    folder = {p: str(Path(lora_paths[p]).parent) for p in PHASES}
    rows = "\n".join(f"| {p.title()} | `{lora_paths[p]}` | {meta[p].get('trained_steps', '?')} | "
                     f"{', '.join(f'{t:g}' for t in lists[p])} |" for p in PHASES)
    images = "\n".join(f"![{info.get('prompt', '')}]({path})" for path, info in samples)
    body = f"""
# Glance LoRAs for {base_text}

Two LoRAs trained with glance_lightning on one image: **Slow** for the earliest, noisiest
timesteps and **Fast** for the latest. Chained over one {len(lists['slow'])} + {len(lists['fast'])} step
schedule they replace the base model's 50 steps. Family `{family}`, rank {slow.get('rank')} (alpha
{slow.get('alpha')}, folded into the weights: load at strength 1.0), trained at {slow.get('resolution')} px.

| LoRA | file | steps | timesteps (0-1000) it was trained at |
| --- | --- | --- | --- |
{rows}

{images}

## diffusers: the exact chain

With glance_lightning installed (it reads the lists from the files' metadata):

```python
import torch
from diffusers import {pipeline}{chr(10) + "from diffusers.utils import load_image" if _takes_controls(family) else ""}
from glance_lightning.inference import chained_call, load_glance_loras

pipe = {pipeline}.from_pretrained("{load_from}", torch_dtype=torch.bfloat16).to("cuda")
loras = load_glance_loras(pipe, "{folder['slow']}", "{folder['fast']}")
image = chained_call(pipe, loras, {call}).images[0]
```

With diffusers alone: the given sigmas must be used unshifted, and the Fast LoRA takes over after the last Slow
step of ONE call.

```python
from diffusers import FlowMatchEulerDiscreteScheduler

pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
    pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None)
pipe.load_lora_weights(".", weight_name="{lora_paths['slow']}", adapter_name="slow")
pipe.load_lora_weights(".", weight_name="{lora_paths['fast']}", adapter_name="fast")
pipe.set_adapters("slow")
sigmas = {sigmas}

def switch(pipe, step, timestep, callback_kwargs):
    if step == {len(lists['slow'])} - 1:
        pipe.set_adapters("fast")
    return {{}}

image = pipe({call}, sigmas=sigmas, num_inference_steps=len(sigmas),
             callback_on_step_end=switch).images[0]
```

## ComfyUI

Load each file with **LoraLoaderModelOnly** at strength 1.0 (the scale is folded into the weights, so ComfyUI
applies the trained strength), one on each of two copies of the base model. **ManualSigmas** with
`{', '.join(f'{s:g}' for s in sigmas)}, 0` into **SplitSigmas** at step {len(lists['slow'])}; a
**SamplerCustomAdvanced** (sampler `euler`) with the Slow model on the high sigmas, then one with the Fast model
and **DisableNoise** on the low sigmas, continuing from the first one's `output` latent.
"""
    return str(ModelCard(f"---\n{card_data(slow, samples).to_yaml()}\n---\n{body}"))


def _spec(family: Any) -> Any:
    from glance_lightning.registry import get_family

    try:
        return get_family(str(family))
    except ValueError:
        return None


def _pipeline_name(family: Any) -> str:
    spec = _spec(family)
    return spec.pipeline_name if spec is not None else "DiffusionPipeline"


def _takes_controls(family: Any) -> bool:
    spec = _spec(family)
    return bool(spec is not None and spec.takes_controls())


def write(card: Path, lora_dir: Path, samples: list[Path]) -> Path:
    """Write ``card`` (a README.md) for the pair in ``lora_dir`` and the given sample images (atomically)."""
    meta = {p: read_glance_metadata(lora_dir / p) or {} for p in PHASES}
    paths = {p: _relative(lora_dir / p / LORA_WEIGHT_NAME, card.parent) for p in PHASES}
    shown = [(_relative(s, card.parent), sample_info(s)) for s in samples]
    return write_text(card, render(meta, paths, shown))


def _relative(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path.absolute(), start.absolute())).as_posix()


def write_for_run(run_dir: Path, lora_dir: Path, callbacks: list[Any]) -> Path:
    """The run folder's card, with the last render of each sample callback (their ``dirname``; default
    ``samples``)."""
    dirnames = [getattr(c, "dirname", None) for c in callbacks if hasattr(c, "rendered")] or ["samples"]
    samples = [p for name in dirnames if name for p in latest_samples(run_dir / name)]
    return write(run_dir / CARD_NAME, lora_dir, samples)


def published_files(run_dir: Path | None, lora_dir: Path | None) -> dict[str, Path]:
    """What a run publishes (the W&B artifact): both LoRA files and the card, by their names there."""
    files = {f"{p}/{LORA_WEIGHT_NAME}": lora_dir / p / LORA_WEIGHT_NAME for p in PHASES} if lora_dir else {}
    if run_dir is not None:
        files[CARD_NAME] = run_dir / CARD_NAME
    return {name: path for name, path in files.items() if path.is_file()}
