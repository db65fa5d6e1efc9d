"""FLUX.2 [dev] and [klein] beyond the contract suite: the Slow/Fast lists are the stock pipeline's own 50-step
schedule (mu from the step count), a step-distilled [klein] is refused in one line before its weights are read,
[klein]'s guided sampling is the stock pipeline's CFG, the ComfyUI export reads back through diffusers' own FLUX.2
converter, and `plan` answers at full size (the 32B [dev] on one card, the 9B [klein] by model id)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import Flux2KleinPipeline
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_flux2_lora_to_diffusers
from safetensors import safe_open
from safetensors.torch import load_file

from glance_lightning.cli import main
from glance_lightning.errors import ConfigError
from glance_lightning.families.flux2 import Flux2KleinGlance
from glance_lightning.inference import use_exact_chain
from glance_lightning.registry import get_family
from glance_lightning.schedules import derive_timesteps
from glance_lightning.tiny import tiny_model_path

REPO = Path(__file__).resolve().parents[1]
INDICES = (0, 2, 4, 6, 8, 10, 20, 30, 40, 49)


def stock_klein() -> Any:
    pipe = Flux2KleinPipeline.from_pretrained(tiny_model_path("tiny:flux2-klein"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_calls(pipe: Any) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: calls.append({**kw, "out": out[0].clone()}), with_kwargs=True)
    return calls


def test_the_lists_are_the_stock_pipelines_own_50_step_schedule_at_1024():
    """The stock call at 1024x1024, 50 steps (its mu = compute_empirical_mu(4096 tokens, 50 steps)): the timesteps
    it gives the transformer at the official indices are the derived Slow/Fast lists."""
    pipe = stock_klein()
    calls = record_calls(pipe)
    pipe(prompt="a red ball", height=1024, width=1024, num_inference_steps=50, guidance_scale=1.0,
         max_sequence_length=32, output_type="latent", generator=torch.Generator().manual_seed(0))
    stock = [1000 * float(calls[i]["timestep"][0]) for i in INDICES]
    derived = derive_timesteps("flux2-klein", resolution=1024)
    assert derived["slow"] + derived["fast"] == pytest.approx(stock, abs=2e-2)
    assert derive_timesteps("flux2", resolution=1024) == derived  # one schedule for [dev] and [klein]
    assert derived["fast"][-1] > 100  # mu ~2.0 at 50 steps: far from FLUX.1's lists (its last is 60.6)


@pytest.fixture(scope="module")
def distilled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny [klein] marked step-distilled, as FLUX.2-klein-4B's model_index.json is."""
    folder = tmp_path_factory.mktemp("klein-distilled") / "model"
    shutil.copytree(tiny_model_path("tiny:flux2-klein"), folder)
    index = folder / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "is_distilled": True}))
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").unlink()  # refused before any weight is read
    return folder


def test_a_step_distilled_klein_is_refused_before_its_weights_are_read(distilled: Path, tmp_path: Path, capsys):
    module = Flux2KleinGlance(pretrained_model=str(distilled))
    with pytest.raises(ConfigError, match="step-distilled.*FLUX.2-klein-base-4B"):
        module.load_base_model()
    code = main(["fit", "--config", str(REPO / "configs/quickstart-flux2-klein.yaml"),
                 "--model.init_args.pretrained_model", str(distilled),
                 "--data.init_args.path", str(REPO / "glance_lightning/assets/samples/t2i"),
                 "--trainer.default_root_dir", str(tmp_path / "runs")])
    err = capsys.readouterr().err
    assert code == 2 and "step-distilled" in err and "Traceback" not in err


def test_klein_guided_sampling_is_the_stock_pipelines_cfg():
    """At guidance_scale 4 the stock pipeline calls the transformer with the prompt and with "" and combines
    neg + 4 * (pos - neg): our guided velocity from the same latents is that combination."""
    pipe = use_exact_chain(stock_klein())
    calls = record_calls(pipe)
    pipe(prompt="a red ball", height=64, width=64, num_inference_steps=1, sigmas=[0.6], guidance_scale=4.0,
         max_sequence_length=32, output_type="latent", generator=torch.Generator().manual_seed(0))
    pos, neg = calls
    module = Flux2KleinGlance(pretrained_model="tiny:flux2-klein", max_sequence_length=32)
    module.load_base_model(with_adapters=False)
    module.transformer.eval()
    latents = pos["hidden_states"].transpose(1, 2).reshape(1, -1, 4, 4)
    with torch.no_grad():
        guided = module.guided_velocity(latents, torch.tensor([0.6]), module.conditioning_for("a red ball"), None,
                                        4.0)
    expected = neg["out"] + 4.0 * (pos["out"] - neg["out"])
    torch.testing.assert_close(guided, expected.transpose(1, 2).reshape(1, -1, 4, 4), rtol=1e-4, atol=1e-5)


def test_the_comfyui_export_reads_back_through_diffusers_flux2_converter(quickstart_run, tmp_path: Path):
    """BFL's names (fused qkv and linear1): diffusers' converter of such files gives back every trained module's
    exact weight change (ComfyUI's alpha folded into lora_up, as ComfyUI applies it)."""
    run = quickstart_run("configs/quickstart-flux2-klein.yaml")
    target = tmp_path / "slow_comfyui.safetensors"
    assert main(["export", "--lora", str(run / "slow"), "--format", "comfyui", "--output", str(target)]) == 0
    native = load_file(target)
    assert any(".single_blocks.0.linear1." in k for k in native) and any(".img_attn.qkv." in k for k in native)
    folded = {}
    for key, value in native.items():
        if key.endswith(".lora_up.weight"):
            stem = key.removesuffix(".lora_up.weight")
            down = native[f"{stem}.lora_down.weight"]
            value = value * (native[f"{stem}.alpha"] / down.shape[0])
        if not key.endswith(".alpha"):
            folded[key] = value
    converted = _convert_non_diffusers_flux2_lora_to_diffusers(folded)
    read = {k.removesuffix(".lora_A.weight"): converted[k.replace("lora_A", "lora_B")].float() @ v.float()
            for k, v in converted.items() if k.endswith(".lora_A.weight")}
    original = load_file(run / "slow" / "pytorch_lora_weights.safetensors")
    with safe_open(str(run / "slow" / "pytorch_lora_weights.safetensors"), "pt") as f:
        adapter = json.loads(f.metadata()["lora_adapter_metadata"])
    scale = adapter["transformer.lora_alpha"] / adapter["transformer.r"]
    trained = {k.removesuffix(".lora_A.weight"): scale * original[k.replace("lora_A", "lora_B")].float() @ v.float()
               for k, v in original.items() if k.endswith(".lora_A.weight")}
    assert read.keys() == trained.keys()
    for name, delta in trained.items():
        torch.testing.assert_close(read[name], delta, rtol=1e-4, atol=1e-6, msg=name)


def test_plan_sizes_the_flux2_transformers_and_picks_the_9b_klein_by_id():
    from glance_lightning.planner.memory import build_transformer
    from glance_lightning.planner.plan import find_architecture

    billions = {"flux2": 32.22, "flux2-klein": 3.88}
    for family, expected in billions.items():
        with torch.device("meta"):
            model = build_transformer(dict(get_family(family).architecture), torch.bfloat16)
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(expected, rel=0.01)
    klein = get_family("flux2-klein")
    arch, source = find_architecture(klein, "black-forest-labs/FLUX.2-klein-base-9B", None, None)
    assert (arch["num_attention_heads"], arch["joint_attention_dim"]) == (32, 12288) and "9B" in source
    assert find_architecture(klein, "black-forest-labs/FLUX.2-klein-base-4B", None, None)[0]["num_layers"] == 5


def test_plan_says_the_32b_dev_in_bf16_does_not_fit_a_24gb_card(capsys):
    """The full-size [dev] config with its performance switches fixed (bf16 base, no offload) on a 24 GB card:
    planned on fake tensors, with the peak it needs and "fits no"."""
    code = main(["plan", "--config", str(REPO / "configs/flux2-dev.yaml"), "--gpu", "4090", "--format", "json",
                 "--model.init_args.performance.auto", "false",
                 "--model.init_args.performance.gradient_checkpointing", "1.0",
                 "--model.init_args.performance.compile_blocks", "false"])
    out = capsys.readouterr().out
    assert code == 0, out
    plan = json.loads(out)
    assert plan["family"] == "flux2" and plan["fits"] is False
    assert plan["peak_gib"] > 60  # the bf16 weights alone: 32.2e9 x 2 bytes
