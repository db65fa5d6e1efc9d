"""What a model family is, as data: ``FamilySpec``, and ``like=`` inheritance between specs.

A leaf module (it imports nothing of the project but ``errors``): the built-in entries (``families.specs``), the
registry and every command read it. Classes, builders and tables may be ``"module:attribute"`` strings, imported
only when used, so that reading a spec (e.g. for a command's ``--help``) imports no model code.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from glance_lightning.errors import ConfigError

GUIDANCE_KINDS = ("embedded", "cfg", "none")
IDENTITY_LAYOUT = "diffusers"  # lora_layout of a family whose ComfyUI module names are diffusers' own
# The fields a spec with ``like=`` takes from that family when it leaves them unset.
INHERITED = ("scheduler_config", "calculate_shift", "architecture", "encoder_params", "lora_layout",
             "guidance_kind", "guidance", "tiny_builder")


def load_ref(ref: Any) -> Any:
    """``"package.module:attribute"`` -> the attribute (imported now); anything else is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module_name, _, attribute = ref.partition(":")
    return getattr(importlib.import_module(module_name), attribute)


@dataclass(frozen=True)
class FamilySpec:
    """Everything the shared code needs to know about one model family (see docs/new-family.md)."""

    name: str
    module: str | type  # the GlanceModule subclass (or "module:Class")
    pipeline: str | type  # the diffusers pipeline class (or "module:Class"); loaded with from_pretrained
    scheduler_config: Mapping[str, Any] | None = None  # the published FlowMatchEulerDiscreteScheduler config
    # FLUX/Qwen pipelines hand the scheduler sigmas=linspace(1, 1/N, N); SD3 hands none (the scheduler
    # interpolates its training range). Either way the shift is the scheduler config's.
    linspace_sigmas: bool = True
    # ``calculate_shift(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)`` for dynamic shifting;
    # None: the one in the pipeline class's own module, as the pipeline calls it.
    calculate_shift: str | Callable[..., float] | None = None
    official_qwen: bool = False  # the official Glance Qwen pipelines' arithmetic applies (--mode official-qwen)
    control_images: tuple[int, int] = (0, 0)  # (min, max) control images per training sample / sample call
    # (seed, spec) -> a tiny pipeline instance of ``spec.pipeline``, for tiny:<name>; a one-argument builder gets
    # the seed alone
    tiny_builder: str | Callable[..., Any] | None = None
    architecture: Mapping[str, Any] | None = None  # full-size transformer config (the planner's input)
    # parameters of the text encoders and VAE the family loads, by name (the planner's encode stage)
    encoder_params: Mapping[str, float] | None = None
    # ComfyUI's module names: IDENTITY_LAYOUT ("diffusers"), a sequence of lora_layouts.NativeRule or a
    # "module:TABLE" string naming one; None: no ComfyUI/kohya export
    lora_layout: str | Sequence[Any] | None = None
    # how sampling guides: "embedded" (a guidance embedding, the module's ``guidance`` option, `sample --guidance`),
    # "cfg" (classifier-free guidance with a negative prompt, `sample --guidance-scale`) or "none"
    guidance_kind: str | None = None
    guidance: str = ""  # the same in words (the family table, docs/families.md)
    like: str | None = None  # a registered family whose unset fields (INHERITED) this one takes
    extra: Mapping[str, Any] = field(default_factory=dict)

    def module_class(self) -> type:
        cls = load_ref(self.module)
        if getattr(cls, "family", self.name) != self.name:
            raise ConfigError(f"family {self.name!r} names {cls.__name__}, whose `family` is {cls.family!r}: give "
                              "the class the family's name")
        return cls

    def pipeline_class(self) -> type:
        return load_ref(self.pipeline)

    @property
    def pipeline_name(self) -> str:
        """The pipeline's class name (what a model's ``model_index.json`` declares), without importing it."""
        ref = self.pipeline
        return ref.rpartition(":")[2] if isinstance(ref, str) else ref.__name__

    @property
    def module_path(self) -> str:
        """``package.module.Class`` of the module, as a fit config's ``model.class_path`` names it."""
        ref = self.module
        return ref.replace(":", ".") if isinstance(ref, str) else f"{ref.__module__}.{ref.__qualname__}"

    def scheduler(self) -> dict[str, Any]:
        """A copy of the published scheduler config (callers may change it)."""
        return copy.deepcopy(dict(self.scheduler_config or {}))

    def shift_function(self) -> Callable[..., float]:
        if self.calculate_shift is not None:
            return load_ref(self.calculate_shift)
        pipeline = self.pipeline_class()
        function = getattr(importlib.import_module(pipeline.__module__), "calculate_shift", None)
        if function is None:
            raise ConfigError(
                f"family {self.name!r}: its scheduler config shifts dynamically but {pipeline.__name__}'s module has "
                "no calculate_shift; give FamilySpec(calculate_shift=...)"
            )
        return function

    def takes_controls(self) -> bool:
        return self.control_images[1] > 0

    def unused_guidance(self, guidance: float | None = None, guidance_scale: float | None = None,
                        negative_prompt: str | None = None) -> str | None:
        """The first of these settings this family's sampling would ignore ("guidance", "guidance_scale" or
        "negative_prompt"; a scale of 1 is no guidance), else None: callers refuse it, never drop it."""
        if guidance is not None and self.guidance_kind != "embedded":
            return "guidance"
        if self.guidance_kind != "cfg" and guidance_scale is not None and guidance_scale != 1.0:
            return "guidance_scale"
        if self.guidance_kind != "cfg" and negative_prompt is not None:
            return "negative_prompt"
        return None

    def build_tiny(self, seed: int) -> Any:
        """A tiny pipeline of this family from its ``tiny_builder``."""
        builder = load_ref(self.tiny_builder)
        takes_spec = len(inspect.signature(builder).parameters) >= 2
        return builder(seed, self) if takes_spec else builder(seed)


def inherit(spec: FamilySpec, parent: FamilySpec | None) -> FamilySpec:
    """``spec`` with its unset INHERITED fields taken from ``parent`` (its ``like``), then checked."""
    if parent is not None:
        defaults = {f.name: f.default for f in dataclasses.fields(FamilySpec)}
        taken = {name: getattr(parent, name) for name in INHERITED
                 if getattr(spec, name) == defaults[name] and getattr(parent, name) != defaults[name]}
        spec = dataclasses.replace(spec, **taken)
    if spec.guidance_kind is None:
        spec = dataclasses.replace(spec, guidance_kind="none")
    if spec.guidance_kind not in GUIDANCE_KINDS:
        raise ConfigError(f"family {spec.name!r}: guidance_kind={spec.guidance_kind!r}; expected one of "
                          f"{', '.join(GUIDANCE_KINDS)}")
    if not isinstance(spec.scheduler_config, Mapping):
        raise ConfigError(f"family {spec.name!r}: give its scheduler_config (the model's "
                          "scheduler/scheduler_config.json) or like=<a family with the same scheduler>")
    return spec
