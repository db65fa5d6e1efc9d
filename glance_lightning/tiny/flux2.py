"""The tiny FLUX.2 pipelines: FLUX.2 [dev] (``Flux2Pipeline``) and FLUX.2 [klein] (``Flux2KleinPipeline``).

``flux2_components`` / ``flux2_klein_components`` give a tiny pipeline's components, built from the component
classes of the real checkpoints; the builders ``flux2`` and ``flux2_klein`` (the specs' ``tiny_builder``) build a
spec's pipeline class from them. Weights are random and seeded, except the VAE's: an ``AutoencoderKLFlux2`` that
carries the trained tiny ``AutoencoderKL`` of ``vae`` (same module tree, so its weights copy over), identity
quant convs (the real VAE has them) and latent batch-norm statistics measured on typical images, so the
pipelines' normalised, 2x2-patchified latents have about zero mean and unit variance per channel.

Text encoders, deep enough for the pipelines' default ``text_encoder_out_layers`` (the hidden states of three
layers, concatenated into the transformer's ``joint_attention_dim`` = 3 x TEXT_DIM):

- [klein]: ``Qwen3ForCausalLM``, QWEN3_LAYERS layers, hidden_states[9, 18, 27]; the tiny Qwen tokenizer with a
  Qwen3 chat template (``enable_thinking=False`` appends the empty think block, as Qwen3's does);
- [dev]: ``Mistral3ForConditionalGeneration``, MISTRAL_LAYERS layers, hidden_states[10, 20, 30], with a 1-block
  Pixtral vision tower; a byte-level BPE tokenizer in Mistral's layout (its special tokens at their real ids,
  ``[IMG]`` = 10) with a Mistral-3 chat template. The real checkpoint's ``tokenizer`` is a ``PixtralProcessor``,
  which transformers cannot import without torchvision; ``Flux2Pipeline.encode_prompt`` only calls
  ``apply_chat_template`` on it, which the tokenizer alone answers (only prompt upsampling needs the processor).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    PreTrainedTokenizerFast,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from glance_lightning.family_spec import FamilySpec
from glance_lightning.tiny.builders import HEAD_DIM, NUM_HEADS, TEXT_DIM, _scheduler, _seeded
from glance_lightning.tiny.tokenizers import _byte_symbols, _train_bpe, qwen_tokenizer
from glance_lightning.tiny.vae import LATENT_CHANNELS, _deterministic_cpu, _typical_latents, trained_autoencoder_kl

__all__ = ["MISTRAL_LAYERS", "QWEN3_LAYERS", "flux2", "flux2_components", "flux2_klein", "flux2_klein_components"]

QWEN3_LAYERS = 28  # Flux2KleinPipeline stacks hidden_states[9, 18, 27] (the real Qwen3-4B has 36 layers)
MISTRAL_LAYERS = 31  # Flux2Pipeline stacks hidden_states[10, 20, 30] (the real Mistral Small 3.1 has 40)
MISTRAL_MAX_LENGTH = 131072

# Qwen3's chat template, cut down to what Flux2KleinPipeline renders: messages, the generation prompt and, with
# enable_thinking=False, the empty think block.
QWEN3_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
# Mistral Small 3.1's chat template, cut down to text messages (Flux2Pipeline's content is a list of text parts).
MISTRAL_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['content'] is string %}{%- set text = message['content'] %}"
    "{%- else %}{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text')"
    " | join('') %}{%- endif %}"
    "{%- if message['role'] == 'system' %}{{- '[SYSTEM_PROMPT]' + text + '[/SYSTEM_PROMPT]' }}"
    "{%- elif message['role'] == 'user' %}{{- '[INST]' + text + '[/INST]' }}"
    "{%- else %}{{- text + eos_token }}{%- endif %}"
    "{%- endfor %}"
)
_MISTRAL_SPECIAL_TOKENS = (  # Tekken's first control tokens, at their real ids
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)


# ------------------------------------------------------------------------------------------------ tokenizers


def qwen3_tokenizer() -> Qwen2Tokenizer:
    """The tiny Qwen tokenizer with Qwen3's think markers and chat template ([klein])."""
    tokenizer = qwen_tokenizer()
    tokenizer.add_tokens(["<think>", "</think>"])  # single (non-special) tokens, as in Qwen3
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def mistral_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE like Mistral's Tekken: the control tokens, the 256 byte symbols, then a token per word of
    Flux2Pipeline's system message (so it costs about as many tokens as with the real tokenizer)."""
    pretokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    merges = _train_bpe(word for word, _ in pretokenizer.pre_tokenize_str(SYSTEM_MESSAGE))
    tokens = [*_MISTRAL_SPECIAL_TOKENS, *_byte_symbols(), *(left + right for left, right in merges)]
    backend = Tokenizer(BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=merges))
    backend.pre_tokenizer = pretokenizer
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _MISTRAL_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        chat_template=MISTRAL_CHAT_TEMPLATE,
        model_max_length=MISTRAL_MAX_LENGTH,
    )


# --------------------------------------------------------------------------------------------- text encoders


def _qwen3(tokenizer: Qwen2Tokenizer) -> Qwen3ForCausalLM:
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        intermediate_size=2 * TEXT_DIM,
        num_hidden_layers=QWEN3_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=1,
        head_dim=HEAD_DIM,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        tie_word_embeddings=True,  # as Qwen3-4B
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return Qwen3ForCausalLM(config)


def _mistral3(tokenizer: PreTrainedTokenizerFast) -> Mistral3ForConditionalGeneration:
    """Mistral-3: a MISTRAL_LAYERS-layer Mistral text model TEXT_DIM wide, a 1-block Pixtral tower 16 wide."""
    text_config = {
        "model_type": "mistral",
        "vocab_size": len(tokenizer),
        "hidden_size": TEXT_DIM,
        "intermediate_size": 2 * TEXT_DIM,
        "num_hidden_layers": MISTRAL_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": 1,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": MISTRAL_MAX_LENGTH,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e9},
        "sliding_window": None,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "model_type": "pixtral",
        "hidden_size": HEAD_DIM,
        "intermediate_size": 2 * HEAD_DIM,
        "num_hidden_layers": 1,
        "num_attention_heads": NUM_HEADS,
        "image_size": 224,
        "patch_size": 14,
    }
    config = Mistral3Config(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
        tie_word_embeddings=False,  # as Mistral Small 3.1
    )
    return Mistral3ForConditionalGeneration(config)


# ------------------------------------------------------------------------------------- VAE and transformer


def _identity_conv(conv: torch.nn.Conv2d) -> None:
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.out_channels).view(conv.out_channels, conv.in_channels, 1, 1))
        conv.bias.zero_()


def _set_latent_statistics(vae: AutoencoderKLFlux2, seed: int) -> None:
    """The batch-norm running statistics of typical images' patchified latents, per channel (eval semantics:
    the pipelines normalise with the running statistics, never batch statistics)."""
    with _deterministic_cpu():  # one thread: the same statistics whatever the thread count
        latents = _typical_latents(lambda images: vae.encode(images).latent_dist.mode(), seed)
    patches = Flux2KleinPipeline._patchify_latents(latents)
    with torch.no_grad():
        vae.bn.running_mean.copy_(patches.mean(dim=(0, 2, 3)))
        eps = vae.config.batch_norm_eps  # the pipelines divide by sqrt(running_var + eps)
        vae.bn.running_var.copy_((patches.var(dim=(0, 2, 3)) - eps).clamp_min(eps))
        vae.bn.num_batches_tracked.fill_(1)
    vae.eval()


def flux2_vae(seed: int) -> AutoencoderKLFlux2:
    """``AutoencoderKLFlux2`` (8x, LATENT_CHANNELS latent channels) carrying the trained tiny ``AutoencoderKL``."""
    source: AutoencoderKL = trained_autoencoder_kl(seed)
    shared = ("down_block_types", "up_block_types", "block_out_channels", "layers_per_block", "act_fn",
              "latent_channels", "norm_num_groups", "sample_size", "mid_block_add_attention")
    vae = AutoencoderKLFlux2(**{key: source.config[key] for key in shared})  # quant convs on, as the real one
    missing, unexpected = vae.load_state_dict(source.state_dict(), strict=False)
    if unexpected or any(not key.startswith(("quant_conv.", "post_quant_conv.", "bn.")) for key in missing):
        raise RuntimeError(f"AutoencoderKLFlux2 does not match AutoencoderKL: {missing=} {unexpected=}")
    _identity_conv(vae.quant_conv)
    _identity_conv(vae.post_quant_conv)
    _set_latent_statistics(vae, seed)
    return vae


def _flux2_transformer(guidance_embeds: bool) -> Flux2Transformer2DModel:
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,  # latents are patchified 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=HEAD_DIM,
        num_attention_heads=NUM_HEADS,
        joint_attention_dim=3 * TEXT_DIM,  # three text encoder layers side by side
        axes_dims_rope=(4, 4, 4, 4),  # (T, H, W, L) position ids
        guidance_embeds=guidance_embeds,
    )


# ------------------------------------------------------------------------------------------------- families


def flux2_klein_components(seed: int, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The components of a tiny Flux2KleinPipeline (FLUX.2 [klein] base: CFG, no guidance embedding)."""
    tokenizer = qwen3_tokenizer()
    return {
        "scheduler": _scheduler(scheduler_config),
        "vae": flux2_vae(seed),
        "text_encoder": _seeded(seed, lambda: _qwen3(tokenizer)),
        "tokenizer": tokenizer,
        "transformer": _seeded(seed, lambda: _flux2_transformer(guidance_embeds=False)),
    }


def flux2_components(seed: int, scheduler_config: Mapping[str, Any]) -> dict[str, Any]:
    """The components of a tiny Flux2Pipeline (FLUX.2 [dev]: guidance-distilled, a guidance embedding)."""
    tokenizer = mistral_tokenizer()
    return {
        "scheduler": _scheduler(scheduler_config),
        "vae": flux2_vae(seed),
        "text_encoder": _seeded(seed, lambda: _mistral3(tokenizer)),
        "tokenizer": tokenizer,
        "transformer": _seeded(seed, lambda: _flux2_transformer(guidance_embeds=True)),
    }


def flux2(seed: int, spec: FamilySpec) -> Any:
    return spec.pipeline_class()(**flux2_components(seed, spec.scheduler()))


def flux2_klein(seed: int, spec: FamilySpec) -> Any:
    return spec.pipeline_class()(**flux2_klein_components(seed, spec.scheduler()))
