"""The tiny models' VAEs and their deterministic training at build time.

The VAEs are real, if crude, autoencoders, trained for a few seconds at build time on procedural scenes so that
decode(encode(image)) looks like the image (~22 dB PSNR on the bundled 64x64 sample), with latents normalised
to about zero mean and unit std like the real ones'. Training is deterministic (one CPU thread) and memoised:
once per process and seed for the FLUX/SD3 design (``AutoencoderKL``) and once for the Qwen one
(``AutoencoderKLQwenImage``), ~10 s each on one CPU core. Both downsample 8x like the real ones into
``LATENT_CHANNELS`` latent channels.

From a random initialisation that budget teaches them next to nothing, so training starts from a hand-set
linear "skeleton" that already is an autoencoder: the encoder averages each 8x8 patch's colour into latent
channels 0-2 and the decoder upsamples it back smoothly; every residual branch and attention output starts at
zero (each block an identity) and training bends them into sharper reconstructions, putting latent channel 3
to use. Two tricks keep the skeleton linear through the norm + SiLU at the end of encoder and decoder: a
constant channel (value VAE_CONSTANT, beside its negation) dominates the norm's statistics, so normalising
divides by a near-constant; and every signal travels beside its negation, since silu(x) - silu(-x) == x.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from torch import nn

from glance_lightning.console import StepProgress

LATENT_CHANNELS = 4
VAE_TRAINING_STEPS = {"kl": 260, "qwen": 300}  # about 10 s on one CPU core each
VAE_BATCH = 8
VAE_TRAINING_SIZE = 32  # 32x32 scenes: 4x cheaper than 64x64 per image and as good to learn edges from
VAE_LR = 4e-3  # residual branches and attention; the hand-set skeleton learns at a quarter of it
VAE_CONSTANT = 2.0
VAE_POSTERIOR_STD = 0.01  # std of the latent distribution, relative to the latents' spread over typical images

_Layout = tuple[tuple[str, float] | None, ...]  # per channel: (signal, sign), or None: free
_CENTRE = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
_AVERAGE_2X2 = torch.tensor([[0.25, 0.25, 0.0], [0.25, 0.25, 0.0], [0.0, 0.0, 0.0]])  # stride 2 after (0,1,0,1) pad
_SMOOTH = torch.outer(torch.tensor([0.25, 0.5, 0.25]), torch.tensor([0.25, 0.5, 0.25]))  # after nearest 2x: bilinear


def _autoencoder_kl(scaling_factor: float = 1.0, shift_factor: float = 0.0) -> AutoencoderKL:
    """Four-level (8x) KL VAE with 4 latent channels, as FLUX.1 and SD3, whose latents are normalised as
    ``(z - shift_factor) * scaling_factor``. One norm group: the skeleton's constant must share each group."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=1,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,  # as FLUX.1 and SD3
        use_post_quant_conv=False,
    )


def _autoencoder_qwen(
    latents_mean: list[float] | None = None, latents_std: list[float] | None = None
) -> AutoencoderKLQwenImage:
    """Qwen-Image causal 3D VAE, 8x like the real one, whose latents are normalised per channel as
    ``(z - latents_mean) / latents_std``. No residual blocks outside the middle one: the edit pipelines encode
    every control image at ~1 megapixel."""
    return AutoencoderKLQwenImage(
        base_dim=16,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        temperal_downsample=[False, True, True],
        latents_mean=latents_mean or [0.0] * LATENT_CHANNELS,
        latents_std=latents_std or [1.0] * LATENT_CHANNELS,
    )


def _synthetic_scenes(count: int, generator: torch.Generator, size: int) -> torch.Tensor:
    """Procedural images in [-1, 1] like the bundled samples: sky over ground (the horizon anywhere, even out of
    view) and up to three discs or boxes, all in flat random colours with anti-aliased edges."""

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator)

    ys = (torch.arange(size) + 0.5).view(1, size, 1)
    xs = (torch.arange(size) + 0.5).view(1, 1, size)
    sky, ground = uniform(count, 3, 1, 1), uniform(count, 3, 1, 1)
    horizon = (1.2 * uniform(count, 1, 1) - 0.1) * size
    below = (ys - horizon + 0.5).clamp(0, 1).unsqueeze(1)
    images = sky * (1 - below) + ground * below
    for _ in range(3):
        present = uniform(count, 1, 1) < 0.8
        cx, cy = uniform(count, 1, 1) * size, uniform(count, 1, 1) * size
        rx = 3 + 8 * uniform(count, 1, 1)
        box = uniform(count, 1, 1) < 0.25
        ry = torch.where(box, 3 + 8 * uniform(count, 1, 1), rx)
        inside_disc = rx - torch.sqrt((xs - cx) ** 2 + (ys - cy) ** 2)
        inside_box = torch.minimum(rx - (xs - cx).abs(), ry - (ys - cy).abs())
        cover = ((torch.where(box, inside_box, inside_disc) + 0.5).clamp(0, 1) * present).unsqueeze(1)
        images = images * (1 - cover) + uniform(count, 3, 1, 1) * cover
    return images * 2 - 1


# Skeleton layouts name what each channel carries: "R", "G", "B" (image), "X" (latent channel 3), "K" (constant).


def _pairs(width: int, signals: str) -> _Layout:
    """Each signal beside its negation, then free channels."""
    return tuple(entry for s in signals for entry in ((s, 1.0), (s, -1.0))) + (None,) * (width - 2 * len(signals))


def _plain(width: int, signals: str) -> _Layout:
    return tuple((s, 1.0) for s in signals) + (None,) * (width - len(signals))


def _spatial(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight's spatial taps: a causal 3D conv sees a single frame through its last time tap only."""
    return weight[:, :, -1] if weight.dim() == 5 else weight


def _set_conv(
    conv: nn.Module,
    src: _Layout,
    dst: _Layout,
    kernel: torch.Tensor = _CENTRE,
    constant_kernel: torch.Tensor | None = None,
) -> None:
    """Make `conv` map layout `src` to `dst`, filtering each signal with `kernel` (the constant with
    `constant_kernel`, default `kernel`); a constant missing from `src` comes from the bias."""
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        taps = _spatial(conv.weight)
        height, width = taps.shape[-2:]
        for out, entry in enumerate(dst):
            if entry is None:
                continue
            signal, sign = entry
            if (signal, 1.0) in src:
                filt = constant_kernel if signal == "K" and constant_kernel is not None else kernel
                taps[out, src.index((signal, 1.0))] = (
                    sign * filt[1 - height // 2 : 2 + height // 2, 1 - width // 2 : 2 + width // 2]
                )
            elif signal == "K":
                conv.bias[out] = sign * VAE_CONSTANT


def _set_readout(conv: nn.Module, src: _Layout, signals: str, spare_row: int | None = None) -> None:
    """Conv after norm + SiLU: output channel i = silu(s_i) - silu(-s_i) = s_i, the i-th of `signals`. Other
    rows are zero, except `spare_row` (the encoder's latent channel 3): its random weights, scaled down."""
    with torch.no_grad():
        spare = None if spare_row is None else conv.weight[spare_row] * 0.1
        conv.weight.zero_()
        conv.bias.zero_()
        taps = _spatial(conv.weight)
        for row, signal in enumerate(signals):
            taps[row, src.index((signal, 1.0)), 1, 1] = 1.0
            taps[row, src.index((signal, -1.0)), 1, 1] = -1.0
        if spare is not None:
            conv.weight[spare_row] = spare


def _set_norm_scale(weight: torch.Tensor, width: int) -> None:
    """A one-group GroupNorm, or Qwen's per-pixel RMS norm, over `width` channels holding the constant pair
    divides by about VAE_CONSTANT * sqrt(2 / width): scale it back."""
    with torch.no_grad():
        weight.fill_(VAE_CONSTANT * (2 / width) ** 0.5)


def _identity_block(block: nn.Module, src: _Layout, dst: _Layout) -> None:
    """A residual block whose branch outputs zero: the block is its shortcut, set to map `src` to `dst`."""
    with torch.no_grad():
        block.conv2.weight.zero_()
        block.conv2.bias.zero_()
    if isinstance(block.conv_shortcut, nn.Conv2d | nn.Conv3d):
        _set_conv(block.conv_shortcut, src, dst)


def _identity_mid_block(mid: nn.Module, layout: _Layout) -> None:
    for block in mid.resnets:
        _identity_block(block, layout, layout)
    for attention in mid.attentions:
        projection = attention.to_out[0] if hasattr(attention, "to_out") else attention.proj
        with torch.no_grad():
            projection.weight.zero_()
            projection.bias.zero_()


def _kl_skeleton(vae: AutoencoderKL) -> None:
    encoder, decoder = vae.encoder, vae.decoder
    widths = vae.config.block_out_channels
    layout = _pairs(widths[0], "RGBK")
    _set_conv(encoder.conv_in, _plain(3, "RGB"), layout)
    for width, block in zip(widths, encoder.down_blocks, strict=True):
        for resnet in block.resnets:
            layout, src = _pairs(width, "RGBK"), layout
            _identity_block(resnet, src, layout)
        for downsampler in block.downsamplers or ():
            _set_conv(downsampler.conv, layout, layout, _AVERAGE_2X2)
    _identity_mid_block(encoder.mid_block, layout)
    _set_norm_scale(encoder.conv_norm_out.weight, widths[-1])
    _set_readout(encoder.conv_out, layout, "RGB", spare_row=3)

    widths = widths[::-1]
    layout = _pairs(widths[0], "RGBXK")
    _set_conv(decoder.conv_in, _plain(LATENT_CHANNELS, "RGBX"), layout)
    _identity_mid_block(decoder.mid_block, layout)
    for width, block in zip(widths, decoder.up_blocks, strict=True):
        for resnet in block.resnets:
            layout, src = _pairs(width, "RGBXK" if width >= 10 else "RGBK"), layout
            _identity_block(resnet, src, layout)
        for upsampler in block.upsamplers or ():  # the constant stays constant, even at the zero-padded border
            _set_conv(upsampler.conv, layout, layout, _SMOOTH, constant_kernel=_CENTRE)
    _set_norm_scale(decoder.conv_norm_out.weight, widths[-1])
    _set_readout(decoder.conv_out, layout, "RGB")


def _qwen_skeleton(vae: AutoencoderKLQwenImage) -> None:
    encoder, decoder = vae.encoder, vae.decoder
    width = vae.config.base_dim
    layout = _pairs(width, "RGBK")
    _set_conv(encoder.conv_in, _plain(3, "RGB"), layout)
    for resample in encoder.down_blocks:  # no residual blocks: downsamplers only
        _set_conv(resample.resample[1], layout, layout, _AVERAGE_2X2)
    _identity_mid_block(encoder.mid_block, layout)
    _set_norm_scale(encoder.norm_out.gamma, width)
    _set_readout(encoder.conv_out, layout, "RGB", spare_row=3)
    for conv in (vae.quant_conv, vae.post_quant_conv):
        with torch.no_grad():
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[:, :, 0, 0, 0] = torch.eye(conv.weight.shape[0])

    # Until the last block no signal needs its negation. Every upsampler smooths the constant like the rest,
    # so at the zero-padded border all channels fade alike, which the final per-pixel norm undoes exactly.
    layout = _plain(width, "RGBKX")
    _set_conv(decoder.conv_in, _plain(LATENT_CHANNELS, "RGBX"), layout)
    _identity_mid_block(decoder.mid_block, layout)
    for index, block in enumerate(decoder.up_blocks):
        last = index == len(decoder.up_blocks) - 1
        for resnet in block.resnets:
            layout, src = (_pairs(resnet.out_dim, "RGBK") if last else _plain(resnet.out_dim, "RGBKX")), layout
            _identity_block(resnet, src, layout)
        for upsampler in block.upsamplers or ():
            conv = upsampler.resample[1]
            layout, src = _plain(conv.out_channels, "RGBK"), layout
            _set_conv(conv, src, layout, _CENTRE if index == 0 else _SMOOTH)
    _set_norm_scale(decoder.norm_out.gamma, width)
    _set_readout(decoder.conv_out, layout, "RGB")


@contextmanager
def _qwen_single_frame_training(vae: AutoencoderKLQwenImage) -> Iterator[None]:
    """Run the Qwen VAE's causal 3D convs on single frames as the equivalent 2D convs (their zero-padded past
    contributes nothing), several times faster; and skip the decoder's last residual block (64x64, the
    costliest), which stays an identity."""
    patched: list[nn.Module] = []

    def as_2d(conv: QwenImageCausalConv3d) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
            padding = (conv._padding[2], conv._padding[0])
            return F.conv2d(x[:, :, 0], conv.weight[:, :, -1], conv.bias, padding=padding).unsqueeze(2)

        return forward

    for module in vae.modules():
        if isinstance(module, QwenImageCausalConv3d):
            module.forward = as_2d(module)
            patched.append(module)
    last_block = vae.decoder.up_blocks[-1].resnets[-1]
    last_block.forward = lambda x, *args, **kwargs: last_block.conv_shortcut(x)
    patched.append(last_block)
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _train_autoencoder(
    vae: nn.Module, reconstruct: Callable[[torch.Tensor], torch.Tensor], seed: int, steps: int,
    scenes: Callable[[torch.Generator], torch.Tensor] | None = None,
) -> None:
    """Adam on reconstruction MSE of fresh synthetic scenes (``scenes(generator)``: default VAE_BATCH RGB scenes of
    VAE_TRAINING_SIZE pixels), warmup then cosine decay; deterministic for a seed."""
    if scenes is None:
        def scenes(generator: torch.Generator) -> torch.Tensor:
            return _synthetic_scenes(VAE_BATCH, generator, VAE_TRAINING_SIZE)

    generator = torch.Generator().manual_seed(seed)

    def learns_fast(name: str) -> bool:  # residual branches and attention, which the skeleton leaves at zero
        return "attention" in name or (
            ".resnets." in name and any(f".{p}." in name for p in ("conv1", "conv2", "norm1", "norm2"))
        )

    named = list(vae.named_parameters())
    optimizer = torch.optim.Adam(
        [
            {"params": [p for n, p in named if learns_fast(n)], "scale": 1.0},
            {"params": [p for n, p in named if not learns_fast(n)], "scale": 0.25},
        ],
        lr=VAE_LR,
        fused=True,
    )
    progress = StepProgress("training the tiny VAE: step", steps)
    for step in range(steps):
        progress.update(step)
        lr = VAE_LR * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        images = scenes(generator)
        loss = F.mse_loss(reconstruct(images), images)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@contextmanager
def _deterministic_cpu() -> Iterator[None]:
    """One CPU thread (so the result does not depend on the thread count), gradients on whatever the caller's
    mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            yield
    finally:
        torch.set_num_threads(threads)


def _typical_latents(encode: Callable[[torch.Tensor], torch.Tensor], seed: int) -> torch.Tensor:
    """Latents (distribution modes) of 64 typical 64x64 images, as (images, channels, height, width)."""
    with torch.no_grad():
        return encode(_synthetic_scenes(64, torch.Generator().manual_seed(seed + 1), 64))


def _set_posterior_std(conv_out: nn.Module, std: torch.Tensor) -> None:
    """The encoder's log-variance channels: constant, a std of VAE_POSTERIOR_STD times the latents' spread."""
    with torch.no_grad():
        conv_out.bias[LATENT_CHANNELS:] = 2 * torch.log(VAE_POSTERIOR_STD * std)


@lru_cache(maxsize=8)
def _trained_vae(kind: str, seed: int, steps: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config kwargs, state dict) of the `kind` ("kl" or "qwen") VAE trained from `seed`, memoised: FLUX and
    SD3 share one design, the Qwen families another, so a process trains each (per seed) once."""
    with _deterministic_cpu(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "kl":
            vae = _autoencoder_kl()
            _kl_skeleton(vae)

            def reconstruct(images: torch.Tensor) -> torch.Tensor:
                return vae.decode(vae.encode(images).latent_dist.mode()).sample

            _train_autoencoder(vae, reconstruct, seed, steps)
            latents = _typical_latents(lambda images: vae.encode(images).latent_dist.mode(), seed)
            mean, std = latents.mean(), latents.std()
            _set_posterior_std(vae.encoder.conv_out, std.expand(LATENT_CHANNELS))
            config = {"shift_factor": round(mean.item(), 4), "scaling_factor": round(1 / std.item(), 4)}
        else:
            vae = _autoencoder_qwen()
            _qwen_skeleton(vae)

            def reconstruct(images: torch.Tensor) -> torch.Tensor:
                latents = vae.quant_conv(vae.encoder(images.unsqueeze(2)))[:, :LATENT_CHANNELS]
                return vae.decoder(vae.post_quant_conv(latents))[:, :, 0]

            with _qwen_single_frame_training(vae):
                _train_autoencoder(vae, reconstruct, seed, steps)
            latents = _typical_latents(lambda images: vae.encode(images.unsqueeze(2)).latent_dist.mode()[:, :, 0], seed)
            mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
            _set_posterior_std(vae.quant_conv, std)
            config = {
                "latents_mean": [round(v, 4) for v in mean.tolist()],
                "latents_std": [round(v, 4) for v in std.tolist()],
            }
    return config, {name: tensor.detach().clone() for name, tensor in vae.state_dict().items()}


def trained_autoencoder_kl(seed: int) -> AutoencoderKL:
    config, state = _trained_vae("kl", seed, VAE_TRAINING_STEPS["kl"])
    vae = _autoencoder_kl(**config)
    vae.load_state_dict(state)
    return vae


def trained_autoencoder_qwen(seed: int) -> AutoencoderKLQwenImage:
    config, state = _trained_vae("qwen", seed, VAE_TRAINING_STEPS["qwen"])
    vae = _autoencoder_qwen(list(config["latents_mean"]), list(config["latents_std"]))
    vae.load_state_dict(state)
    return vae
