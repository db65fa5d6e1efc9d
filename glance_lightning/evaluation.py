"""Measurements of a Glance module: loss at the trained timesteps and fidelity of the chained sample.

Used by the learning tests and by the metrics callback: PSNR/SSIM come from torchmetrics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from glance_lightning import flow


@torch.no_grad()
def phase_losses(module: Any, sample_index: int = 0, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, float]:
    """Mean flow-matching loss of each adapter over every entry of its list, with fixed noise."""
    x0 = module.latent_cache[sample_index]
    cond = module.cond_cache[sample_index]
    previous, was_training = module._active_adapter, module.transformer.training
    module.transformer.eval()
    result = {}
    try:
        for phase in ("slow", "fast"):
            module.set_phase(phase)
            losses = []
            for seed in seeds:
                noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed)).to(x0)
                for sigma in module.glance_timesteps.phase(phase):
                    s = torch.full((x0.shape[0],), sigma, device=x0.device)
                    with module.attention():
                        pred = module.predict_velocity(flow.noisy_latents(x0, noise, s), s, cond)
                    losses.append(flow.per_sample_loss(pred, x0, noise).mean().item())
            result[phase] = sum(losses) / len(losses)
    finally:
        module.transformer.train(was_training)
        if previous is not None:
            module.set_phase(previous)
    return result


@torch.no_grad()
def chain_fidelity(
    module: Any, sample: Any, sample_index: int = 0, seed: int = 0, **generate: Any
) -> dict[str, float]:
    """PSNR/SSIM of the chained sample against the training image and against its VAE reconstruction."""
    height, width = sample.pixels.shape[-2:]
    latents = module.generate_latents(sample.caption, seed, height, width, controls=sample.controls, **generate)
    image = module.decode_to_images(latents)
    target = ((sample.pixels.unsqueeze(0) + 1) / 2).clamp(0, 1)
    recon = module.decode_to_images(module.latent_cache[sample_index])
    return {
        "psnr": peak_signal_noise_ratio(image, target, data_range=1.0).item(),
        "ssim": structural_similarity_index_measure(image, target, data_range=1.0).item(),
        "psnr_vs_vae": peak_signal_noise_ratio(image, recon, data_range=1.0).item(),
        "latent_mse": F.mse_loss(latents.float().cpu(), module.latent_cache[sample_index].float().cpu()).item(),
    }
