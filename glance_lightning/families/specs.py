"""The built-in families, declared once: the registry entry of FLUX.1, SD3/3.5, Qwen-Image and Qwen-Image-Edit.

The scheduler configs are the published ``scheduler/scheduler_config.json`` of each family's checkpoint, kept
verbatim (they are tiny): schedule derivation and the tiny models use the real ones. Classes and builders are
``"module:attribute"`` strings, imported only when used.
"""

from __future__ import annotations

from glance_lightning.registry import FamilySpec, register_family

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

_TINY = "glance_lightning.tiny.builders"
_QWEN_CFG = "true CFG (negative \" \", norm rescale)"

register_family(FamilySpec(
    name="flux", module="glance_lightning.families.flux:FluxGlance", pipeline="diffusers:FluxPipeline",
    scheduler_config=FLUX_SCHEDULER, tiny_builder=f"{_TINY}:flux",
    guidance="guidance embedding (`guidance`, as trained)",
))
register_family(FamilySpec(
    name="sd3", module="glance_lightning.families.sd3:SD3Glance", pipeline="diffusers:StableDiffusion3Pipeline",
    scheduler_config=SD3_SCHEDULER, linspace_sigmas=False, tiny_builder=f"{_TINY}:sd3",
    guidance="CFG with a negative prompt",
))
register_family(FamilySpec(
    name="qwen-image", module="glance_lightning.families.qwen_image:QwenImageGlance",
    pipeline="diffusers:QwenImagePipeline", scheduler_config=QWEN_IMAGE_SCHEDULER, official_qwen=True,
    tiny_builder=f"{_TINY}:qwen_image", guidance=_QWEN_CFG,
))
register_family(FamilySpec(
    name="qwen-image-edit", module="glance_lightning.families.qwen_image_edit:QwenImageEditGlance",
    pipeline="diffusers:QwenImageEditPipeline", scheduler_config=QWEN_IMAGE_SCHEDULER, official_qwen=True,
    control_images=(1, 1), tiny_builder=f"{_TINY}:qwen_image_edit",
    guidance=f"{_QWEN_CFG}; prompt encoded with the control",
))
register_family(FamilySpec(
    name="qwen-image-edit-plus", module="glance_lightning.families.qwen_image_edit:QwenImageEditPlusGlance",
    pipeline="diffusers:QwenImageEditPlusPipeline", scheduler_config=QWEN_IMAGE_SCHEDULER, official_qwen=True,
    control_images=(1, 3), tiny_builder=f"{_TINY}:qwen_image_edit_plus",
    guidance=f"{_QWEN_CFG}; one to three controls",
))
