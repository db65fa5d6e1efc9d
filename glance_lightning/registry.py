"""The family registry: every model family declared once, and everything else reads it.

A family is a ``FamilySpec`` (``family_spec``): its name, the GlanceModule subclass that trains it, the diffusers
pipeline it loads, the published scheduler config its schedules are derived from, how many control images a
sample takes, the builder of its tiny quick-start model, its full-size transformer config and encoder sizes (the
planner), its ComfyUI key layout (export) and its kind of guidance (sample). The CLI choices, schedule
derivation, ``tiny:`` names, ``plan``, ``export``, ``sample`` and the family table of docs/families.md all come
from here, never from a family's name.

A family defined in user code registers itself with ``register_family(FamilySpec(...))`` (``like="flux"`` takes
FLUX's scheduler, architecture, layout, guidance and tiny builder where it sets none) and gets every command; a
package that declares it under the ``glance_lightning.families`` entry-point group gets it in the command line's
``--family`` choices too. docs/new-family.md walks through one.
"""

from __future__ import annotations

import importlib
import importlib.metadata

from glance_lightning.errors import ConfigError
from glance_lightning.family_spec import FamilySpec, inherit, load_ref

__all__ = ["ENTRY_POINT_GROUP", "FamilySpec", "UnknownFamilyError", "family_names", "family_of_module",
           "get_family", "load_ref", "markdown_table", "register_family", "unregister_family"]

ENTRY_POINT_GROUP = "glance_lightning.families"


class UnknownFamilyError(ConfigError):
    """A family name that is not registered; the message lists the registered ones."""


_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, *, replace: bool = False) -> FamilySpec:
    """Add a family (``replace=True`` to redefine one); returns the spec."""
    _load_builtins()
    if not spec.name or ":" in spec.name or spec.name != spec.name.strip():
        raise ConfigError(f"family name {spec.name!r}: use a plain name such as 'my-family'")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] != spec and \
            _REGISTRY[spec.name] != _resolved(spec):
        raise ConfigError(f"family {spec.name!r} is already registered; pass replace=True to redefine it")
    low, high = spec.control_images
    if not 0 <= low <= high:
        raise ConfigError(f"family {spec.name!r}: control_images={spec.control_images} must be (min, max) with "
                         "0 <= min <= max")
    if spec.like is not None and spec.like not in _REGISTRY:
        raise ConfigError(f"family {spec.name!r}: like={spec.like!r} is not a registered family; expected one of "
                          f"{', '.join(_REGISTRY)}")
    spec = inherit(spec, _REGISTRY.get(spec.like) if spec.like else None)
    _REGISTRY[spec.name] = spec
    return spec


def unregister_family(name: str) -> None:
    _REGISTRY.pop(name, None)


def family_names() -> tuple[str, ...]:
    """Registered family names, built-ins first, in registration order."""
    _load_builtins()
    return tuple(_REGISTRY)


def get_family(name: str) -> FamilySpec:
    _load_builtins()
    if name not in _REGISTRY:
        raise UnknownFamilyError(
            f"unknown family {name!r}; expected one of {', '.join(_REGISTRY)} (a family of your own: see "
            "docs/new-family.md)"
        )
    return _REGISTRY[name]


def family_of_module(cls: type) -> FamilySpec:
    """The spec of a GlanceModule subclass, by its ``family`` name."""
    name = getattr(cls, "family", None)
    if name is None:
        raise ConfigError(f"{cls.__name__} sets no `family` name: give it the name of its registered family")
    return get_family(name)


def markdown_table() -> str:
    """The family table of docs/families.md, generated from the registry (a test keeps that file equal to it)."""
    rows = ["| family | module | diffusers pipeline | control images | timestep the transformer takes | "
            "guidance at sampling |", "| --- | --- | --- | --- | --- | --- |"]
    for spec in (get_family(n) for n in family_names()):
        module = spec.module_class()
        path = f"{module.__module__}.{module.__name__}".removeprefix("glance_lightning.")
        timestep = "t (0-1000)" if module.timestep_scale == 1000 else "t / 1000 (= sigma)"
        low, high = spec.control_images
        controls = "none" if high == 0 else (str(low) if low == high else f"{low}-{high}")
        rows.append(f"| `{spec.name}` | `{path}` | `{spec.pipeline_class().__name__}` | {controls} | {timestep} | "
                    f"{spec.guidance} |")
    return "\n".join(rows)


def _resolved(spec: FamilySpec) -> FamilySpec | None:
    try:
        return inherit(spec, _REGISTRY.get(spec.like) if spec.like else None)
    except ConfigError:
        return None


_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """The built-in families, then those installed packages declare under the ``glance_lightning.families``
    entry-point group (each entry point a module that calls ``register_family`` when imported)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        for spec in importlib.import_module("glance_lightning.families.specs").BUILTIN:
            register_family(spec)
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            entry.load()
