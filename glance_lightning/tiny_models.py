"""Tiny random-weight models of every supported family, in real diffusers on-disk format.

This module owns building them and finding them again. Each family gets the pipeline class and component
classes of its real checkpoint (FLUX.1-dev, SD3/3.5, Qwen-Image, Qwen-Image-Edit, Qwen-Image-Edit-2509/2511),
the real published scheduler config and tokenizers generated here, so ``<Pipeline>.from_pretrained(path)``
loads one exactly as it loads the real checkpoint, with no model hub involved. Weights are random (seeded)
and every dimension is tiny: a build takes about a second, a 2-step 64x64 text-to-image generation a small
fraction of one on a CPU (the edit pipelines also VAE-encode each control image at ~1 megapixel, whatever
the output size; that costs about a second per image even with the tiny VAE).

``resolve_model_path("tiny:<family>")`` builds a family once into the cache and reuses it; the quick start
and the test suite pass such names wherever a real model id would go.

Shared tiny dimensions: every VAE downsamples 8x like the real ones (``vae_scale_factor == 8``) into 4 latent
channels; transformers have 2 heads of 16 dims (width 32); text encoders are 32 wide, except SD3's T5 (64,
to hold the two CLIP embeddings side by side). Prompts: CLIP 77 tokens, T5 up to 512, Qwen up to 1024 after
the system prompt, which the tiny Qwen tokenizer splits into exactly the 34/64 tokens the pipelines drop.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import torch
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
from tokenizers import AddedToken
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
TINY_VERSION = "v1"  # bump whenever what gets built changes, so stale cached builds are not reused
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


def _autoencoder_kl(scaling_factor: float, shift_factor: float) -> AutoencoderKL:
    """Four-level (8x) KL VAE with 4 latent channels and the real family's scaling and shift factors."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 16, 16),
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=False,  # as FLUX.1 and SD3
        use_post_quant_conv=False,
    )


def _autoencoder_qwen() -> AutoencoderKLQwenImage:
    """Qwen-Image causal 3D VAE, 8x like the real one, with its first 4 latent statistics. No residual blocks
    outside the middle one: the edit pipelines encode every control image at ~1 megapixel."""
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=0,
        temperal_downsample=[False, True, True],
        latents_mean=[-0.7571, -0.7089, -0.9113, 0.1075],
        latents_std=[2.8184, 1.4541, 2.3275, 2.6558],
    )


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
        vae=_seeded(seed, lambda: _autoencoder_kl(scaling_factor=0.3611, shift_factor=0.1159)),
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
        vae=_seeded(seed, lambda: _autoencoder_kl(scaling_factor=1.5305, shift_factor=0.0609)),
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
        "vae": _seeded(seed, _autoencoder_qwen),
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
    """Build a tiny random model of `family` in diffusers format at `path` (must not exist or be empty)."""
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
