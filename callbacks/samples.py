"""Render chained Slow->Fast samples during training: PNGs in the run folder, a grid in the loggers
(``glance_lightning.dashboard``). Rank 0 renders and writes; under sharding (``glance_lightning.sharding``) every
rank runs the same forward passes on its shard of the weights, and rank 0 alone writes and logs."""

from __future__ import annotations

import io
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from PIL import Image

from glance_lightning import console, dashboard
from glance_lightning.atomic import write_bytes
from glance_lightning.errors import ConfigError
from glance_lightning.families.preflight import run_dir

log = logging.getLogger(__name__)


def to_pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] -> PIL RGB."""
    data = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    return Image.fromarray(data)


def save_png_atomic(image: Image.Image, path: Path, text: dict[str, str] | None = None) -> None:
    """Write ``image`` as a PNG (with ``text`` chunks) all or nothing (``glance_lightning.atomic``)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    encoded = io.BytesIO()  # encoded in memory: Pillow's encoders may write to the fd past the file object
    image.save(encoded, format="PNG", pnginfo=info)
    write_bytes(path, encoded.getbuffer())


class ChainedSampleCallback(L.Callback):
    """Every ``every_n_steps`` optimizer steps and at the end, render the exact Slow->Fast chain."""

    def __init__(
        self,
        every_n_steps: int = 0,
        prompts: list[str] | None = None,
        seeds: list[int] | None = None,
        height: int | None = None,
        width: int | None = None,
        guidance_scale: float = 1.0,
        negative_prompt: str | None = None,
        at_end: bool = True,
        dirname: str = "samples",
    ) -> None:
        """
        Args:
            every_n_steps: render every N optimizer steps (0: only at the end).
            prompts: prompts to render; default the training captions (with their control images for edit
                families; configured prompts use the first training sample's control images).
            seeds: one image per seed and prompt (default [0]).
            height: sample height in pixels; default that of the first training image.
            width: sample width in pixels; default that of the first training image.
            guidance_scale: classifier-free guidance scale for families that use it (SD3, Qwen).
            negative_prompt: negative prompt for families with classifier-free guidance.
            at_end: also render when training ends.
            dirname: sub-folder of the run directory for the PNG files.
        """
        if every_n_steps < 0:
            raise ConfigError(f"ChainedSampleCallback.every_n_steps={every_n_steps} must be >= 0")
        self.every_n_steps, self.prompts, self.seeds = every_n_steps, prompts, list(seeds or [0])
        self.height, self.width = height, width
        self.guidance_scale, self.negative_prompt = guidance_scale, negative_prompt
        self.at_end, self.dirname = at_end, dirname
        self.rendered: list[Path] = []
        self.last_metrics: dict[str, float] = {}
        self._base_cache: dict[tuple, Image.Image] = {}
        self._last_step = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        spec = pl_module.family_spec
        unused = spec.unused_guidance(guidance_scale=self.guidance_scale, negative_prompt=self.negative_prompt)
        if unused is not None:
            embedded = spec.guidance_kind == "embedded"
            hint = "; its guidance embedding is model.init_args.guidance" if embedded else ""
            raise ConfigError(f"ChainedSampleCallback {unused}: {spec.name} has no classifier-free guidance{hint}")
        pl_module.register_prompts(pl_module.sampling_prompts(self.prompts or [], self.negative_prompt,
                                                              self.guidance_scale))

    def _requests(self, trainer: L.Trainer) -> list[tuple[str, tuple, torch.Tensor | None]]:
        """(prompt, control images, training image) triples: the configured prompts, else each training
        sample's caption with its own control images (edit families render edits of the training controls)
        and its image, against which PSNR/SSIM are measured."""
        samples = trainer.datamodule.train_samples
        if self.prompts:
            return [(p, samples[0].controls, None) for p in self.prompts]
        return [(s.caption, s.controls, s.pixels) for s in samples]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self.render(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.at_end and trainer.global_step != self._last_step:
            self.render(trainer, pl_module)

    def render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        self._last_step = trainer.global_step
        if not trainer.is_global_zero and not pl_module.sharded:  # sharded: every rank runs the forward passes
            return []
        started = time.perf_counter()
        with pl_module.timed("samples"):
            paths = self._render(trainer, pl_module)
        if paths:
            root = run_dir(trainer)
            shown = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths]
            what = shown[0] if len(shown) == 1 else f"{len(shown)} images: {shown[0]}, ..."
            console.info(f"step {trainer.global_step}: chained sample {what} ({time.perf_counter() - started:.1f}s)")
        return paths

    def _render(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[Path]:
        samples = trainer.datamodule.train_samples
        first = samples[0].pixels
        height, width = self.height or first.shape[-2], self.width or first.shape[-1]
        out_dir = run_dir(trainer) / self.dirname
        rows: list[dashboard.SampleRow] = []
        paths, fidelity = [], []
        schedule = pl_module.glance_timesteps.as_timesteps()
        requests = self._requests(trainer)
        progress = console.StepProgress(f"step {trainer.global_step}: rendering sample",
                                        len(requests) * len(self.seeds))
        for p_index, (prompt, controls, target) in enumerate(requests):
            for seed in self.seeds:
                progress.update(len(paths))
                latents = pl_module.generate_latents(
                    prompt, seed, height, width, self.guidance_scale, self.negative_prompt, controls
                )
                pixels = pl_module.decode_to_images(latents)
                image = to_pil(pixels[0])
                path = out_dir / f"step{trainer.global_step:06d}_p{p_index}_s{seed}.png"
                if trainer.is_global_zero:
                    save_png_atomic(image, path, self._png_text(pl_module, prompt, seed, trainer.global_step))
                paths.append(path)
                caption = (f"step {trainer.global_step} | seed {seed} | {prompt} | slow "
                           f"{[round(t, 1) for t in schedule['slow']]} fast {[round(t, 1) for t in schedule['fast']]}")
                training = None
                if target is not None and tuple(target.shape[-2:]) == (height, width):
                    reference = ((target.unsqueeze(0) + 1) / 2).clamp(0, 1)
                    fidelity.append(image_fidelity(pixels, reference))
                    training = to_pil(reference[0])
                base = self._base_sample(pl_module, prompt, seed, height, width, controls)
                rows.append(dashboard.SampleRow(prompt, seed, image, base, training, caption))
        if not trainer.is_global_zero:
            return []
        self._log_metrics(pl_module, fidelity, trainer.global_step)
        dashboard.log_samples(trainer, rows)
        self.rendered.extend(paths)
        return paths

    def _base_sample(self, pl_module: L.LightningModule, prompt: str, seed: int, height: int, width: int,
                     controls: tuple) -> Image.Image:
        """The base model's own sample at the same number of model calls; it never changes, so it is cached."""
        key = (prompt, seed, height, width, len(controls))
        if key not in self._base_cache:
            steps = len(pl_module.glance_timesteps.slow) + len(pl_module.glance_timesteps.fast)
            latents = pl_module.generate_base_latents(prompt, seed, height, width, steps, self.guidance_scale,
                                                      self.negative_prompt, controls)
            self._base_cache[key] = to_pil(pl_module.decode_to_images(latents)[0])
        return self._base_cache[key]

    def _log_metrics(self, pl_module: L.LightningModule, fidelity: list[dict[str, float]], step: int) -> None:
        if not fidelity:
            return
        means = {f"samples/{k}": sum(f[k] for f in fidelity) / len(fidelity) for k in fidelity[0]}
        self.last_metrics = means
        for logger in pl_module.trainer.loggers:
            logger.log_metrics(means, step=step)

    def _png_text(self, pl_module: L.LightningModule, prompt: str, seed: int, step: int) -> dict[str, str]:
        import json

        return {
            "glance": json.dumps(
                {
                    "prompt": prompt, "seed": seed, "step": step, "family": pl_module.family,
                    "schedule": pl_module.glance_timesteps.as_timesteps(),
                    "guidance_scale": self.guidance_scale, "negative_prompt": self.negative_prompt,
                }
            )
        }


def image_fidelity(image: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """PSNR and SSIM (torchmetrics) of images in [0, 1]."""
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    return {
        "psnr": peak_signal_noise_ratio(image, reference, data_range=1.0).item(),
        "ssim": structural_similarity_index_measure(image, reference, data_range=1.0).item(),
    }
