"""Loading the frozen base sharded, with no full copy of it in any rank's host memory.

Under ``strategy: fsdp2`` every rank would otherwise read the whole transformer into host memory before FSDP2
keeps its 1/N: N full copies on one node at the peak. Instead, when the transformer is a diffusers folder of
safetensors files (a hub id, the HF cache, a local folder): each rank builds it on the meta device
(``empty_transformer``, buffers real), the adapters are added there, FSDP2 shards the meta weights, and then
``materialize`` gives each rank's shard storage on the device and reads into it only that rank's rows of every
weight, straight from the memory-mapped files (``safe_open(...).get_slice``), one weight at a time, cast as
diffusers' ``from_pretrained`` casts it (``_keep_in_fp32_modules`` in float32). The LoRA weights get their
starting values afterwards (``glance_lightning.lora_init``). A transformer given as one single-file checkpoint
(converted on load) is read whole by every rank, said in one line.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glance_lightning.lora_init import local_rows, local_tensor

ADAPTER_PART = ".base_layer"  # peft's wrapped layer: "to_q.base_layer.weight" is the file's "to_q.weight"


def weight_files(folder: Path) -> list[Path]:
    """A diffusers component folder's safetensors files (the sharded index's, or the single file); [] if none."""
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text())["weight_map"].values()))
        return [folder / name for name in names]
    return sorted(folder.glob("*.safetensors"))


def file_keys(files: Sequence[Path]) -> dict[str, Path]:
    """Each tensor name in ``files`` and the file holding it (headers only)."""
    from safetensors import safe_open

    found: dict[str, Path] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            found.update(dict.fromkeys(f.keys(), path))
    return found


def empty_transformer(cls: type, config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    """``cls`` from ``config`` with its parameters on the meta device, built as ``from_pretrained`` builds it
    (``dtype`` the default dtype while it is constructed, so buffers computed at construction are real and in
    ``dtype``), then in the dtypes it loads the files in (``_keep_in_fp32_modules`` in float32)."""
    from accelerate import init_empty_weights

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    keep = tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())
    persistent = set(model.state_dict())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in persistent and tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if any(m in name.split(".") for m in keep) else dtype)
    return model.eval()


def missing_weights(model: torch.nn.Module, keys: dict[str, Any]) -> list[str]:
    """The model's persistent tensors (before adapters are added) that ``keys`` lacks."""
    return [name for name in model.state_dict() if name not in keys]


def adapters_on_meta(model: torch.nn.Module) -> None:
    """Every LoRA weight on the meta device in its base layer's dtype, as the eager load has them: peft moves
    only a layer's first adapter to its (meta) base layer; later ones stay real, in float32."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if isinstance(module, LoraLayer):
            dtype = module.get_base_layer().weight.dtype
            for layers in (module.lora_A, module.lora_B):
                for name in list(layers):
                    layers[name].to(device="meta", dtype=dtype)


@dataclass
class LoadReport:
    read_bytes: int  # what this rank read of the base
    full_bytes: int  # the whole base
    files: int

    def line(self) -> str:
        mb = 1024**2
        return (f"base loaded per shard: {self.read_bytes / mb:.2f} of its {self.full_bytes / mb:.2f} MB read "
                f"from {self.files} file(s)")


@torch.no_grad()
def materialize(model: torch.nn.Module, files: Sequence[Path], device: torch.device) -> LoadReport:
    """Give every meta parameter of the (sharded) ``model`` storage on ``device`` and read its rows of each base
    weight from ``files``; LoRA weights are left for ``lora_init.reset_loras``."""
    from safetensors import safe_open

    buffers = {name: b for name, b in model.named_buffers()}  # real: to_empty would replace them
    model.to_empty(device=device)
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        model.get_submodule(owner)._buffers[attr] = value.to(device)
    where = file_keys(files)
    read = full = 0
    handles = {path: safe_open(str(path), framework="pt") for path in files}
    try:
        for name, param in model.named_parameters():
            if ".lora_" in name:
                continue
            key = name.replace(ADAPTER_PART, "")
            local, rows = local_tensor(param), local_rows(param)
            source = handles[where[key]].get_slice(key)
            part = source[rows] if param.dim() else source[:]
            local.copy_(part.to(local.dtype))
            read += part.numel() * local.element_size()
            full += param.numel() * local.element_size()
        for name, buffer in model.named_buffers():  # persistent buffers are in the files: small, read whole
            if name in where:
                buffer.copy_(handles[where[name]].get_tensor(name))
    finally:
        handles.clear()
    return LoadReport(read, full, len(files))
