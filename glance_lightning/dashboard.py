"""What a Glance run shows in its loggers (TensorBoard, W&B, CSV, or any Lightning logger): one place that writes.

- **Per-step metrics** (``log_step``): written straight to each logger at logging steps, under the running phase's
  names (``train/loss_slow`` only while the Slow phase runs). Lightning's ``self.log`` would repeat the last
  value of a name at every later logging step of the epoch, drawing a constant ``loss_slow`` through the Fast
  phase.
- **The phase** (``announce_phase``): once, when it starts, with its timestep list and steps (TensorBoard text,
  a W&B table; a numeric ``glance/phase_start`` for loggers without text).
- **The chained samples** (``log_samples``): one grid per render (a row per prompt and seed: the training image,
  the chained Slow->Fast sample, the base model at the same number of steps), with the prompts as caption
  (W&B media caption; TensorBoard image plus a text entry of the same name), and each sample on its own in W&B.
- **The LoRA pair** (``log_loras``): the final ``slow/`` and ``fast/`` files and the model card as a W&B
  artifact of type ``model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

PHASE_KEY = "glance/phase"
GRID_KEY = "samples/grid"


@dataclass
class SampleRow:
    """One prompt and seed of a render: the chained sample, the base model's, the training image if known."""

    prompt: str
    seed: int
    chained: Image.Image
    base: Image.Image
    training: Image.Image | None
    caption: str


def _loggers(trainer: Any, kind: str) -> list[Any]:
    return [logger for logger in trainer.loggers if type(logger).__name__ == kind or
            any(base.__name__ == kind for base in type(logger).__mro__)]


def _scalar(value: torch.Tensor | float) -> float:
    return float(value.item()) if isinstance(value, torch.Tensor) else float(value)


def loss_metrics(phase: str, timesteps: list[float], loss: torch.Tensor, per_sample: torch.Tensor,
                 choice: list[int]) -> dict[str, torch.Tensor | float]:
    """A step's loss under the phase's names: overall and per timestep of its list (``choice``: each sample's
    index into ``timesteps``; grouped on the host, so no device sync)."""
    metrics: dict[str, torch.Tensor | float] = {f"train/loss_{phase}": loss.detach(),
                                                "train/phase": float(("slow", "fast").index(phase))}
    for c in sorted(set(choice)):
        rows = [i for i, x in enumerate(choice) if x == c]
        metrics[f"train/loss_{phase}/t{timesteps[c]:07.2f}"] = per_sample[rows].mean().detach()
    return metrics


def log_step(trainer: Any, metrics: dict[str, torch.Tensor | float]) -> None:
    """Write one optimizer step's metrics to every logger at ``trainer.global_step`` (one device sync)."""
    values = {key: _scalar(value) for key, value in metrics.items()}
    for logger in trainer.loggers:
        logger.log_metrics(values, step=trainer.global_step)


def announce_phase(trainer: Any, module: Any, phase: str) -> None:
    """The phase that starts now, its timestep list and step range, once."""
    timesteps = [round(t, 4) for t in module.glance_timesteps.as_timesteps()[phase]]
    start = module.phase_start(phase)
    steps = module.phase_steps[phase]
    text = f"{phase} phase: steps {start + 1}-{start + steps}, timesteps {timesteps}"
    for logger in trainer.loggers:
        logger.log_metrics({"glance/phase_start": float(("slow", "fast").index(phase))}, step=trainer.global_step)
    for logger in _loggers(trainer, "TensorBoardLogger"):
        logger.experiment.add_text(PHASE_KEY, text, trainer.global_step)
    for logger in _loggers(trainer, "WandbLogger"):
        logger.log_text(key=PHASE_KEY, columns=["step", "phase", "steps", "timesteps"],
                        data=[[trainer.global_step, phase, steps, str(timesteps)]], step=trainer.global_step)


def grid(rows: list[SampleRow]) -> Image.Image:
    """Rows of [training image |] chained sample | base model, on a white canvas."""
    width, height = rows[0].chained.size
    columns = 3 if any(row.training is not None for row in rows) else 2
    canvas = Image.new("RGB", (columns * width, len(rows) * height), "white")
    for r, row in enumerate(rows):
        panels = ([row.training] if columns == 3 else []) + [row.chained, row.base]
        for c, panel in enumerate(panels):
            if panel is not None:
                canvas.paste(panel.resize((width, height)), (c * width, r * height))
    return canvas


def grid_caption(rows: list[SampleRow], step: int) -> str:
    columns = "training image | chained Slow->Fast | base model" if any(r.training for r in rows) else \
        "chained Slow->Fast | base model"
    lines = [f"step {step}: {columns}"] + [f"row {i + 1}: seed {r.seed} | {r.prompt}" for i, r in enumerate(rows)]
    return "\n".join(lines)


def log_samples(trainer: Any, rows: list[SampleRow]) -> None:
    """The render's grid with the prompts as caption in TensorBoard and W&B, and each sample alone in W&B."""
    if not rows:
        return
    step = trainer.global_step
    image, caption = grid(rows), grid_caption(rows, step)
    for logger in _loggers(trainer, "TensorBoardLogger"):
        logger.experiment.add_image(GRID_KEY, np.asarray(image), step, dataformats="HWC")
        logger.experiment.add_text(GRID_KEY, caption.replace("\n", "  \n"), step)  # markdown line breaks
    for logger in _loggers(trainer, "WandbLogger"):
        logger.log_image(key=GRID_KEY, images=[image], caption=[caption], step=step)
        logger.log_image(key="samples/chained", images=[r.chained for r in rows],
                         caption=[r.caption for r in rows], step=step)


def log_loras(trainer: Any, module: Any, files: dict[str, Path]) -> None:
    """The final LoRA files and the model card (``files``: name in the artifact -> path) as one W&B artifact of
    type ``model``."""
    loggers = _loggers(trainer, "WandbLogger")
    if not loggers or not files:
        return
    import wandb

    artifact = wandb.Artifact(f"glance-loras-{module.family}", type="model",
                              metadata={p: module.glance_metadata(p) for p in ("slow", "fast")})
    for name, path in files.items():
        artifact.add_file(str(path), name=name)
    for logger in loggers:
        logger.experiment.log_artifact(artifact)
