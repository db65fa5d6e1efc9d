"""FLUX.2 [dev] (Flux2Pipeline, Mistral-3 text encoder, guidance embedding) and FLUX.2 [klein] base
(Flux2KleinPipeline, Qwen3 text encoder, classifier-free guidance).

What the two share, step for step as the pipelines (diffusers 0.42):

- latents: the VAE's latents are patchified 2x2 into 4x the channels (``_patchify_latents``) and normalised with
  the VAE's batch-norm statistics (``_encode_vae_image``); that patchified [B, 4C, H/16, W/16] tensor is this
  family's latent, noised and denoised as the pipelines do (their noise is drawn in that shape);
- tokens: each latent position is one token (``_pack_latents``) with 4-axis position ids (``_prepare_latent_ids``,
  int64), the text tokens with theirs (``_prepare_text_ids``); the transformer takes timestep t/1000;
- text: the pipeline's ``encode_prompt`` (hidden states of three encoder layers stacked), padded to
  ``max_sequence_length`` tokens and passed without a mask, as the pipelines do;
- the schedule's ``mu`` is ``compute_empirical_mu(image_seq_len, num_steps)``: it depends on the step count, so
  the Slow/Fast lists are read off the 50-step schedule (``schedules``).

[klein] trains on the base (non-distilled) checkpoints only: a step-distilled one (``is_distilled`` in its
``model_index.json``) is refused before its weights are read, since Glance distils a base model itself.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import Flux2KleinPipeline

from glance_lightning.errors import ConfigError
from glance_lightning.families.base import Conditioning, GlanceModule
from glance_lightning.families.hooks import expand_condition
from glance_lightning.lora_layouts import rule
from glance_lightning.settings import checked_text_tokens

# BFL's (ComfyUI's) module names of the diffusers modules, for `export --format comfyui/kohya`: the inverse of
# diffusers' _convert_non_diffusers_flux2_lora_to_diffusers (a fused qkv LoRA holds the q/k/v ones exactly; the
# single blocks' fused projection is one module in both).
_DOUBLE, _SINGLE = "transformer_blocks.{i}", "single_transformer_blocks.{i}"
COMFYUI_NAMES = (
    rule("double_blocks.{i}.img_attn.qkv", *(f"{_DOUBLE}.attn.to_{c}" for c in "qkv"), slots=(1, 1, 1)),
    rule("double_blocks.{i}.txt_attn.qkv", *(f"{_DOUBLE}.attn.add_{c}_proj" for c in "qkv"), slots=(1, 1, 1)),
    rule("double_blocks.{i}.img_attn.proj", f"{_DOUBLE}.attn.to_out.0"),
    rule("double_blocks.{i}.txt_attn.proj", f"{_DOUBLE}.attn.to_add_out"),
    rule("double_blocks.{i}.img_mlp.0", f"{_DOUBLE}.ff.linear_in"),
    rule("double_blocks.{i}.img_mlp.2", f"{_DOUBLE}.ff.linear_out"),
    rule("double_blocks.{i}.txt_mlp.0", f"{_DOUBLE}.ff_context.linear_in"),
    rule("double_blocks.{i}.txt_mlp.2", f"{_DOUBLE}.ff_context.linear_out"),
    rule("single_blocks.{i}.linear1", f"{_SINGLE}.attn.to_qkv_mlp_proj"),
    rule("single_blocks.{i}.linear2", f"{_SINGLE}.attn.to_out"),
    rule("img_in", "x_embedder"),
    rule("txt_in", "context_embedder"),
    rule("time_in.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    rule("time_in.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    rule("guidance_in.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    rule("guidance_in.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    rule("double_stream_modulation_img.lin", "double_stream_modulation_img.linear"),
    rule("double_stream_modulation_txt.lin", "double_stream_modulation_txt.linear"),
    rule("single_stream_modulation.lin", "single_stream_modulation.linear"),
    rule("final_layer.linear", "proj_out"),
    rule("final_layer.adaLN_modulation.1", "norm_out.linear", swap="always"),
)

# Patchify/pack/id helpers are static methods, identical in Flux2Pipeline and Flux2KleinPipeline.
_HELPERS = Flux2KleinPipeline


class Flux2Base(GlanceModule):
    """What FLUX.2 [dev] and [klein] share: latents, tokens, the transformer call. Not a family by itself."""

    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the double-stream blocks' image attention
    size_multiple = 16  # 8x VAE, then 2x2 patchify
    timestep_scale = 1.0  # the pipelines call the transformer with timestep / 1000 = sigma
    guidance_embedded = False

    def __init__(self, *args: Any, max_sequence_length: int = 512, **kwargs: Any) -> None:
        """
        Args:
            max_sequence_length: text tokens per prompt (the pipelines pad every prompt to it; at most 512).
        """
        super().__init__(*args, **kwargs)
        self.max_sequence_length = checked_text_tokens(max_sequence_length, 512)

    def family_options(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    # ------------------------------------------------------------------ text and latents
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _ = self.pipe.encode_prompt(prompt=prompts, device=self.device,
                                            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels -> the VAE latents' mode, patchified 2x2 and batch-norm normalised (the pipeline's own)."""
        return self.pipe._encode_vae_image(image=pixels, generator=None)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The inverse, as the pipeline's output path: de-normalise, unpatchify, decode."""
        vae = self.pipe.vae
        mean = vae.bn.running_mean.view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(latents.device,
                                                                                             latents.dtype)
        return vae.decode(_HELPERS._unpatchify_latents(latents * std + mean), return_dict=False)[0]

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        factor = 2 * self.pipe.vae_scale_factor
        return (4 * self.pipe.vae.config.latent_channels, height // factor, width // factor)

    # ------------------------------------------------------------------ transformer
    def guidance_input(self, batch: int, device: torch.device) -> torch.Tensor | None:
        return None

    def predict_velocity(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        b, c, h, w = noisy.shape
        dtype = self.transformer.dtype
        cond = expand_condition(cond, b)
        embeds = cond["prompt_embeds"].to(dtype)
        out = self.transformer(
            hidden_states=_HELPERS._pack_latents(noisy.to(dtype)),
            timestep=(sigma * self.timestep_scale).to(dtype),
            guidance=self.guidance_input(b, noisy.device),
            encoder_hidden_states=embeds,
            txt_ids=_HELPERS._prepare_text_ids(embeds).to(noisy.device),
            img_ids=_HELPERS._prepare_latent_ids(noisy).to(noisy.device),
            return_dict=False,
        )[0]
        return out.transpose(1, 2).reshape(b, c, h, w)  # tokens back to their grid (_unpack_latents_with_ids)

    def planned_prompt_embeds(self, tokens: int, architecture: Mapping[str, Any]) -> Conditioning:
        return {"prompt_embeds": torch.randn(1, tokens, architecture["joint_attention_dim"])}


class Flux2Glance(Flux2Base):
    """Glance for FLUX.2 [dev] (guidance-distilled: a guidance embedding, no CFG)."""

    family = "flux2"
    guidance_embedded = True

    def __init__(self, *args: Any, guidance: float = 1.0, **kwargs: Any) -> None:
        """
        Args:
            guidance: value of FLUX.2 [dev]'s guidance embedding, in training and sampling (the pipeline samples
                at 4.0 by default).
        """
        super().__init__(*args, **kwargs)
        if not math.isfinite(guidance):
            raise ConfigError(f"model.guidance={guidance}: give a finite number (FLUX.2 [dev] samples at 4.0)")
        self.guidance = guidance

    def family_options(self) -> dict[str, Any]:
        return {**super().family_options(), "guidance": self.guidance}

    def guidance_input(self, batch: int, device: torch.device) -> torch.Tensor | None:
        return torch.full((batch,), self.guidance, device=device, dtype=torch.float32)


class Flux2KleinGlance(Flux2Base):
    """Glance for FLUX.2 [klein] base 4B / 9B (classifier-free guidance with the empty negative prompt)."""

    family = "flux2-klein"
    default_negative_prompt = ""  # Flux2KleinPipeline's negative prompt

    def resolve_model(self) -> Any:
        """Refuse a step-distilled [klein] before its weights are read."""
        resolved = super().resolve_model()
        index = Path(resolved.path) / "model_index.json"
        if index.is_file() and json.loads(index.read_text()).get("is_distilled"):
            raise ConfigError(
                f"model.pretrained_model={self.hparams.pretrained_model!r} is a step-distilled FLUX.2 [klein] "
                "(is_distilled in its model_index.json); Glance trains on a base model: use "
                "black-forest-labs/FLUX.2-klein-base-4B or -base-9B")
        return resolved

    def guided_velocity(
        self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, negative: Conditioning | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """CFG as Flux2KleinPipeline: neg + s * (pos - neg) above scale 1, negative "" unless one is given."""
        if guidance_scale <= 1.0:
            return self.predict_velocity(noisy, sigma, cond)
        if negative is None:
            negative = self.conditioning_for(self.default_negative_prompt)
        pos = self.predict_velocity(noisy, sigma, cond)
        neg = self.predict_velocity(noisy, sigma, negative)
        return neg + guidance_scale * (pos - neg)
