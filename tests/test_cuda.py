"""On a CUDA device (``pytest -m cuda``; benchmarks/gpu_acceptance.py runs them on a lent GPU): what the CPU tests
can only check the logic of. A fit of the tiny model in bf16-mixed trains both LoRAs with the fused AdamW, the
transformer read straight onto the device; the full-size path's pieces (benchmarks/full_size.py) share weights
on the device instead of copying them."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from glance_lightning.models import load_transformer, resolve_pretrained
from glance_lightning.tiny import tiny_model_path

pytestmark = pytest.mark.cuda
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_the_transformer_is_read_straight_onto_the_gpu():
    torch.cuda.reset_peak_memory_stats()
    transformer = load_transformer(resolve_pretrained(tiny_model_path("tiny:flux")), torch.bfloat16, device="cuda:0")
    params = list(transformer.parameters())
    assert all(p.is_cuda and p.dtype == torch.bfloat16 for p in params)
    size = sum(p.numel() * p.element_size() for p in params)
    assert torch.cuda.max_memory_allocated() < 3 * size + 2**20  # no float32 or second copy on the way


def test_a_bf16_mixed_fit_on_the_gpu_trains_both_loras_with_the_fused_adamw(fit_config, tmp_path: Path):
    seen = {}
    real = torch.optim.AdamW.__init__

    def spy(self, params, *args, **kwargs):
        seen["fused"] = kwargs.get("fused")
        real(self, params, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.AdamW, "__init__", spy)
        run = fit_config("configs/quickstart.yaml", tmp_path, "--trainer.accelerator", "gpu",
                         "--trainer.precision", "bf16-mixed", "--model.init_args.slow_steps", "2",
                         "--model.init_args.fast_steps", "2", "--model.init_args.torch_dtype", "bfloat16")
    assert seen["fused"] is True
    for phase in ("slow", "fast"):
        weights = load_file(run / phase / "pytorch_lora_weights.safetensors")
        assert weights and all(w.float().isfinite().all() for w in weights.values())


def test_kept_full_size_weights_are_shared_by_each_run_on_the_gpu():
    spec = importlib.util.spec_from_file_location("full_size", BENCHMARKS / "full_size.py")
    full_size = importlib.util.module_from_spec(spec)
    sys.modules["full_size"] = full_size
    spec.loader.exec_module(full_size)
    kept = full_size.KeptTransformer(full_size.architecture("flux", shrunk=True), "cuda", torch.bfloat16)
    before = torch.cuda.memory_allocated()
    first, second = kept.fresh(), kept.fresh()
    assert torch.cuda.memory_allocated() - before < 2**20  # the buffers only, no weight copied
    name, weight = next(iter(first.named_parameters()))
    assert weight.is_cuda and weight.data_ptr() == dict(second.named_parameters())[name].data_ptr()
