"""Loading the base per shard (glance_lightning.shard_loading) and the LoRAs' starting values (lora_init), in one
process: what a rank reads is what ``from_pretrained`` loads, buffers included; a folder whose files lack a weight
is recognised (every rank then reads it whole); LoRA starting values depend on the seed and the name only. The
two-process runs (tests/test_sharding.py) check the sharded reading against DDP's eager load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from glance_lightning import lora_init, shard_loading
from glance_lightning.models import ResolvedModel, transformer_class
from glance_lightning.tiny import tiny_model_path


def _class_and_folder(family: str) -> tuple[type, Path]:
    path = tiny_model_path(f"tiny:{family}")
    return transformer_class(ResolvedModel(family, path)), Path(path) / "transformer"


@pytest.mark.parametrize(("family", "dtype"), [("flux", torch.float32), ("sd3", torch.bfloat16),
                                               ("qwen-image", torch.bfloat16)])
def test_reading_into_the_meta_built_transformer_gives_what_from_pretrained_loads(family, dtype):
    cls, folder = _class_and_folder(family)
    expected = cls.from_pretrained(folder, torch_dtype=dtype)
    model = shard_loading.empty_transformer(cls, cls.load_config(str(folder)), dtype)
    assert all(p.is_meta for p in model.parameters())
    files = shard_loading.weight_files(folder)
    assert shard_loading.missing_weights(model, shard_loading.file_keys(files)) == []
    report = shard_loading.materialize(model, files, torch.device("cpu"))
    assert report.read_bytes == report.full_bytes == sum(p.numel() * p.element_size() for p in model.parameters())
    mine, theirs = model.state_dict(), expected.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():  # parameters and persistent buffers (SD3's position table) alike
        assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), key
    buffers = dict(model.named_buffers())  # those computed at construction as well
    for key, value in expected.named_buffers():
        assert buffers[key].dtype == value.dtype and torch.equal(buffers[key], value), key


def test_a_sharded_index_is_followed_and_a_missing_weight_is_found(tmp_path):
    cls, folder = _class_and_folder("flux")
    weights = load_file(folder / "diffusion_pytorch_model.safetensors")
    names = sorted(weights)
    half = len(names) // 2
    copy = tmp_path / "transformer"
    copy.mkdir()
    shutil.copy(folder / "config.json", copy)
    parts = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, keys in parts.items():
        save_file({k: weights[k] for k in keys}, copy / file)
    index = {"weight_map": {k: file for file, keys in parts.items() for k in keys}}
    (copy / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    files = shard_loading.weight_files(copy)
    assert [f.name for f in files] == sorted(parts)
    model = shard_loading.empty_transformer(cls, cls.load_config(str(copy)), torch.float32)
    keys = shard_loading.file_keys(files)
    assert shard_loading.missing_weights(model, keys) == []
    del keys[names[0]]  # a checkpoint naming a weight otherwise: every rank would read it whole instead
    assert shard_loading.missing_weights(model, keys) == [names[0]]


def _with_adapters(seed: int, init: str) -> torch.nn.Module:
    cls, folder = _class_and_folder("flux")
    model = cls.from_pretrained(folder)
    for phase in ("slow", "fast"):
        model.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"],
                                     init_lora_weights="gaussian" if init == "gaussian" else True), adapter_name=phase)
    lora_init.reset_loras(model, seed, init)
    return model


@pytest.mark.parametrize("init", ["gaussian", "default"])
def test_lora_starting_values_depend_on_the_seed_and_the_name_only(init):
    torch.manual_seed(1)
    first = {n: p.clone() for n, p in _with_adapters(3, init).named_parameters() if "lora_" in n}
    torch.manual_seed(2)  # whatever drew from the global generator before
    again = {n: p for n, p in _with_adapters(3, init).named_parameters() if "lora_" in n}
    other = {n: p for n, p in _with_adapters(4, init).named_parameters() if "lora_" in n}
    a_names = [n for n in first if "lora_A" in n]
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not any(torch.equal(first[n], other[n]) for n in a_names)
    assert all(first[n].abs().max() == 0 for n in first if "lora_B" in n)
    slow, fast = (torch.cat([first[n].flatten() for n in a_names if f".{p}." in n]) for p in ("slow", "fast"))
    assert not torch.equal(slow, fast)  # each adapter its own values
    a = torch.cat([slow, fast])
    if init == "gaussian":  # peft's distributions: N(0, 1/r^2); U(-1/sqrt(in), 1/sqrt(in))
        assert a.std().item() == pytest.approx(1 / 4, rel=0.1)
    else:
        fan_in = next(first[n].shape[1] for n in a_names)
        assert a.abs().max().item() <= 1 / fan_in**0.5 and a.abs().max().item() > 0.8 / fan_in**0.5


def test_meta_built_adapters_take_their_base_layers_dtype():
    """peft moves only a layer's first adapter to a meta base (the second stays real float32):
    adapters_on_meta puts every one where the eager load has it."""
    cls, folder = _class_and_folder("flux")
    model = shard_loading.empty_transformer(cls, cls.load_config(str(folder)), torch.bfloat16)
    for phase in ("slow", "fast"):
        model.add_adapter(LoraConfig(r=4, target_modules=["to_q"]), adapter_name=phase)
    shard_loading.adapters_on_meta(model)
    loras = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert {n.split(".")[-2] for n in loras} == {"slow", "fast"}
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in loras.values())
