"""The tiny text encoders and transformers, the components of each pipeline design, and the builders.

``*_components(seed, scheduler_config)`` gives the components of a tiny pipeline of one design (FLUX.1, SD3/3.5,
Qwen-Image and its edit pipelines), built from the component classes of the real checkpoint, the given scheduler
config and the tokenizers and trained VAEs of this package. The builders (``flux``, ``sd3``, ``qwen_image``,
``qwen_image_edit``) take a seed and a family's spec and build the spec's pipeline class from them; the specs
name them as ``tiny_builder`` (public, with the components, in ``glance_lightning.testing``). Weights are random,
seeded: building twice from one seed gives the same weights.

Tiny dimensions: transformers have 2 heads of 16 dims (width 32); text encoders are 32 wide, except SD3's T5
(64, to hold the two CLIP embeddings side by side).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    QwenImageTransformer2DModel,
    SD3Transformer2DModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from glance_lightning.family_spec import FamilySpec
from glance_lightning.tiny.tokenizers import (
    CLIP_MAX_LENGTH,
    clip_tokenizer,
    qwen_processor,
    qwen_tokenizer,
    t5_tokenizer,
)
from glance_lightning.tiny.vae import LATENT_CHANNELS, trained_autoencoder_kl, trained_autoencoder_qwen

__all__ = ["flux", "flux_components", "qwen_image", "qwen_image_components", "qwen_image_edit", "qwen_image_edit_plus",
           "sd3", "sd3_components"]

HEAD_DIM = 16
NUM_HEADS = 2
TEXT_DIM = 32

T = TypeVar("T")


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


def vision_token_ids(tokenizer: Qwen2Tokenizer) -> dict[str, int]:
    """The Qwen VL configs' image/video/vision-bracket token ids: the tiny Qwen tokenizer's."""
    ids = tokenizer.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


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
        **vision_token_ids(tokenizer),
    )
    return Qwen2_5_VLForConditionalGeneration(config)



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


def _scheduler(config: Mapping[str, Any]) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_config(dict(config))


def flux_components(seed: int, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The components of a tiny FLUX.1-design pipeline (FluxPipeline and the pipelines that share its components,
    such as FluxKontextPipeline): CLIP-L + T5 text encoders, the trained tiny VAE, a FLUX transformer."""
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    return {
        "scheduler": _scheduler(scheduler_config),
        "vae": trained_autoencoder_kl(seed),
        "text_encoder": _seeded(seed, lambda: _clip_text_model(clip, projection=False)),
        "tokenizer": clip,
        "text_encoder_2": _seeded(seed, lambda: _t5_encoder(t5, d_model=TEXT_DIM)),
        "tokenizer_2": t5,
        # pooled prompt embedding = CLIP pooler output; prompt tokens = T5 hidden states
        "transformer": _seeded(seed, lambda: _flux_transformer(text_dim=TEXT_DIM, pooled_dim=TEXT_DIM)),
    }


def sd3_components(seed: int, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The components of a tiny StableDiffusion3Pipeline: two CLIPs + T5, the trained tiny VAE, an MMDiT."""
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    return {
        "scheduler": _scheduler(scheduler_config),
        "vae": trained_autoencoder_kl(seed),
        "text_encoder": _seeded(seed, lambda: _clip_text_model(clip, projection=True)),
        "tokenizer": clip,
        "text_encoder_2": _seeded(seed + 1, lambda: _clip_text_model(clip, projection=True)),
        "tokenizer_2": clip_tokenizer(),
        "text_encoder_3": _seeded(seed, lambda: _t5_encoder(t5, d_model=2 * TEXT_DIM)),
        "tokenizer_3": t5,
        # prompt tokens = [CLIP-L ; CLIP-G] hidden states (as wide as T5), then T5's; pooled = both projections
        "transformer": _seeded(seed, lambda: _sd3_transformer(text_dim=2 * TEXT_DIM, pooled_dim=2 * TEXT_DIM)),
    }


def qwen_image_components(seed: int, scheduler_config: Mapping[str, Any], processor: bool = False
                          ) -> dict[str, Any]:
    """The components of a tiny Qwen-Image pipeline (``processor``: the edit pipelines' Qwen2-VL processor too)."""
    tokenizer = qwen_tokenizer()
    components = {
        "scheduler": _scheduler(scheduler_config),
        "vae": trained_autoencoder_qwen(seed),
        "text_encoder": _seeded(seed, lambda: _qwen_vl(tokenizer)),
        "tokenizer": tokenizer,
        "transformer": _seeded(seed, _qwen_transformer),
    }
    if processor:
        components["processor"] = qwen_processor(tokenizer)
    return components


# The builders the built-in specs name (``tiny_builder``): (seed, spec) -> the spec's pipeline class built from
# these components and the spec's scheduler config, so a family declared ``like=`` one of them gets a tiny model
# of its own pipeline class.
def flux(seed: int, spec: FamilySpec) -> Any:
    return spec.pipeline_class()(**flux_components(seed, spec.scheduler()))


def sd3(seed: int, spec: FamilySpec) -> Any:
    return spec.pipeline_class()(**sd3_components(seed, spec.scheduler()))


def qwen_image(seed: int, spec: FamilySpec) -> Any:
    return spec.pipeline_class()(**qwen_image_components(seed, spec.scheduler()))


def qwen_image_edit(seed: int, spec: FamilySpec) -> Any:
    return spec.pipeline_class()(**qwen_image_components(seed, spec.scheduler(), processor=True))


qwen_image_edit_plus = qwen_image_edit
