"""The flow-matching maths of training and evaluation, written once.

A noise level sigma in [0, 1] mixes data and noise linearly, ``x_t = (1 - sigma) x0 + sigma noise``; the model
predicts the velocity ``v = noise - x0`` (so one Euler step ``x + (sigma_next - sigma) v`` follows the
straight path) and the loss is its mean squared error. No weighting, no shift: the sigmas are used as given.
"""

from __future__ import annotations

import torch


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.device, like.dtype).view(-1, *([1] * (like.dim() - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``x_t`` for one sigma per sample (``sigma`` [B])."""
    s = _per_sample(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    return noise - x0


def per_sample_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE of the predicted velocity, one value per sample [B], in float32."""
    error = prediction.float() - velocity_target(x0, noise).float()
    return error.pow(2).flatten(1).mean(1)
