"""The tiny text encoders and transformers, and one public builder per family.

Each builder takes a seed and returns the family's diffusers pipeline instance, built from the component
classes of the real checkpoint (FLUX.1-dev, SD3/3.5, Qwen-Image, Qwen-Image-Edit, Qwen-Image-Edit-2509/2511),
the family's published scheduler config (from the registry) and the tokenizers and trained VAEs of this
package; the registry names them as each family's ``tiny_builder``. Weights are random, seeded: building
twice from one seed gives the same weights.

Tiny dimensions: transformers have 2 heads of 16 dims (width 32); text encoders are 32 wide, except SD3's T5
(64, to hold the two CLIP embeddings side by side).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from diffusers import (
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

from glance_lightning.registry import get_family
from glance_lightning.tiny.tokenizers import (
    CLIP_MAX_LENGTH,
    clip_tokenizer,
    qwen_processor,
    qwen_tokenizer,
    t5_tokenizer,
)
from glance_lightning.tiny.vae import LATENT_CHANNELS, trained_autoencoder_kl, trained_autoencoder_qwen

__all__ = ["flux", "qwen_image", "qwen_image_edit", "qwen_image_edit_plus", "sd3"]

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
    return FlowMatchEulerDiscreteScheduler.from_config(get_family(family).scheduler())


def flux(seed: int) -> FluxPipeline:
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    return FluxPipeline(
        scheduler=_scheduler("flux"),
        vae=trained_autoencoder_kl(seed),
        text_encoder=_seeded(seed, lambda: _clip_text_model(clip, projection=False)),
        tokenizer=clip,
        text_encoder_2=_seeded(seed, lambda: _t5_encoder(t5, d_model=TEXT_DIM)),
        tokenizer_2=t5,
        # pooled prompt embedding = CLIP pooler output; prompt tokens = T5 hidden states
        transformer=_seeded(seed, lambda: _flux_transformer(text_dim=TEXT_DIM, pooled_dim=TEXT_DIM)),
    )


def sd3(seed: int) -> StableDiffusion3Pipeline:
    clip, t5 = clip_tokenizer(), t5_tokenizer()
    return StableDiffusion3Pipeline(
        scheduler=_scheduler("sd3"),
        vae=trained_autoencoder_kl(seed),
        text_encoder=_seeded(seed, lambda: _clip_text_model(clip, projection=True)),
        tokenizer=clip,
        text_encoder_2=_seeded(seed + 1, lambda: _clip_text_model(clip, projection=True)),
        tokenizer_2=clip_tokenizer(),
        text_encoder_3=_seeded(seed, lambda: _t5_encoder(t5, d_model=2 * TEXT_DIM)),
        tokenizer_3=t5,
        # prompt tokens = [CLIP-L ; CLIP-G] hidden states (as wide as T5), then T5's; pooled = both projections
        transformer=_seeded(seed, lambda: _sd3_transformer(text_dim=2 * TEXT_DIM, pooled_dim=2 * TEXT_DIM)),
    )


def _qwen_components(seed: int, family: str) -> dict[str, Any]:
    tokenizer = qwen_tokenizer()
    return {
        "scheduler": _scheduler(family),
        "vae": trained_autoencoder_qwen(seed),
        "text_encoder": _seeded(seed, lambda: _qwen_vl(tokenizer)),
        "tokenizer": tokenizer,
        "transformer": _seeded(seed, _qwen_transformer),
    }


def qwen_image(seed: int) -> QwenImagePipeline:
    return QwenImagePipeline(**_qwen_components(seed, "qwen-image"))


def qwen_image_edit(seed: int) -> QwenImageEditPipeline:
    components = _qwen_components(seed, "qwen-image-edit")
    return QwenImageEditPipeline(**components, processor=qwen_processor(components["tokenizer"]))


def qwen_image_edit_plus(seed: int) -> QwenImageEditPlusPipeline:
    components = _qwen_components(seed, "qwen-image-edit-plus")
    return QwenImageEditPlusPipeline(**components, processor=qwen_processor(components["tokenizer"]))
