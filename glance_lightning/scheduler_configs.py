"""The published FlowMatchEulerDiscreteScheduler configs of each supported family.

They are tiny, so they are kept verbatim: tiny test models and schedule derivation use the real ones.
"""

from __future__ import annotations

import copy

FAMILIES = ("flux", "sd3", "qwen-image", "qwen-image-edit", "qwen-image-edit-plus")

_FLUX = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}

_SD3 = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "num_train_timesteps": 1000,
    "shift": 3.0,
}

_QWEN_IMAGE = {
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

_CONFIGS = {
    "flux": _FLUX,
    "sd3": _SD3,
    "qwen-image": _QWEN_IMAGE,
    "qwen-image-edit": _QWEN_IMAGE,
    "qwen-image-edit-plus": _QWEN_IMAGE,
}


def scheduler_config(family: str) -> dict:
    """Return a copy of the published scheduler config of ``family``."""
    if family not in _CONFIGS:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    return copy.deepcopy(_CONFIGS[family])
