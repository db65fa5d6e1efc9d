"""SD3 / SD3.5 (StableDiffusion3Pipeline): two CLIPs + T5, pooled projections, unpacked latents, timestep t.

Everything reuses the pipeline's own helpers: ``encode_prompt`` builds ``[CLIP-L ; CLIP-G | T5]`` token
embeddings and the pooled ``[CLIP-L ; CLIP-G]`` projection; latents are normalised with the VAE's shift and
scaling factors and are not packed (the transformer patchifies 2x2 itself).

The transformer is called exactly as ``StableDiffusion3Pipeline.__call__`` calls it: ``timestep`` is the
scheduler timestep in 0-1000 (``1000 * sigma``, float32 whatever the weights' dtype, as the scheduler's
``timesteps`` are), ``hidden_states`` the latents, ``encoder_hidden_states`` / ``pooled_projections`` the
prompt embeddings. Classifier-free guidance at sampling time is the pipeline's ordinary CFG:
``v = v_neg + scale * (v_pos - v_neg)`` from one batched call of two.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from glance_lightning.families.base import Conditioning, GlanceModule
from glance_lightning.families.hooks import expand_condition
from glance_lightning.families.latents import ShiftScaleLatents
from glance_lightning.lora_layouts import rule
from glance_lightning.settings import checked_text_tokens

# ComfyUI's (MMDiT) module names of the diffusers modules, for `export --format comfyui/kohya` (the spec's
# lora_layout)
CLIP_TOKENS = 77  # the CLIP tokens encode_prompt puts before the T5 tokens
_DOUBLE = "transformer_blocks.{i}"
_JOINT = "joint_blocks.{i}"
# comfy/utils.py mmdit_to_diffusers (MMDIT_MAP_BLOCK, MMDIT_MAP_BASIC)
COMFYUI_NAMES = (
    rule(f"{_JOINT}.x_block.attn.qkv", *(f"{_DOUBLE}.attn.to_{c}" for c in "qkv"), slots=(1, 1, 1)),
    rule(f"{_JOINT}.context_block.attn.qkv", *(f"{_DOUBLE}.attn.add_{c}_proj" for c in "qkv"), slots=(1, 1, 1)),
    rule(f"{_JOINT}.x_block.attn.proj", f"{_DOUBLE}.attn.to_out.0"),
    rule(f"{_JOINT}.context_block.attn.proj", f"{_DOUBLE}.attn.to_add_out"),
    rule(f"{_JOINT}.x_block.mlp.fc1", f"{_DOUBLE}.ff.net.0.proj"),
    rule(f"{_JOINT}.x_block.mlp.fc2", f"{_DOUBLE}.ff.net.2"),
    rule(f"{_JOINT}.context_block.mlp.fc1", f"{_DOUBLE}.ff_context.net.0.proj"),
    rule(f"{_JOINT}.context_block.mlp.fc2", f"{_DOUBLE}.ff_context.net.2"),
    rule(f"{_JOINT}.x_block.adaLN_modulation.1", f"{_DOUBLE}.norm1.linear"),
    rule(f"{_JOINT}.context_block.adaLN_modulation.1", f"{_DOUBLE}.norm1_context.linear", swap="pre-only"),
    rule("context_embedder", "context_embedder"),
    rule("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
    rule("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
    rule("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
    rule("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
    rule("x_embedder.proj", "pos_embed.proj"),
    rule("final_layer.linear", "proj_out"),
    rule("final_layer.adaLN_modulation.1", "norm_out.linear", swap="always"),
)
# ComfyUI's Qwen-Image model (comfy/ldm/qwen_image/model.py) uses diffusers' module names: None = identity.


class SD3Glance(ShiftScaleLatents, GlanceModule):
    """Glance for Stable Diffusion 3 / 3.5 (Medium, Large, Large Turbo).

    Default LoRA targets are the image-stream attention projections ``to_q, to_k, to_v, to_out.0``: the
    same set as the official FLUX recipe and diffusers' SD3 DreamBooth-LoRA default. They leave the text
    stream (``add_*_proj``, ``to_add_out``) and the MLPs frozen, which keeps each LoRA small; widen
    ``lora.targets`` if a sample is not learnt well enough.
    """

    family = "sd3"
    default_lora_targets = ("to_q", "to_k", "to_v", "to_out.0")
    size_multiple = 16  # VAE factor 8 x transformer patch size 2
    repeated_blocks = ("JointTransformerBlock",)  # diffusers declares none for SD3
    timestep_scale = 1000.0  # StableDiffusion3Pipeline calls the transformer with the 0-1000 timestep
    default_negative_prompt = ""  # StableDiffusion3Pipeline's negative prompt when none is given

    def __init__(self, *args: Any, max_sequence_length: int = 256, **kwargs: Any) -> None:
        """
        Args:
            max_sequence_length: T5 tokens per prompt (the pipeline's default is 256, the maximum 512); the
                transformer sees 77 CLIP tokens followed by these.
        """
        super().__init__(*args, **kwargs)
        self.max_sequence_length = checked_text_tokens(max_sequence_length, 512)

    def family_options(self) -> dict[str, Any]:
        return {"max_sequence_length": self.max_sequence_length}

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, _, pooled, _ = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            do_classifier_free_guidance=False,  # negatives are encoded as prompts of their own when sampling
            max_sequence_length=self.max_sequence_length,
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def planned_prompt_embeds(self, tokens: int, architecture: Mapping[str, Any]) -> Conditioning:
        """[CLIP-L ; CLIP-G] tokens (77) before the T5 tokens, as encode_prompt builds them."""
        return {"prompt_embeds": torch.randn(1, CLIP_TOKENS + tokens, architecture["joint_attention_dim"]),
                "pooled_prompt_embeds": torch.randn(1, architecture["pooled_projection_dim"])}

    def predict_velocity(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        batch = noisy.shape[0]
        dtype = self.transformer.dtype
        cond = expand_condition(cond, batch)
        return self.transformer(
            hidden_states=noisy.to(dtype),
            # float32 like the scheduler's timesteps: in bfloat16 986.06 would become 986.0 and 939.14 940.0
            timestep=(sigma.float() * self.timestep_scale).expand(batch),
            encoder_hidden_states=cond["prompt_embeds"].to(dtype),
            pooled_projections=cond["pooled_prompt_embeds"].to(dtype),
            return_dict=False,
        )[0]

    def guided_velocity(
        self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning, negative: Conditioning | None,
        guidance_scale: float,
    ) -> torch.Tensor:
        """Ordinary CFG as in the pipeline: no guidance at scale <= 1; otherwise one batched call of
        [negative, positive]. Without a negative prompt the pipeline's default, the empty prompt, is used."""
        if guidance_scale <= 1.0:
            return self.predict_velocity(noisy, sigma, cond)
        if negative is None:
            negative = self.conditioning_for(self.default_negative_prompt)
        batch = noisy.shape[0]
        neg, pos = expand_condition(negative, batch), expand_condition(cond, batch)
        both = {k: torch.cat([neg[k], pos[k]]) for k in pos}
        v_neg, v_pos = self.predict_velocity(torch.cat([noisy, noisy]), sigma.expand(batch).repeat(2), both).chunk(2)
        return v_neg + guidance_scale * (v_pos - v_neg)
