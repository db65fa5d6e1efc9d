"""The tiny Qwen-Image 2.1 pipeline (``QwenImage21Pipeline``): its components, its builder, and the processor
work-around it needs without torchvision.

``qwen_image21_components`` gives a tiny pipeline's components, built from the component classes of the real
checkpoint; the builder ``qwen_image21`` (a spec's ``tiny_builder``) builds the spec's pipeline class from them.
Weights are random and seeded, except the VAE's:

- VAE: ``AutoencoderKLQwenImage21``, 16x like the real one (five levels, residual down/up blocks, RGBA in and
  out) but 16 channels wide with Z_DIM latent channels. Trained at build time like the VAEs of ``vae`` (a few
  seconds, deterministic, memoised per seed), from a hand-set linear skeleton: the residual blocks' built-in
  shortcuts already average 2x2 (down) and repeat 2x2 (up), so with every residual branch, downsampler and
  attention output at zero the encoder averages each 16x16 tile's colour into latent channels 0-3 and the decoder
  spreads it back, smoothed by the upsampler convs; the other latent channels start small and random. Its
  ``latents_mean`` / ``latents_std`` are measured on typical images, so normalised latents have about zero mean
  and unit std per channel.
- text encoder: ``Qwen3VLForConditionalGeneration``, 2 text layers TEXT_DIM wide (interleaved multimodal RoPE)
  and a 2-block vision tower 16 wide (16x16 patches merged 2x2, as the real one: one ``<|image_pad|>`` per 32x32
  pixels, i.e. per 2x2 latent tokens, which the transformer relies on), with the tiny Qwen tokenizer's vision ids.
- processor: ``Qwen3VLProcessor`` of the tiny Qwen tokenizer, the torchvision-free Qwen2-VL image processor (with
  Qwen3-VL's patch size and normalisation, and a small minimum size so that condition images keep the size the
  pipeline resized them to) and a Qwen3-VL chat template cut down to text and image parts; no video processor,
  which needs torchvision (``compat.allow_qwen2vl_processor_without_torchvision`` lets one load without it);
  ``build_tiny_model`` writes the video processor entry real ones have (``QWEN3VL_VIDEO_PROCESSOR``).
- transformer: ``QwenImage21Transformer2DModel``, 2 blocks of NUM_HEADS x HEAD_DIM, block-causal with
  ``causal_condition`` (so the pipeline's KV cache is used).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import torch
from diffusers import AutoencoderKLQwenImage21, QwenImage21Transformer2DModel
from transformers import (
    Qwen2Tokenizer,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from glance_lightning.compat import allow_qwen2vl_processor_without_torchvision
from glance_lightning.family_spec import FamilySpec
from glance_lightning.tiny.builders import HEAD_DIM, NUM_HEADS, TEXT_DIM, _scheduler, _seeded, vision_token_ids
from glance_lightning.tiny.tokenizers import qwen_tokenizer
from glance_lightning.tiny.vae import (
    _CENTRE,
    _SMOOTH,
    VAE_POSTERIOR_STD,
    _deterministic_cpu,
    _identity_block,
    _identity_mid_block,
    _pairs,
    _plain,
    _set_conv,
    _set_norm_scale,
    _set_readout,
    _synthetic_scenes,
    _train_autoencoder,
    _typical_latents,
)

__all__ = [
    "Z_DIM",
    "QWEN3VL_VIDEO_PROCESSOR",
    "qwen3vl_processor",
    "qwen_image21",
    "qwen_image21_components",
    "trained_autoencoder_qwen21",
]

Z_DIM = 16  # latent channels (the real VAE has 64); the transformer's in_channels/out_channels
VAE_WIDTH = 16  # every level of encoder and decoder
VAE_LEVELS = 5  # four 2x resamplings: 16x, as the pipeline assumes (vae_scale_factor = 16)
VAE_STEPS = 100  # about 3 s on one CPU core
VAE_TRAINING_SIZE = 64  # 4x4 latents: smaller scenes would be all border
VAE_TRAINING_BATCH = 4
IMAGE_CHANNELS = 4  # RGBA, as the real VAE: the pipeline hands it RGBA condition images
QWEN3VL_MIN_PIXELS = 32 * 32  # one merged 2x2 patch: condition images keep the pipeline's size (multiples of 32)
QWEN3VL_MAX_PIXELS = 4096 * 4096  # the real Qwen3-VL image processor's longest_edge (16777216)
QWEN3VL_MEAN_STD = [0.5, 0.5, 0.5]  # Qwen3-VL normalises to [-1, 1]
# The video processor entry of a real Qwen3-VL processor_config.json (the pipeline never passes videos; where
# torchvision is installed, transformers needs it to load the processor).
QWEN3VL_VIDEO_PROCESSOR = {
    "video_processor_type": "Qwen3VLVideoProcessor",
    "size": {"shortest_edge": QWEN3VL_MIN_PIXELS, "longest_edge": QWEN3VL_MAX_PIXELS},
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": QWEN3VL_MEAN_STD, "image_std": QWEN3VL_MEAN_STD,
}

# Qwen3-VL's chat template, cut down to what the pipeline renders (a system message of text parts) and image
# parts; the pipeline itself formats prompts as raw strings.
QWEN3VL_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}{%- for item in message['content'] %}"
    "{%- if item['type'] == 'image' or 'image' in item %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif 'text' in item %}{{- item['text'] }}{%- endif %}"
    "{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


# ----------------------------------------------------------------------------------------------- processor


def qwen3vl_processor(tokenizer: Qwen2Tokenizer) -> Qwen3VLProcessor:
    """Qwen3-VL processor: the tokenizer plus the (torchvision-free) Qwen2-VL image processor with Qwen3-VL's
    16x16 patches merged 2x2 and its [-1, 1] normalisation."""
    allow_qwen2vl_processor_without_torchvision()  # Qwen3-VL's too
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16,
        temporal_patch_size=2,
        merge_size=2,
        min_pixels=QWEN3VL_MIN_PIXELS,
        max_pixels=QWEN3VL_MAX_PIXELS,
        image_mean=QWEN3VL_MEAN_STD,
        image_std=QWEN3VL_MEAN_STD,
    )
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN3VL_CHAT_TEMPLATE)


# -------------------------------------------------------------------------------------------- text encoder


def _qwen3_vl(tokenizer: Qwen2Tokenizer) -> Qwen3VLForConditionalGeneration:
    """Qwen3-VL: a 2-layer text model TEXT_DIM wide, a 2-block vision tower 16 wide (one deepstack layer)."""
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_DIM,
        "intermediate_size": 2 * TEXT_DIM,
        "num_hidden_layers": 2,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": 1,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        # 8 rotary frequencies interleaved T, H, W (as Qwen3-VL's [24, 20, 20] of 64)
        "rope_parameters": {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [3, 3, 2],
                            "mrope_interleaved": True},
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "depth": 2,
        "hidden_size": HEAD_DIM,
        "intermediate_size": 2 * HEAD_DIM,
        "num_heads": NUM_HEADS,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "spatial_merge_size": 2,
        "out_hidden_size": TEXT_DIM,
        "deepstack_visual_indexes": [1],
    }
    config = Qwen3VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        **vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    return Qwen3VLForConditionalGeneration(config)


# --------------------------------------------------------------------------------------------------- VAE


def _autoencoder(latents_mean: list[float] | None = None, latents_std: list[float] | None = None
                 ) -> AutoencoderKLQwenImage21:
    return AutoencoderKLQwenImage21(
        base_dim=VAE_WIDTH,
        decoder_base_dim=VAE_WIDTH,
        z_dim=Z_DIM,
        dim_mult=[1] * VAE_LEVELS,  # one width: the residual blocks' shortcuts are plain 2x2 average / repeat
        num_res_blocks=0,  # no residual blocks but the decoder's one per level: encoding ~1 MP stays cheap
        temperal_downsample=[False, True, True, True],
        is_residual=True,
        in_channels=IMAGE_CHANNELS,
        out_channels=IMAGE_CHANNELS,
        latents_mean=latents_mean or [0.0] * Z_DIM,
        latents_std=latents_std or [1.0] * Z_DIM,
    )


def _zero(conv: torch.nn.Module) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()


def _identity_1x1(conv: torch.nn.Module) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.bias.zero_()
        conv.weight[:, :, 0, 0] = torch.eye(conv.weight.shape[0])


def _skeleton(vae: AutoencoderKLQwenImage21) -> None:
    """The linear starting point (see the module docstring), in ``vae``'s layout helpers: each signal beside its
    negation and a constant pair, so the norm + SiLU before each final conv passes them through."""
    encoder, decoder = vae.encoder, vae.decoder
    layout = _pairs(VAE_WIDTH, "RGBAK")
    _set_conv(encoder.conv_in, _plain(IMAGE_CHANNELS, "RGBA"), layout)
    for block in encoder.down_blocks:  # no residual blocks: downsampler conv + 2x2 average shortcut
        if block.downsampler is not None:
            _zero(block.downsampler.resample[1])
    _identity_mid_block(encoder.mid_block, layout)
    _set_norm_scale(encoder.norm_out.gamma, VAE_WIDTH)
    spare = encoder.conv_out.weight[IMAGE_CHANNELS:Z_DIM].detach().clone()
    _set_readout(encoder.conv_out, layout, "RGBA")
    with torch.no_grad():
        encoder.conv_out.weight[IMAGE_CHANNELS:Z_DIM] = 0.1 * spare  # the free latent channels: small, random
    _identity_1x1(vae.quant_conv)
    _identity_1x1(vae.post_quant_conv)

    _set_conv(decoder.conv_in, _plain(Z_DIM, "RGBA"), layout)
    _identity_mid_block(decoder.mid_block, layout)
    # upsampler(x) + repeat(x): an upsampler conv of SMOOTH - CENTRE makes each level a smoothed 2x upsampling
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            _identity_block(resnet, layout, layout)
        if block.upsampler is not None:
            _set_conv(block.upsampler.resample[1], layout, layout, _SMOOTH - _CENTRE)
    _set_norm_scale(decoder.norm_out.gamma, VAE_WIDTH)
    _set_readout(decoder.conv_out, layout, "RGBA")


def _rgba(images: torch.Tensor) -> torch.Tensor:
    """RGB images in [-1, 1] as opaque RGBA frames (B, 4, 1, H, W), as the pipeline hands the VAE."""
    return torch.cat([images, torch.ones_like(images[:, :1])], dim=1).unsqueeze(2)


def _train(vae: AutoencoderKLQwenImage21, seed: int, steps: int) -> None:
    """``vae._train_autoencoder`` on opaque RGBA scenes, the loss over all four channels (so the decoder keeps images
    opaque); VAE_TRAINING_SIZE-pixel scenes, VAE_TRAINING_BATCH at a time."""
    _train_autoencoder(vae, lambda x: vae.decode(vae.encode(x).latent_dist.mode()).sample, seed, steps,
                       lambda generator: _rgba(_synthetic_scenes(VAE_TRAINING_BATCH, generator, VAE_TRAINING_SIZE)))


@lru_cache(maxsize=4)
def _trained_vae(seed: int, steps: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config kwargs, state dict) of the VAE trained from `seed`, memoised per process."""
    with _deterministic_cpu(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = _autoencoder()
        _skeleton(vae)

        def encode(images: torch.Tensor) -> torch.Tensor:
            return vae.encode(_rgba(images)).latent_dist.mode()[:, :, 0]

        _train(vae, seed, steps)
        latents = _typical_latents(encode, seed)
        mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
        with torch.no_grad():  # the log-variance channels: a std of VAE_POSTERIOR_STD times the latents' spread
            vae.quant_conv.bias[Z_DIM:] = 2 * torch.log(VAE_POSTERIOR_STD * std)
        config = {
            "latents_mean": [round(v, 4) for v in mean.tolist()],
            "latents_std": [round(v, 4) for v in std.tolist()],
        }
    return config, {name: tensor.detach().clone() for name, tensor in vae.state_dict().items()}


def trained_autoencoder_qwen21(seed: int) -> AutoencoderKLQwenImage21:
    config, state = _trained_vae(seed, VAE_STEPS)
    vae = _autoencoder(list(config["latents_mean"]), list(config["latents_std"]))
    vae.load_state_dict(state)
    return vae


# ----------------------------------------------------------------------------------------------- transformer


def _transformer() -> QwenImage21Transformer2DModel:
    return QwenImage21Transformer2DModel(
        patch_size=1,  # 2.1 consumes latents unpatched
        in_channels=Z_DIM,
        out_channels=Z_DIM,
        num_layers=2,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        context_in_dim=TEXT_DIM,
        mlp_ratio=3,
        axes_dims_rope=(4, 6, 6),  # (frame, height, width), summing to HEAD_DIM
        causal_condition=True,
    )


# -------------------------------------------------------------------------------------------------- family


def qwen_image21_components(seed: int, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The components of a tiny QwenImage21Pipeline (no ``sample_sigmas``: the default linear grid)."""
    tokenizer = qwen_tokenizer()
    return {
        "scheduler": _scheduler(scheduler_config),
        "vae": trained_autoencoder_qwen21(seed),
        "text_encoder": _seeded(seed, lambda: _qwen3_vl(tokenizer)),
        "processor": qwen3vl_processor(tokenizer),
        "transformer": _seeded(seed, _transformer),
    }


def qwen_image21(seed: int, spec: FamilySpec) -> Any:
    return spec.pipeline_class()(**qwen_image21_components(seed, spec.scheduler()))
