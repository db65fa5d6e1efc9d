"""Other tools' LoRA key layouts: exporting Glance LoRAs to them and reading theirs (see ``lora_io`` for our file).

**Exports** (``python -m glance_lightning export``): ``comfyui`` writes ComfyUI's own module names
(``diffusion_model.<name>.lora_down/lora_up/alpha``), ``kohya`` the same names as ``lora_unet_<name_with_underscores>``.
For FLUX (BFL names) and SD3 (MMDiT names) the separate q/k/v (and FLUX's proj_mlp) LoRAs become one LoRA of the
fused ``qkv``/``linear1`` weight: down = the stacked A matrices, up = the B matrices block-diagonally, so the
weight change is the same, exactly (rank = the sum of the ranks, alpha = that rank). Qwen-Image's ComfyUI names
are diffusers' names. The name tables are those of ComfyUI's comfy/utils.py (``flux_to_diffusers``,
``mmdit_to_diffusers``) and comfy/lora.py (``model_lora_keys_unet``); tests/test_export.py checks each export
against an independent transcription of ComfyUI's loader.

**Reading** (``read_lora_modules``) accepts all of these layouts and those of other trainers (kohya sd-scripts,
musubi-tuner, OneTrainer ``lora_transformer_``, ai-toolkit, the official Glance releases): every module comes out
as a diffusers module name with its (A, B) pair, alpha/rank folded into B. Fused ComfyUI/kohya weights are split
back into their q/k/v parts (compactly when the up matrix is block-diagonal, as our exports are).
"""


from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

from glance_lightning.errors import ConfigError, ExistingFileError
from glance_lightning.family_spec import IDENTITY_LAYOUT, load_ref
from glance_lightning.lora_io import (
    GLANCE_METADATA_KEY,
    atomic_save_safetensors,
    check_lora_file,
    jsonable,
    open_lora,
    peft_scale,
)
from glance_lightning.registry import get_family

FORMATS = ("diffusers", "comfyui", "kohya")

Modules = dict[str, tuple[torch.Tensor, torch.Tensor]]  # diffusers module name -> (lora_A, lora_B with scale folded)


class LoraLayoutError(ConfigError):
    """A LoRA file whose keys this module cannot map onto the family's modules."""


# ---------------------------------------------------------------------------------------------- name tables


@dataclass(frozen=True)
class NativeRule:
    """One ComfyUI (original-checkpoint) module and the diffusers module(s) it holds.

    ``diffusers`` has one name per slot of a fused weight (in row order); ``slots`` gives each slot's height in
    multiples of the module's input width (FLUX's fused linear1 = q, k, v, then the 4x MLP). ``swap`` is ComfyUI's
    ``swap_scale_shift`` (the two row halves exchanged): "always", "pre-only" (only where the module is the
    2x-wide modulation of a context-pre-only block, SD3's last block), or None.
    """

    native: str
    diffusers: tuple[str, ...]
    slots: tuple[int, ...] = (1,)
    swap: str | None = None


def rule(native: str, *diffusers: str, slots: tuple[int, ...] = (1,), swap: str | None = None) -> NativeRule:
    """A ``NativeRule``; ``{i}`` in the names stands for a block index."""
    return NativeRule(native, diffusers, slots, swap)




def _compile(pattern: str, underscored: bool = False) -> re.Pattern:
    text = pattern.replace(".", "_") if underscored else pattern
    return re.compile(re.escape(text).replace(re.escape("{i}"), r"(\d+)"))


@dataclass
class _Table:
    """A family's rules compiled for lookups in both directions (dotted and underscored names)."""

    rules: tuple[NativeRule, ...]
    by_native: list[tuple[re.Pattern, re.Pattern, NativeRule]] = field(default_factory=list)
    by_diffusers: list[tuple[re.Pattern, re.Pattern, NativeRule, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for rule in self.rules:
            self.by_native.append((_compile(rule.native), _compile(rule.native, True), rule))
            for slot, name in enumerate(rule.diffusers):
                self.by_diffusers.append((_compile(name), _compile(name, True), rule, slot))

    def native_of(self, module: str) -> tuple[NativeRule, str, int] | None:
        """diffusers module -> (rule, its block index or "", slot)."""
        for dotted, _, rule, slot in self.by_diffusers:
            if match := dotted.fullmatch(module):
                return rule, (match.group(1) if match.groups() else ""), slot
        return None

    def match(self, raw: str, underscored: bool) -> tuple[str, Any] | None:
        """A module name as found in a file -> ("diffusers", name) or ("native", (rule, index))."""
        for dotted, flat, rule, slot in self.by_diffusers:
            if match := (flat if underscored else dotted).fullmatch(raw):
                return "diffusers", _fill(rule.diffusers[slot], match)
        for dotted, flat, rule in self.by_native:
            if match := (flat if underscored else dotted).fullmatch(raw):
                return "native", (rule, match.group(1) if match.groups() else "")
        return None


def _fill(pattern: str, match: re.Match | str) -> str:
    index = match if isinstance(match, str) else (match.group(1) if match.groups() else "")
    return pattern.replace("{i}", index)


def native_table(family: str) -> _Table | None:
    """The family's ComfyUI name table (its spec's ``lora_layout``); None for families whose ComfyUI names are
    diffusers' (Qwen-Image)."""
    layout = get_family(family).lora_layout
    if layout is None:
        raise LoraLayoutError(
            f"no ComfyUI/kohya key layout for family {family!r}; export it with --format diffusers (a family's "
            "author sets FamilySpec(lora_layout=...) or like=<a family with the same layout>)"
        )
    if layout == IDENTITY_LAYOUT:
        return None
    return _Table(tuple(load_ref(layout)))


def has_native_table(family: str) -> bool:
    """Whether the family declares a ComfyUI layout other than diffusers' names."""
    return get_family(family).lora_layout not in (None, IDENTITY_LAYOUT)


def _swapped(up: torch.Tensor, rule: NativeRule, in_features: int) -> torch.Tensor:
    """ComfyUI's swap_scale_shift on the rows of an up matrix, where the rule asks for it."""
    if rule.swap is None or (rule.swap == "pre-only" and up.shape[0] != 2 * in_features):
        return up
    first, second = up.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


# ---------------------------------------------------------------------------------------------- exporting


def native_modules(modules: Modules, family: str) -> Modules:
    """diffusers modules -> ComfyUI modules (down, up): fused q/k/v stacked exactly, names mapped, rows swapped."""
    table = native_table(family)
    if table is None:
        return dict(modules)
    groups: dict[str, tuple[NativeRule, dict[int, tuple[torch.Tensor, torch.Tensor]]]] = {}
    for module, pair in modules.items():
        found = table.native_of(module)
        if found is None:
            raise LoraLayoutError(f"{family} module {module!r} has no ComfyUI name; export with --format diffusers")
        rule, index, slot = found
        groups.setdefault(_fill(rule.native, index), (rule, {}))[1][slot] = pair
    out: Modules = {}
    for name, (rule, parts) in groups.items():
        if len(rule.diffusers) == 1:
            down, up = parts[0]
            out[name] = (down, _swapped(up, rule, down.shape[1]))
            continue
        width = next(iter(parts.values()))[0].shape[1]
        heights = [s * width for s in rule.slots]
        rank = sum(a.shape[0] for a, _ in parts.values())
        like = next(iter(parts.values()))[1]
        up = torch.zeros(sum(heights), rank, dtype=like.dtype)
        downs, row, col = [], 0, 0
        for slot, height in enumerate(heights):
            if slot in parts:
                a, b = parts[slot]
                if a.dim() != 2 or a.shape[1] != width or b.shape[0] != height:
                    raise LoraLayoutError(f"{name}: slot {rule.diffusers[slot]} has shape {tuple(b.shape)} x "
                                          f"{tuple(a.shape)}, expected {height} rows over {width} inputs")
                up[row:row + height, col:col + a.shape[0]] = b
                downs.append(a)
                col += a.shape[0]
            row += height
        out[name] = (torch.cat(downs), up)
    return out


def export_tensors(modules: Modules, family: str, layout: str) -> dict[str, torch.Tensor]:
    """The safetensors keys of ``layout`` ("diffusers", "comfyui", "kohya") for folded diffusers modules."""
    if layout == "diffusers":
        tensors = {}
        for module, (down, up) in modules.items():
            tensors[f"transformer.{module}.lora_A.weight"] = down
            tensors[f"transformer.{module}.lora_B.weight"] = up
        return tensors
    if layout not in FORMATS:
        raise ConfigError(f"format {layout!r}: use one of {', '.join(FORMATS)}")
    tensors = {}
    for name, (down, up) in native_modules(modules, family).items():
        key = f"diffusion_model.{name}" if layout == "comfyui" else f"lora_unet_{name.replace('.', '_')}"
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha = rank: scale 1, B is folded
    return tensors


def export_lora(
    source: str | os.PathLike, layout: str, output: str | os.PathLike, family: str | None = None
) -> Path:
    """Write ``source`` (any layout ``read_lora_modules`` reads) as ``output`` in ``layout``; never overwrites."""
    output = Path(output)
    if output.exists():
        raise ExistingFileError(f"{output} exists; choose another --output (existing files are never overwritten)")
    lora = read_lora(source)
    family = family or (lora.glance or {}).get("family")
    if family is None:
        raise ConfigError(f"{lora.path} carries no Glance metadata naming its family; pass --family")
    modules, _ = read_lora_modules(lora, family)
    metadata = {"format": "pt"}
    if lora.glance is not None or layout != "diffusers":
        metadata[GLANCE_METADATA_KEY] = json.dumps(
            jsonable({**(lora.glance or {"family": family}), "layout": layout, "exported_from": lora.path.name}),
            sort_keys=True)
    atomic_save_safetensors(export_tensors(modules, family, layout), output, metadata)
    return output


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class LoraFile:
    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]

    @property
    def glance(self) -> dict[str, Any] | None:
        raw = self.metadata.get(GLANCE_METADATA_KEY)
        return json.loads(raw) if raw else None

    def adapter_config(self) -> dict[str, Any] | None:
        """diffusers' ``lora_adapter_metadata`` (the peft config), its "transformer." prefix removed."""
        raw = self.metadata.get(LORA_ADAPTER_METADATA_KEY)
        if not raw:
            return None
        config = json.loads(raw)
        return {k.removeprefix("transformer."): v for k, v in config.items()}


def read_lora(path: str | os.PathLike) -> LoraFile:
    file = check_lora_file(path)
    with open_lora(file) as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        metadata = dict(f.metadata() or {})
    return LoraFile(file, tensors, metadata)


_SUFFIXES = (
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
)
_DOTTED_PREFIXES = ("transformer.", "diffusion_model.", "base_model.model.")
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_")


@dataclass
class ReadInfo:
    """How a file was read: ``layout`` ("diffusers", "comfyui/kohya" for native names) and where the scale came
    from (``alpha``: "alpha tensors", "adapter metadata", or "none": no alpha anywhere, loaded at 1.0)."""

    layout: str
    alpha: str


def _split_key(key: str) -> tuple[str, str, bool]:
    """A tensor key -> (module name as written, kind, underscored?)."""
    found = next(((suffix, kind) for suffix, kind in _SUFFIXES if key.endswith(suffix)), None)
    if found is None:
        raise LoraLayoutError(f"key {key!r} is not a LoRA down/up/alpha tensor")
    raw, kind = key[: -len(found[0])], found[1]
    for prefix in _FLAT_PREFIXES:
        if raw.startswith(prefix):
            return raw[len(prefix):], kind, True
    for prefix in _DOTTED_PREFIXES:
        if raw.startswith(prefix):
            return raw[len(prefix):], kind, False
    return raw, kind, False


def _resolve(raw: str, underscored: bool, table: _Table | None, module_names: Collection[str] | None,
             flat_names: dict[str, str]) -> tuple[str, Any]:
    """A module name as written in a file -> ("diffusers", name) or ("native", (rule, block index))."""
    if not underscored and module_names is not None and raw in module_names:
        return "diffusers", raw
    if table is not None and (found := table.match(raw, underscored)) is not None:
        return found
    if underscored and raw in flat_names:
        return "diffusers", flat_names[raw]
    if not underscored and module_names is None:
        return "diffusers", raw  # a diffusers name, nothing to check it against
    where = "this model's modules" if module_names is not None else "the family's ComfyUI names"
    raise LoraLayoutError(f"LoRA module {raw!r} ({'underscored' if underscored else 'dotted'}) matches none of "
                          f"{where}")


def read_lora_modules(
    lora: LoraFile | str | os.PathLike, family: str, module_names: Iterable[str] | None = None
) -> tuple[Modules, ReadInfo]:
    """Every LoRA module of ``lora`` as a diffusers module name -> (A, B), alpha/rank folded into B.

    ``module_names`` (the transformer's module names) resolves underscored names of identity-named families and
    checks every result; without it names are checked against the family's ComfyUI table only.
    """
    if not isinstance(lora, LoraFile):
        lora = read_lora(lora)
    table = native_table(family) if has_native_table(family) else None
    names = set(module_names) if module_names is not None else None
    flat_names = {n.replace(".", "_"): n for n in names or ()}
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in lora.tensors.items():
        raw, kind, underscored = _split_key(key)
        entry = groups.setdefault(f"{'_' if underscored else '.'}{raw}", {"raw": raw, "flat": underscored})
        entry[kind] = tensor
    config = lora.adapter_config()
    has_alpha = any("alpha" in g for g in groups.values())
    native_seen = False
    modules: Modules = {}
    for entry in groups.values():
        if "down" not in entry or "up" not in entry:
            raise LoraLayoutError(f"LoRA module {entry['raw']!r} lacks its down or up matrix")
        kind, target = _resolve(entry["raw"], entry["flat"], table, names, flat_names)
        down, up = entry["down"], entry["up"]
        if "alpha" in entry:
            scale = float(entry["alpha"]) / down.shape[0]
        elif kind == "diffusers" and config is not None and not has_alpha:
            scale = peft_scale(target, down.shape[0], config)
        else:
            scale = 1.0
        up = up * scale if scale != 1.0 else up
        if kind == "diffusers":
            modules[target] = (down, up)
        else:
            native_seen = True
            rule, index = target
            modules.update(_split_native(rule, index, down, up))
    if names is not None:
        unknown = sorted(set(modules) - names)
        if unknown:
            raise LoraLayoutError(f"LoRA modules not in this model: {', '.join(unknown[:5])}")
    alpha = "alpha tensors" if has_alpha else ("adapter metadata" if config is not None else "none")
    return modules, ReadInfo("comfyui/kohya" if native_seen else "diffusers", alpha)


def _split_native(rule: NativeRule, index: str, down: torch.Tensor, up: torch.Tensor) -> Modules:
    """One ComfyUI module's (down, up) -> its diffusers modules; fused weights split by rows, compactly (each
    slot keeps only the down rows its up block uses) where the up matrix is block-diagonal."""
    up = _swapped(up, rule, down.shape[1] if down.dim() == 2 else -1)
    names = [_fill(n, index) for n in rule.diffusers]
    if len(names) == 1:
        return {names[0]: (down, up)}
    width = down.shape[1]
    heights = [s * width for s in rule.slots]
    if sum(heights) != up.shape[0]:
        raise LoraLayoutError(f"{_fill(rule.native, index)}: up has {up.shape[0]} rows, expected {sum(heights)}")
    blocks = list(torch.split(up, heights, dim=0))
    used = [(b != 0).any(dim=0) for b in blocks]
    nonzero = [u for u in used if u.any()]
    disjoint = bool(nonzero) and bool((torch.stack(nonzero).sum(dim=0) <= 1).all())
    out: Modules = {}
    for name, block, cols in zip(names, blocks, used):
        if disjoint:
            if cols.any():
                out[name] = (down[cols].contiguous(), block[:, cols].contiguous())
        else:
            out[name] = (down, block.contiguous())
    return out


def to_diffusers_state_dict(modules: Modules, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Folded modules as the state dict ``load_lora_weights`` takes (no alpha: scale 1), times ``scale``."""
    tensors = export_tensors(modules, "", "diffusers")
    return {k: v * scale if scale != 1.0 and ".lora_B." in k else v for k, v in tensors.items()}
