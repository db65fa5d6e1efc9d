"""Qwen-Image 2.x beyond the contract suite: the VAE's RGBA input as the stock pipeline makes it, Slow/Fast lists
read off a checkpoint's declared sample_sigmas grid as the stock pipeline samples it, the stock chained call without
the prompt's key/value cache (which would keep the Slow adapter's after the switch), the ComfyUI export (gate and up
fused) applied as ComfyUI applies it and read back by diffusers' own single-file converter, and `plan` (the
step on fake tensors against the real CPU step, and the full-size transformer on a 24 GB card)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import QwenImage21Pipeline
from diffusers.loaders.single_file_utils import convert_qwen_image21_transformer_checkpoint_to_diffusers
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from glance_lightning.cli import main
from glance_lightning.compat import allow_qwen2vl_processor_without_torchvision
from glance_lightning.families.qwen_image2 import QwenImage2Glance
from glance_lightning.inference import chained_call, load_glance_loras
from glance_lightning.model_schedule import declared_sample_sigmas
from glance_lightning.schedules import derive_timesteps
from glance_lightning.tiny import tiny_model_path

REPO = Path(__file__).resolve().parents[1]
RED_BALL = REPO / "glance_lightning/assets/samples/t2i/red_ball.png"
QUICKSTART = "configs/quickstart-qwen-image-2.yaml"


def stock(path: str | Path | None = None) -> Any:
    allow_qwen2vl_processor_without_torchvision()  # its Qwen3-VL processor loads without torchvision
    pipe = QwenImage21Pipeline.from_pretrained(path or tiny_model_path("tiny:qwen-image-2"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_calls(pipe: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append({**kw, "out": out[0].clone()}), with_kwargs=True)
    return calls


def test_the_latents_are_the_stock_pipelines_of_the_opaque_rgba_image():
    """The pipeline converts every image to RGBA before its VAE; our RGB training pixels get the same opaque alpha,
    so the latents are the stock pipeline's own."""
    pipe = stock()
    image = Image.open(RED_BALL).convert("RGB").resize((64, 64), Image.Resampling.LANCZOS)
    rgba = pipe.image_processor.preprocess(image.convert("RGBA"), height=64, width=64)
    assert rgba.shape == (1, 4, 64, 64) and bool((rgba[:, 3] == 1).all())
    with torch.no_grad():
        expected = pipe._encode_vae_image(rgba.unsqueeze(2), None).squeeze(2)
    module = QwenImage2Glance(pretrained_model="tiny:qwen-image-2", timesteps={"slow": [1.0], "fast": [0.5]})
    module.load_base_model(with_adapters=False)
    with torch.no_grad():
        latents = module.encode_images(rgba[:, :3])
        decoded = module.decode_latents(latents)
    torch.testing.assert_close(latents, expected)
    assert decoded.shape == (1, 3, 64, 64)  # the VAE's alpha channel dropped


def test_the_lists_are_read_off_a_declared_sample_sigmas_grid_as_the_stock_pipeline_samples_it(tmp_path: Path):
    """A checkpoint whose model_index.json declares sample_sigmas samples that grid (shifted by its scheduler),
    whatever num_inference_steps says: the lists derived on it at given indices are the stock call's timesteps."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path("tiny:qwen-image-2"), folder)
    grid = [1.0, 0.9, 0.75, 0.5, 0.25, 0.1]
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "sample_sigmas": grid}))
    assert declared_sample_sigmas(folder) == tuple(grid)
    pipe = stock(folder)
    calls = record_calls(pipe)
    pipe(prompt="a red ball", height=64, width=64, num_inference_steps=40, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    assert len(calls) == len(grid)
    derived = derive_timesteps("qwen-image-2", resolution=64, sample_sigmas=grid, slow_indices=(0, 1, 2),
                               fast_indices=(3, 4, 5))
    stock_timesteps = [1000 * float(call["timestep"][0]) for call in calls]
    assert derived["slow"] + derived["fast"] == pytest.approx(stock_timesteps, abs=2e-2)


def test_the_stock_chained_call_runs_without_the_prompt_cache(quickstart_run):
    """QwenImage21Pipeline caches the prompt's keys and values after its first step; over the chain that cache would
    hold the Slow adapter's after the switch to Fast. chained_call turns it off: every call computes the whole
    sequence with the adapter of its step, and the result differs from the stale-cache one."""
    run = quickstart_run(QUICKSTART)
    pipe = stock()
    loras = load_glance_loras(pipe, run / "slow", run / "fast")
    calls = record_calls(pipe)
    kwargs = dict(prompt="a red ball", height=64, width=64, output_type="latent")
    chained = chained_call(pipe, loras, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert len(calls) == 10 and all(call["kv_cache"] is None for call in calls)
    calls.clear()
    stale = chained_call(pipe, loras, generator=torch.Generator().manual_seed(0), use_kv_cache=True, **kwargs).images
    assert calls[0]["kv_cache_mode"] == "extract" and calls[-1]["kv_cache_mode"] == "cached"
    assert not torch.allclose(chained, stale, atol=1e-4)


def test_the_comfyui_export_applied_as_comfyui_reads_back_through_diffusers_converter(quickstart_run, tmp_path: Path):
    """ComfyUI's names (diffusers', each block's SwiGLU gate and up fused into img_mlp.gate_up): the export applied to
    ComfyUI's weights as ComfyUI applies a LoRA (alpha / rank), then converted by diffusers' own single-file
    converter, gives the diffusers weights plus exactly the trained weight changes."""
    run = quickstart_run(QUICKSTART)
    target = tmp_path / "slow_comfyui.safetensors"
    assert main(["export", "--lora", str(run / "slow"), "--format", "comfyui", "--output", str(target)]) == 0
    native = load_file(target)
    assert any(".img_mlp.gate_up.lora_down." in k for k in native)
    base = load_file(Path(tiny_model_path("tiny:qwen-image-2")) / "transformer" / "diffusion_pytorch_model.safetensors")
    comfy = {}
    for key, value in base.items():
        if ".img_mlp.gate_layer." in key:
            comfy[key.replace("gate_layer", "gate_up")] = torch.cat([value, base[key.replace("gate_layer", "proj")]])
        elif ".img_mlp.proj." not in key:
            comfy[key] = value.clone()
    for key, down in native.items():
        if key.endswith(".lora_down.weight"):
            stem = key.removesuffix(".lora_down.weight")
            scale = native[f"{stem}.alpha"] / down.shape[0]
            name = stem.removeprefix("diffusion_model.") + ".weight"
            comfy[name] = comfy[name] + scale * native[f"{stem}.lora_up.weight"].float() @ down.float()
    converted = convert_qwen_image21_transformer_checkpoint_to_diffusers(
        {f"model.diffusion_model.{k}": v for k, v in comfy.items()})
    original = load_file(run / "slow" / "pytorch_lora_weights.safetensors")
    with safe_open(str(run / "slow" / "pytorch_lora_weights.safetensors"), "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    scale = adapter["transformer.lora_alpha"] / adapter["transformer.r"]
    deltas = {k.removeprefix("transformer.").removesuffix(".lora_A.weight") + ".weight":
              scale * original[k.replace("lora_A", "lora_B")].float() @ v.float()
              for k, v in original.items() if k.endswith(".lora_A.weight")}
    assert any(".img_mlp.gate_layer." in k for k in deltas) and any(".img_mlp.proj." in k for k in deltas)
    assert converted.keys() == base.keys()
    for key, weight in base.items():
        expected = weight + deltas[key] if key in deltas else weight
        torch.testing.assert_close(converted[key], expected, rtol=1e-5, atol=1e-6, msg=key)


# A reduced Qwen-Image 2.x transformer (2 blocks, 2 heads of 16) for the planner's fake-against-real comparison.
ARCH = {"_class_name": "QwenImage21Transformer2DModel", "patch_size": 1, "in_channels": 16, "out_channels": 16,
        "num_layers": 2, "attention_head_dim": 16, "num_attention_heads": 2, "context_in_dim": 32, "mlp_ratio": 3,
        "axes_dims_rope": [4, 6, 6]}


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_planned_step_on_fake_tensors_is_the_real_cpu_step(checkpointing: bool):
    """The transformer derives its sequence layout from the image-slot mask (data-dependent ops fake tensors refuse):
    with that mask real on the host, the fake-tensor step allocates what the same step on real CPU tensors does."""
    from glance_lightning.planner.memory import StepPlan, simulate_step

    def module() -> QwenImage2Glance:
        return QwenImage2Glance(pretrained_model="tiny:qwen-image-2", torch_dtype="bfloat16",
                                performance={"gradient_checkpointing": checkpointing})

    plan = StepPlan(architecture=dict(ARCH), height=256, width=256, text_tokens=16, latent_channels=16)
    fake = simulate_step(module(), plan)
    real = simulate_step(module(), plan, fake=False)
    assert fake.peak == pytest.approx(real.peak, rel=0.01)
    assert fake.base == real.base and fake.activations > 0


def test_plan_sizes_the_full_transformer_on_a_24gb_card(capsys):
    """The 7.1B transformer in bf16 with every block recomputed, at 1024x1024 on a 24 GB card: planned on fake
    tensors, its weights and the rest of the peak."""
    from glance_lightning.planner.memory import build_transformer
    from glance_lightning.registry import get_family

    with torch.device("meta"):
        model = build_transformer(dict(get_family("qwen-image-2").architecture), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(7.115, rel=0.01)
    code = main(["plan", "--config", str(REPO / "configs/qwen-image-2.yaml"), "--gpu", "4090", "--format", "json",
                 "--model.init_args.performance.auto", "false",
                 "--model.init_args.performance.gradient_checkpointing", "1.0",
                 "--model.init_args.performance.compile_blocks", "false"])
    out = capsys.readouterr().out
    assert code == 0, out
    plan = json.loads(out)
    assert plan["family"] == "qwen-image-2"
    assert 13.2 < plan["peak_gib"] < 24  # the bf16 weights (13.25 GiB) and what the step adds
