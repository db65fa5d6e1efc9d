"""The built-in families, declared once (``BUILTIN``, registered by the registry): FLUX.1, FLUX.1 Kontext, FLUX.2 [dev]
and [klein], SD3/3.5, Qwen-Image, Qwen-Image-Edit and Qwen-Image 2.x.

The scheduler configs are the published ``scheduler/scheduler_config.json`` of each family's checkpoint, kept
verbatim (they are tiny): schedule derivation and the tiny models use the real ones. Classes and builders are
``"module:attribute"`` strings, imported only when used.
"""

from __future__ import annotations

from glance_lightning.family_spec import IDENTITY_LAYOUT, FamilySpec

FLUX_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

# FLUX.2 [dev] / [klein]: FLUX.1's config (the pipelines pass mu = compute_empirical_mu, so the shift bounds go
# unused)
FLUX2_SCHEDULER = {**FLUX_SCHEDULER, "time_shift_type": "exponential"}

SD3_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

QWEN_IMAGE_SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}

# Full-size transformer configs (the published transformer/config.json of each checkpoint, as diffusers' class
# defaults agree): the planner builds these on fake tensors. SD3 plans SD3.5-Large unless told otherwise
# (SD35_MEDIUM_TRANSFORMER is kept beside it, chosen when the model id names 3.5-medium).
FLUX_DEV_TRANSFORMER = {
    "_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": None,
    "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
    "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
SD35_LARGE_TRANSFORMER = {
    "_class_name": "SD3Transformer2DModel", "sample_size": 128, "patch_size": 2, "in_channels": 16,
    "num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38, "joint_attention_dim": 4096,
    "caption_projection_dim": 2432, "pooled_projection_dim": 2048, "out_channels": 16, "pos_embed_max_size": 192,
    "dual_attention_layers": [], "qk_norm": "rms_norm",
}
SD35_MEDIUM_TRANSFORMER = {
    **SD35_LARGE_TRANSFORMER, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
    "pos_embed_max_size": 384, "dual_attention_layers": list(range(13)),
}
QWEN_IMAGE_TRANSFORMER = {
    "_class_name": "QwenImageTransformer2DModel", "patch_size": 2, "in_channels": 64, "out_channels": 16,
    "num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
    "guidance_embeds": False, "axes_dims_rope": [16, 56, 56],
}
# Qwen-Image-Edit-2511: the controls' tokens modulated at timestep 0 (a second modulation row per block); chosen when
# the model id names 2511 (a local model's own transformer/config.json says it in any case).
QWEN_IMAGE_EDIT_2511_TRANSFORMER = {**QWEN_IMAGE_TRANSFORMER, "zero_cond_t": True}

# FLUX.2 (diffusers' scripts/convert_flux2_to_diffusers.py; joint_attention_dim = 3 x the text encoder's width):
# [dev] 32.2B parameters, [klein] 4B and 9B (their base variants share the architecture). Chosen by model id. Their
# VAE has 32 latent channels (the planner's default is 16: extra["latent_channels"]), patchified to 128.
FLUX2_DEV_TRANSFORMER = {
    "_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": 128, "out_channels": None,
    "num_layers": 8, "num_single_layers": 48, "attention_head_dim": 128, "num_attention_heads": 48,
    "joint_attention_dim": 15360, "timestep_guidance_channels": 256, "mlp_ratio": 3.0,
    "axes_dims_rope": [32, 32, 32, 32], "rope_theta": 2000, "eps": 1e-6, "guidance_embeds": True,
}
FLUX2_KLEIN_4B_TRANSFORMER = {**FLUX2_DEV_TRANSFORMER, "num_layers": 5, "num_single_layers": 20,
                              "num_attention_heads": 24, "joint_attention_dim": 7680, "guidance_embeds": False}
FLUX2_KLEIN_9B_TRANSFORMER = {**FLUX2_DEV_TRANSFORMER, "num_layers": 8, "num_single_layers": 24,
                              "num_attention_heads": 32, "joint_attention_dim": 12288, "guidance_embeds": False}

# Qwen-Image 2.x (QwenImage21Transformer2DModel's defaults, the 7.1B published one): 32 single-stream blocks; its VAE
# has 64 latent channels.
QWEN_IMAGE2_TRANSFORMER = {
    "_class_name": "QwenImage21Transformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": 64,
    "num_layers": 32, "attention_head_dim": 128, "num_attention_heads": 32, "context_in_dim": 4096, "mlp_ratio": 3,
    "axes_dims_rope": [16, 56, 56], "eps": 1e-6, "causal_condition": True,
}

# Parameters of the text encoders and VAE each family loads (published checkpoints): the planner's encode stage.
FLUX_ENCODERS = {"T5-XXL encoder": 4.762e9, "CLIP-L text": 0.123e9, "VAE": 0.0838e9}
SD3_ENCODERS = {"T5-XXL encoder": 4.762e9, "CLIP-L text": 0.124e9, "CLIP-G text": 0.695e9, "VAE": 0.0838e9}
QWEN_IMAGE_ENCODERS = {"Qwen2.5-VL-7B": 8.292e9, "VAE": 0.127e9}
FLUX2_ENCODERS = {"Mistral-Small-3.2-24B": 24.01e9, "VAE": 0.0841e9}
QWEN_IMAGE2_ENCODERS = {"Qwen3-VL-8B": 8.77e9, "VAE": 0.338e9}
FLUX2_KLEIN_ENCODERS = {"Qwen3-4B": 4.02e9, "VAE": 0.0841e9}  # the 9B variants: Qwen3-8B (8.19e9)

_TINY = "glance_lightning.tiny.builders"
_TINY_FLUX2 = "glance_lightning.tiny.flux2"
_FLUX2_MU = "diffusers.pipelines.flux2.pipeline_flux2:compute_empirical_mu"
_QWEN_CFG = "true CFG (negative \" \", norm rescale)"

BUILTIN = (
    FamilySpec(
        name="flux", module="glance_lightning.families.flux:FluxGlance", pipeline="diffusers:FluxPipeline",
        scheduler_config=FLUX_SCHEDULER, tiny_builder=f"{_TINY}:flux", architecture=FLUX_DEV_TRANSFORMER,
        encoder_params=FLUX_ENCODERS, lora_layout="glance_lightning.families.flux:COMFYUI_NAMES",
        guidance_kind="embedded", guidance="guidance embedding (`guidance`, as trained)",
    ),
    # FLUX.1 Kontext [dev]: FLUX.1-dev's scheduler, transformer config, encoders and layout (like=), one control.
    FamilySpec(
        name="flux-kontext", like="flux", module="glance_lightning.families.flux_kontext:FluxKontextGlance",
        pipeline="diffusers:FluxKontextPipeline", control_images=(1, 1),
        guidance="guidance embedding (`guidance`, as trained); the control as reference tokens",
    ),
    # FLUX.2: the published scheduler config (FLUX.1's), mu from compute_empirical_mu (it takes the step count).
    FamilySpec(
        name="flux2", module="glance_lightning.families.flux2:Flux2Glance", pipeline="diffusers:Flux2Pipeline",
        scheduler_config=FLUX2_SCHEDULER, calculate_shift=_FLUX2_MU, tiny_builder=f"{_TINY_FLUX2}:flux2",
        architecture=FLUX2_DEV_TRANSFORMER, encoder_params=FLUX2_ENCODERS, extra={"latent_channels": 32},
        lora_layout="glance_lightning.families.flux2:COMFYUI_NAMES",
        guidance_kind="embedded", guidance="guidance embedding (`guidance`, as trained)",
    ),
    FamilySpec(
        name="flux2-klein", like="flux2", module="glance_lightning.families.flux2:Flux2KleinGlance",
        pipeline="diffusers:Flux2KleinPipeline", tiny_builder=f"{_TINY_FLUX2}:flux2_klein",
        architecture=FLUX2_KLEIN_4B_TRANSFORMER, encoder_params=FLUX2_KLEIN_ENCODERS,
        extra={"architectures": {"9B": FLUX2_KLEIN_9B_TRANSFORMER}, "latent_channels": 32},
        guidance_kind="cfg", guidance="CFG with a negative prompt (\"\" by default); base models only",
    ),
    FamilySpec(
        name="sd3", module="glance_lightning.families.sd3:SD3Glance", pipeline="diffusers:StableDiffusion3Pipeline",
        scheduler_config=SD3_SCHEDULER, linspace_sigmas=False, tiny_builder=f"{_TINY}:sd3",
        architecture=SD35_LARGE_TRANSFORMER, extra={"architectures": {"3.5-medium": SD35_MEDIUM_TRANSFORMER}},
        encoder_params=SD3_ENCODERS, lora_layout="glance_lightning.families.sd3:COMFYUI_NAMES",
        guidance_kind="cfg", guidance="CFG with a negative prompt",
    ),
    FamilySpec(
        name="qwen-image", module="glance_lightning.families.qwen_image:QwenImageGlance",
        pipeline="diffusers:QwenImagePipeline", scheduler_config=QWEN_IMAGE_SCHEDULER, official_qwen=True,
        tiny_builder=f"{_TINY}:qwen_image", architecture=QWEN_IMAGE_TRANSFORMER, encoder_params=QWEN_IMAGE_ENCODERS,
        lora_layout=IDENTITY_LAYOUT,  # ComfyUI's Qwen-Image model (comfy/ldm/qwen_image) uses diffusers' names
        guidance_kind="cfg", guidance=_QWEN_CFG,
    ),
    # Qwen-Image 2.x: its pipeline's schedule arithmetic is Qwen-Image's (the same calculate_shift); its scheduler
    # config here is Qwen-Image's (ASSUMED: the 2.1 checkpoint's own file could not be read offline). A model folder's
    # own config and its sample_sigmas grid always win (model_schedule).
    FamilySpec(
        name="qwen-image-2", module="glance_lightning.families.qwen_image2:QwenImage2Glance",
        pipeline="diffusers:QwenImage21Pipeline", scheduler_config=QWEN_IMAGE_SCHEDULER,
        tiny_builder="glance_lightning.tiny.qwen_image21:qwen_image21", architecture=QWEN_IMAGE2_TRANSFORMER,
        encoder_params=QWEN_IMAGE2_ENCODERS, extra={"latent_channels": 64},
        lora_layout="glance_lightning.families.qwen_image2:COMFYUI_NAMES",
        guidance_kind="cfg", guidance="true CFG with a negative prompt (none by default)",
    ),
    # The edit families take Qwen-Image's scheduler, architecture, encoders, layout and guidance (like=).
    FamilySpec(
        name="qwen-image-edit", like="qwen-image",
        module="glance_lightning.families.qwen_image_edit:QwenImageEditGlance",
        pipeline="diffusers:QwenImageEditPipeline", official_qwen=True, control_images=(1, 1),
        tiny_builder=f"{_TINY}:qwen_image_edit", guidance=f"{_QWEN_CFG}; prompt encoded with the control",
    ),
    FamilySpec(
        name="qwen-image-edit-plus", like="qwen-image",
        module="glance_lightning.families.qwen_image_edit:QwenImageEditPlusGlance",
        pipeline="diffusers:QwenImageEditPlusPipeline", official_qwen=True, control_images=(1, 3),
        extra={"architectures": {"2511": QWEN_IMAGE_EDIT_2511_TRANSFORMER}},
        tiny_builder=f"{_TINY}:qwen_image_edit_plus", guidance=f"{_QWEN_CFG}; one to three controls",
    ),
)
