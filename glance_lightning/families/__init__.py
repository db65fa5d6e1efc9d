"""Model families: one LightningModule per diffusers pipeline family, looked up by family name."""

from __future__ import annotations

import importlib

FAMILY_MODULES = {
    "flux": "glance_lightning.families.flux:FluxGlance",
    "sd3": "glance_lightning.families.sd3:SD3Glance",
    "qwen-image": "glance_lightning.families.qwen_image:QwenImageGlance",
    "qwen-image-edit": "glance_lightning.families.qwen_image_edit:QwenImageEditGlance",
    "qwen-image-edit-plus": "glance_lightning.families.qwen_image_edit:QwenImageEditPlusGlance",
}


def family_class(family: str) -> type:
    """The GlanceModule subclass of ``family`` (imported on demand)."""
    if family not in FAMILY_MODULES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILY_MODULES)}")
    module_name, class_name = FAMILY_MODULES[family].split(":")
    return getattr(importlib.import_module(module_name), class_name)
