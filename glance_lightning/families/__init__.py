"""Model families: one LightningModule per diffusers pipeline family, found through the registry."""

from __future__ import annotations

from glance_lightning.registry import get_family


def family_class(family: str) -> type:
    """The GlanceModule subclass of ``family`` (imported on demand)."""
    return get_family(family).module_class()
