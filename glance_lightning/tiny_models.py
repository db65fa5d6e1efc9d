"""Tiny models of every supported family, in real diffusers on-disk format.

This module owns building them and finding them again. Each family gets the pipeline class and component
classes of its real checkpoint (FLUX.1-dev, SD3/3.5, Qwen-Image, Qwen-Image-Edit, Qwen-Image-Edit-2509/2511),
the real published scheduler config and tokenizers generated here, so ``<Pipeline>.from_pretrained(path)``
loads one exactly as it loads the real checkpoint, with no model hub involved. Every dimension is tiny and
the weights are random (seeded), except the VAE's: it is trained at build time (deterministically, ~10 s on
one CPU core, once per process for the FLUX/SD3 design and once for the Qwen one) into a crude but real
autoencoder, ~22 dB PSNR on the bundled 64x64 sample, whose latents are normalised to about zero mean and unit
std like the real ones'. A 2-step 64x64 text-to-image generation takes a small fraction of a second on a CPU
(the edit pipelines also VAE-encode each control image at ~1 megapixel, whatever the output size; that costs
about a second per image even with the tiny VAE).

``resolve_model_path("tiny:<family>")`` builds a family once into the cache and reuses it; the quick start
and the test suite pass such names wherever a real model id would go.

Shared tiny dimensions: every VAE downsamples 8x like the real ones (``vae_scale_factor == 8``) into 4 latent
channels; transformers have 2 heads of 16 dims (width 32); text encoders are 32 wide, except SD3's T5 (64,
to hold the two CLIP embeddings side by side). Prompts: CLIP 77 tokens, T5 up to 512, Qwen up to 1024 after
the system prompt, which the tiny Qwen tokenizer splits into exactly the 34/64 tokens the pipelines drop.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d
from tokenizers import AddedToken
from torch import nn
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)
from transformers.utils import is_torchvision_available

from glance_lightning.scheduler_configs import scheduler_config

__all__ = ["TINY_FAMILIES", "allow_qwen2vl_processor_without_torchvision", "build_tiny_model", "resolve_model_path"]

TINY_FAMILIES = ("flux", "sd3", "qwen-image", "qwen-image-edit", "qwen-image-edit-plus")
TINY_PREFIX = "tiny:"
TINY_VERSION = "v2"  # bump whenever what gets built changes, so stale cached builds are not reused
CACHE_ENV = "GLANCE_LIGHTNING_CACHE"

LATENT_CHANNELS = 4
HEAD_DIM = 16
NUM_HEADS = 2
TEXT_DIM = 32
CLIP_MAX_LENGTH = 77  # the FLUX/SD3 pipelines pad CLIP prompts to tokenizer.model_max_length
T5_MAX_LENGTH = 512  # the pipelines' upper bound for max_sequence_length
QWEN_MIN_PIXELS = 56 * 56  # the real Qwen2-VL image processor minimum
QWEN_MAX_PIXELS = 112 * 112  # tiny budget: a control image becomes at most 8x8 patches = 16 vision tokens

# The system prompts of the Qwen-Image pipelines (diffusers 0.42). The tiny tokenizer has one token per word
# of these, like the real one, so `prompt_template_encode_start_idx` (34 for Qwen-Image, 64 for the edit
# pipelines) drops exactly the system prompt, as with the real checkpoints.
_QWEN_TEMPLATE_TEXTS = (
    "system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
    "system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input "
    "where appropriate.",
    "\nuser\nPicture 1: \nassistant\n",
)
_QWEN_SPECIAL_TOKENS = (  # Qwen2-VL's added tokens, in their real order
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

T = TypeVar("T")


# ---------------------------------------------------------------------------------------------- tokenizers


@lru_cache(maxsize=1)
def _byte_symbols() -> tuple[str, ...]:
    """The printable characters byte-level BPE uses for the bytes 0..255 (GPT-2's ``bytes_to_unicode``)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    others = [b for b in range(256) if b not in printable]
    by_byte = {b: b for b in printable} | {b: 256 + i for i, b in enumerate(others)}
    return tuple(chr(by_byte[b]) for b in range(256))


def _clip_tokenizer() -> CLIPTokenizer:
    """CLIP byte-level BPE without merges: the 256 byte symbols, their ``</w>`` forms, then BOS and EOS."""
    symbols = list(_byte_symbols())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


def _t5_tokenizer() -> T5TokenizerFast:
    """T5 Unigram over printable ASCII: each character alone and after the word-start marker."""
    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _train_bpe(words: Iterable[str]) -> list[tuple[str, str]]:
    """Deterministic BPE merges after which each of ``words`` (byte-level symbols) is a single token."""
    counts = Counter(words)
    splits = {word: list(word) for word in counts}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, parts in splits.items():
            for pair in zip(parts, parts[1:], strict=False):
                pairs[pair] += counts[word]
        if not pairs:
            return merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for parts in splits.values():
            i = 0
            while i < len(parts) - 1:
                if (parts[i], parts[i + 1]) == best:
                    parts[i : i + 2] = [parts[i] + parts[i + 1]]
                i += 1


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Qwen2 byte-level BPE: byte symbols, a token per word of the pipelines' system prompts, then the
    Qwen2-VL special tokens (so ``<|image_pad|>`` etc. are single tokens the processor can expand)."""
    pretokenizer = Qwen2Tokenizer().backend_tokenizer.pre_tokenizer
    words = [word for text in _QWEN_TEMPLATE_TEXTS for word, _ in pretokenizer.pre_tokenize_str(text)]
    merges = _train_bpe(words)
    tokens = [*_byte_symbols(), *(left + right for left, right in merges), *_QWEN_SPECIAL_TOKENS]
    vocab = {token: i for i, token in enumerate(tokens)}
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", model_max_length=32768)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in _QWEN_SPECIAL_TOKENS])
    return tokenizer


def _qwen_processor(tokenizer: Qwen2Tokenizer) -> Qwen2VLProcessor:
    """Qwen2-VL processor: the tokenizer plus the (torchvision-free) Qwen2-VL image processor."""
    allow_qwen2vl_processor_without_torchvision()
    image_processor = Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS)
    return Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def allow_qwen2vl_processor_without_torchvision() -> None:
    """Let ``Qwen2VLProcessor`` be built and loaded without a video processor when torchvision is missing.

    transformers 5 makes the video processor a required part of ``Qwen2VLProcessor``, and the video
    processor needs torchvision; so without torchvision no Qwen2-VL processor, tiny or real, can be built or
    loaded, although the Qwen-Image-Edit pipelines only pass images. This drops ``video_processor`` from the
    processor's sub-processors in that case only. Idempotent; a no-op when torchvision is installed.
    """
    if is_torchvision_available() or getattr(Qwen2VLProcessor, "_glance_without_video", False):
        return
    get_attributes = Qwen2VLProcessor.get_attributes.__func__

    def without_video(cls: type) -> list[str]:
        return [name for name in get_attributes(cls) if name != "video_processor"]

    Qwen2VLProcessor.get_attributes = classmethod(without_video)
    Qwen2VLProcessor._glance_without_video = True


# -------------------------------------------------------------------------------------------- text encoders


def _clip_text_model(tokenizer: CLIPTokenizer, projection: bool) -> CLIPTextModel | CLIPTextModelWithProjection:
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        projection_dim=TEXT_DIM,
        num_hidden_layers=2,  # SD3 reads hidden_states[-2]
        num_attention_heads=NUM_HEADS,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # the pooled output is taken at the first EOS
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _t5_encoder(tokenizer: T5TokenizerFast, d_model: int) -> T5EncoderModel:
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=HEAD_DIM,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=NUM_HEADS,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1, like FLUX's and SD3's T5-XXL
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _qwen_vl(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    """Qwen2.5-VL: 2-layer text model TEXT_DIM wide (multimodal RoPE), 2-block vision tower 16 wide."""
    ids = tokenizer.convert_tokens_to_ids
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_DIM,
        "intermediate_size": 2 * TEXT_DIM,
        "num_hidden_layers": 2,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": 1,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
        "bos_token_id": ids("<|endoftext|>"),
        "eos_token_id": ids("<|im_end|>"),
    }
    vision_config = {
        "depth": 2,
        "hidden_size": HEAD_DIM,
        "intermediate_size": 2 * HEAD_DIM,
        "num_heads": NUM_HEADS,
        "out_hidden_size": TEXT_DIM,
        "fullatt_block_indexes": [1],
    }
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config)


# --------------------------------------------------------------------------------------------------- VAEs
#
# The VAEs are real, if crude, autoencoders, trained for a few seconds at build time on procedural scenes so that
# decode(encode(image)) looks like the image. From a random initialisation that budget teaches them next to
# nothing, so training starts from a hand-set linear "skeleton" that already is an autoencoder: the encoder
# averages each 8x8 patch's colour into latent channels 0-2 and the decoder upsamples it back smoothly; every
# residual branch and attention output starts at zero (each block an identity) and training bends them into
# sharper reconstructions, putting latent channel 3 to use. Two tricks keep the skeleton linear through the
# norm + SiLU at the end of encoder and decoder: a constant channel (value VAE_CONSTANT, beside its negation)
# dominates the norm's statistics, so normalising divides by a near-constant; and every signal travels beside
# its negation, since silu(x) - silu(-x) == x.

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
    vae: nn.Module, reconstruct: Callable[[torch.Tensor], torch.Tensor], seed: int, steps: int
) -> None:
    """Adam on reconstruction MSE of fresh synthetic scenes, warmup then cosine decay; deterministic for a seed."""
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
    for step in range(steps):
        lr = VAE_LR * min(1.0, (step + 1) / 10) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        images = _synthetic_scenes(VAE_BATCH, generator, VAE_TRAINING_SIZE)
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


def _trained_autoencoder_kl(seed: int) -> AutoencoderKL:
    config, state = _trained_vae("kl", seed, VAE_TRAINING_STEPS["kl"])
    vae = _autoencoder_kl(**config)
    vae.load_state_dict(state)
    return vae


def _trained_autoencoder_qwen(seed: int) -> AutoencoderKLQwenImage:
    config, state = _trained_vae("qwen", seed, VAE_TRAINING_STEPS["qwen"])
    vae = _autoencoder_qwen(list(config["latents_mean"]), list(config["latents_std"]))
    vae.load_state_dict(state)
    return vae


# ----------------------------------------------------------------------------------------- transformers


def _flux_transformer(text_dim: int, pooled_dim: int) -> FluxTransformer2DModel:
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # latents are packed in 2x2 patches
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim,
        guidance_embeds=True,  # FLUX.1-dev is guidance-distilled
        axes_dims_rope=(4, 6, 6),
    )


def _sd3_transformer(text_dim: int, pooled_dim: int) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=32,  # default generation size 256x256
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=2,  # the last block is context_pre_only
        attention_head_dim=HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        joint_attention_dim=text_dim,
        caption_projection_dim=HEAD_DIM * NUM_HEADS,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=64,  # images up to 1024x1024
        qk_norm="rms_norm",  # as SD3.5
    )


def _qwen_transformer() -> QwenImageTransformer2DModel:
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * LATENT_CHANNELS,  # latents are packed in 2x2 patches
        out_channels=LATENT_CHANNELS,
        num_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        joint_attention_dim=TEXT_DIM,
        axes_dims_rope=(4, 6, 6),
    )


# --------------------------------------------------------------------------------------------- families


def _seeded(seed: int, make: Callable[[], T]) -> T:
    torch.manual_seed(seed)
    return make()


def _scheduler(family: str) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config(family))


def _flux(seed: int) -> DiffusionPipeline:
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    return FluxPipeline(
        scheduler=_scheduler("flux"),
        vae=_trained_autoencoder_kl(seed),
        text_encoder=_seeded(seed, lambda: _clip_text_model(clip_tokenizer, projection=False)),
        tokenizer=clip_tokenizer,
        text_encoder_2=_seeded(seed, lambda: _t5_encoder(t5_tokenizer, d_model=TEXT_DIM)),
        tokenizer_2=t5_tokenizer,
        # pooled prompt embedding = CLIP pooler output; prompt tokens = T5 hidden states
        transformer=_seeded(seed, lambda: _flux_transformer(text_dim=TEXT_DIM, pooled_dim=TEXT_DIM)),
    )


def _sd3(seed: int) -> DiffusionPipeline:
    clip_tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer()
    return StableDiffusion3Pipeline(
        scheduler=_scheduler("sd3"),
        vae=_trained_autoencoder_kl(seed),
        text_encoder=_seeded(seed, lambda: _clip_text_model(clip_tokenizer, projection=True)),
        tokenizer=clip_tokenizer,
        text_encoder_2=_seeded(seed + 1, lambda: _clip_text_model(clip_tokenizer, projection=True)),
        tokenizer_2=_clip_tokenizer(),
        text_encoder_3=_seeded(seed, lambda: _t5_encoder(t5_tokenizer, d_model=2 * TEXT_DIM)),
        tokenizer_3=t5_tokenizer,
        # prompt tokens = [CLIP-L ; CLIP-G] hidden states (as wide as T5), then T5's; pooled = both projections
        transformer=_seeded(seed, lambda: _sd3_transformer(text_dim=2 * TEXT_DIM, pooled_dim=2 * TEXT_DIM)),
    )


def _qwen_components(seed: int, scheduler_family: str) -> dict[str, Any]:
    tokenizer = _qwen_tokenizer()
    return {
        "scheduler": _scheduler(scheduler_family),
        "vae": _trained_autoencoder_qwen(seed),
        "text_encoder": _seeded(seed, lambda: _qwen_vl(tokenizer)),
        "tokenizer": tokenizer,
        "transformer": _seeded(seed, _qwen_transformer),
    }


def _qwen_image(seed: int) -> DiffusionPipeline:
    return QwenImagePipeline(**_qwen_components(seed, "qwen-image"))


def _qwen_image_edit(seed: int) -> DiffusionPipeline:
    components = _qwen_components(seed, "qwen-image-edit")
    return QwenImageEditPipeline(**components, processor=_qwen_processor(components["tokenizer"]))


def _qwen_image_edit_plus(seed: int) -> DiffusionPipeline:
    components = _qwen_components(seed, "qwen-image-edit")
    return QwenImageEditPlusPipeline(**components, processor=_qwen_processor(components["tokenizer"]))


_BUILDERS: dict[str, Callable[[int], DiffusionPipeline]] = {
    "flux": _flux,
    "sd3": _sd3,
    "qwen-image": _qwen_image,
    "qwen-image-edit": _qwen_image_edit,
    "qwen-image-edit-plus": _qwen_image_edit_plus,
}


# ------------------------------------------------------------------------------------------------- saving


def _use_real_class_names(path: Path) -> None:
    """transformers 5 saves ``T5TokenizerFast`` under its alias ``T5Tokenizer``, a sentencepiece class in
    transformers 4; record the name the real checkpoints' model_index.json uses."""
    index_file = path / "model_index.json"
    index = json.loads(index_file.read_text())
    for name, entry in index.items():
        if entry == ["transformers", "T5Tokenizer"]:
            index[name] = ["transformers", "T5TokenizerFast"]
    index_file.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _add_video_processor_config(processor_dir: Path) -> None:
    """Give the saved processor the video processor entry real ones have: where torchvision is installed,
    transformers requires one to load a Qwen2-VL processor (the edit pipelines never pass videos)."""
    config_file = processor_dir / "processor_config.json"
    config = json.loads(config_file.read_text())
    config["video_processor"] = {
        "video_processor_type": "Qwen2VLVideoProcessor",
        "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": QWEN_MAX_PIXELS},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------------------------------------- public


def _check_family(family: str) -> None:
    if family not in _BUILDERS:
        raise ValueError(f"unknown tiny model family {family!r}; expected one of: {', '.join(TINY_FAMILIES)}")


def build_tiny_model(family: str, path: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny model of `family` (seeded random weights, a VAE trained from `seed`) in diffusers format at
    `path` (must not exist or be empty)."""
    _check_family(family)
    path = Path(path)
    if path.exists() and any(path.iterdir()):
        raise FileExistsError(f"cannot build a tiny {family} model into non-empty {path}")
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG as it was
        pipeline = _BUILDERS[family](seed)
    pipeline.save_pretrained(path, safe_serialization=True)
    _use_real_class_names(path)
    if (path / "processor").is_dir():
        _add_video_processor_config(path / "processor")
    return path


def cache_dir() -> Path:
    """glance_lightning's cache root: ``$GLANCE_LIGHTNING_CACHE``, else ``~/.cache/glance_lightning``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "glance_lightning"


def resolve_model_path(name_or_path: str) -> str:
    """'tiny:<family>' -> path of a tiny model built once into a cache dir and reused; anything else returned
    unchanged."""
    if not name_or_path.startswith(TINY_PREFIX):
        return name_or_path
    family = name_or_path[len(TINY_PREFIX) :]
    _check_family(family)
    target = cache_dir() / "tiny" / f"{family}-{TINY_VERSION}"
    if not (target / "model_index.json").is_file():
        if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            raise RuntimeError(
                f"{name_or_path}: not built yet, and rank {torch.distributed.get_rank()} cannot build it (transformers "
                "saves weights on rank 0 only); build it before launching, or let GlanceModule.prepare_data do it"
            )
        _build_into_place(family, target)
    return str(target)


def _build_into_place(family: str, target: Path) -> None:
    """Build into a private sibling directory, then rename it to `target` in one step, so readers never see
    a partial model; if a concurrent builder got there first, keep theirs and discard ours."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build_tiny_model(family, staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


allow_qwen2vl_processor_without_torchvision()  # the edit pipelines, tiny or real, load without torchvision
