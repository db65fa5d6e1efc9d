"""The public testing kit: what a family package needs to test itself in a few lines.

- ``FamilyContract``: the family contract as a pytest class; subclass it with ``family`` and ``config`` set.
- Tiny models: ``tiny_model_path("tiny:<family>")`` (built once into the cache, loaded like a real checkpoint),
  ``build_tiny_model``, and the components of each pipeline design (``flux_components``, ``sd3_components``,
  ``qwen_image_components``) with the builders the built-in specs use (``tiny_builders.flux`` ...): a spec
  declared ``like=`` a built-in family inherits its builder and gets a tiny model of its own pipeline class.
- Running things as a user does: ``fit_once``, ``run_command``, ``read_config``, ``config_objects``, and the
  ``lora_deltas`` / ``pipeline_parameters`` helpers.

Tests built on it never reach a model hub (set ``HF_HUB_OFFLINE=1``); it needs pytest (the ``dev`` extra).
docs/new-family.md walks through a whole family package and its contract test.
"""

from __future__ import annotations

from glance_lightning.testing.contract import FamilyContract
from glance_lightning.testing.runs import (
    config_objects,
    deep_merge,
    fit_once,
    lora_deltas,
    pipeline_parameters,
    read_config,
    run_command,
)
from glance_lightning.tiny import build_tiny_model, tiny_model_path
from glance_lightning.tiny import builders as tiny_builders
from glance_lightning.tiny.builders import flux_components, qwen_image_components, sd3_components

__all__ = [
    "FamilyContract",
    "build_tiny_model",
    "config_objects",
    "deep_merge",
    "fit_once",
    "flux_components",
    "lora_deltas",
    "pipeline_parameters",
    "qwen_image_components",
    "read_config",
    "run_command",
    "sd3_components",
    "tiny_builders",
    "tiny_model_path",
]
