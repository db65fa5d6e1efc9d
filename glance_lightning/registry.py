"""The family registry: every model family declared once, and everything else reads it.

A family is a ``FamilySpec``: its name, the GlanceModule subclass that trains it, the diffusers pipeline it
loads, the published scheduler config its schedules are derived from, how its pipeline hands sigmas to the
scheduler, whether the official-Qwen sampling mode applies, how many control images a sample takes, the
builder of its tiny quick-start model and (for the planner) its full-size transformer config. The CLI
choices, schedule derivation, ``tiny:`` names, ``sample`` and the family table of docs/families.md all come from here.

Classes and builders may be given as ``"module:attribute"`` strings so that reading the registry (e.g. for a
command's ``--help``) imports no model code. A family defined in user code registers itself with
``register_family(FamilySpec(...))`` and gets ``fit`` with derived lists, ``schedule``, ``sample`` and, if it
gives a ``tiny_builder``, ``tiny:<name>``; a package that declares it under the ``glance_lightning.families``
entry-point group gets it in the command line's ``--family`` choices too.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from glance_lightning.errors import ConfigError

ENTRY_POINT_GROUP = "glance_lightning.families"


class UnknownFamilyError(ConfigError):
    """A family name that is not registered; the message lists the registered ones."""


def load_ref(ref: Any) -> Any:
    """``"package.module:attribute"`` -> the attribute (imported now); anything else is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class FamilySpec:
    """Everything the shared code needs to know about one model family."""

    name: str
    module: str | type  # the GlanceModule subclass (or "module:Class")
    pipeline: str | type  # the diffusers pipeline class (or "module:Class"); loaded with from_pretrained
    scheduler_config: Mapping[str, Any]  # the published FlowMatchEulerDiscreteScheduler config
    # FLUX/Qwen pipelines hand the scheduler sigmas=linspace(1, 1/N, N); SD3 hands none (the scheduler
    # interpolates its training range). Either way the shift is the scheduler config's.
    linspace_sigmas: bool = True
    # ``calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)`` for dynamic shifting;
    # None: the one in the pipeline class's own module, as the pipeline calls it.
    calculate_shift: str | Callable[..., float] | None = None
    official_qwen: bool = False  # the official Glance Qwen pipelines' arithmetic applies (--mode official-qwen)
    control_images: tuple[int, int] = (0, 0)  # (min, max) control images per training sample / sample call
    tiny_builder: str | Callable[[int], Any] | None = None  # seed -> a tiny pipeline instance, for tiny:<name>
    architecture: Mapping[str, Any] | None = None  # full-size transformer config (the planner's input)
    guidance: str = ""  # how sampling guides, in words (the family table, docs/families.md)
    extra: Mapping[str, Any] = field(default_factory=dict)

    def module_class(self) -> type:
        cls = load_ref(self.module)
        if getattr(cls, "family", self.name) != self.name:
            raise TypeError(f"family {self.name!r} names {cls.__name__}, whose family is {cls.family!r}")
        return cls

    def pipeline_class(self) -> type:
        return load_ref(self.pipeline)

    @property
    def pipeline_name(self) -> str:
        """The pipeline's class name (what a model's ``model_index.json`` declares), without importing it."""
        ref = self.pipeline
        return ref.rpartition(":")[2] if isinstance(ref, str) else ref.__name__

    def scheduler(self) -> dict[str, Any]:
        """A copy of the published scheduler config (callers may change it)."""
        return copy.deepcopy(dict(self.scheduler_config))

    def shift_function(self) -> Callable[..., float]:
        if self.calculate_shift is not None:
            return load_ref(self.calculate_shift)
        pipeline = self.pipeline_class()
        function = getattr(importlib.import_module(pipeline.__module__), "calculate_shift", None)
        if function is None:
            raise TypeError(
                f"family {self.name!r}: its scheduler config shifts dynamically but {pipeline.__name__}'s module has "
                "no calculate_shift; give FamilySpec(calculate_shift=...)"
            )
        return function

    def takes_controls(self) -> bool:
        return self.control_images[1] > 0


_REGISTRY: dict[str, FamilySpec] = {}


def register_family(spec: FamilySpec, *, replace: bool = False) -> FamilySpec:
    """Add a family (``replace=True`` to redefine one); returns the spec."""
    _load_builtins()
    if not spec.name or ":" in spec.name or spec.name != spec.name.strip():
        raise ConfigError(f"family name {spec.name!r}: use a plain name such as 'my-family'")
    if spec.name in _REGISTRY and not replace and _REGISTRY[spec.name] != spec:
        raise ConfigError(f"family {spec.name!r} is already registered; pass replace=True to redefine it")
    low, high = spec.control_images
    if not 0 <= low <= high:
        raise ConfigError(f"family {spec.name!r}: control_images={spec.control_images} must be (min, max) with "
                         "0 <= min <= max")
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
            f"unknown family {name!r}; expected one of {', '.join(_REGISTRY)} (or register it with "
            "glance_lightning.registry.register_family)"
        )
    return _REGISTRY[name]


def family_of_module(cls: type) -> FamilySpec:
    """The spec of a GlanceModule subclass, by its ``family`` name."""
    name = getattr(cls, "family", None)
    if name is None:
        raise TypeError(f"{cls.__name__} sets no `family` name")
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


_BUILTINS_LOADED = False


def _load_builtins() -> None:
    """The built-in families, then those installed packages declare under the ``glance_lightning.families``
    entry-point group (each entry point a module that calls ``register_family`` when imported)."""
    global _BUILTINS_LOADED
    if not _BUILTINS_LOADED:
        _BUILTINS_LOADED = True
        importlib.import_module("glance_lightning.families.specs")
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            entry.load()
