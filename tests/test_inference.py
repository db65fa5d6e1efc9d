"""Exact chained generation: our sampler, a stock FluxPipeline on the chain, the seeds' defect, `sample`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import FluxPipeline
from glance_lightning.datamodules.glance import GlanceDataModule
from PIL import Image
from safetensors.torch import load_file

from glance_lightning.commands.sample import load_sampler, run_sample_command
from glance_lightning.families.flux import FluxGlance
from glance_lightning.inference import chained_call, load_glance_loras
from glance_lightning.lora_io import read_glance_metadata, save_lora
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings
from glance_lightning.tiny import tiny_model_path

SLOW = [1000.0, 986.9786, 973.2042, 958.6094, 943.1188]
FAST = [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]
PROMPT = "a red ball on green grass under a blue sky with a yellow sun"


@pytest.fixture(scope="module")
def trained(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    module = FluxGlance(
        pretrained_model="tiny:flux", timesteps=TimestepSettings(slow=SLOW, fast=FAST), slow_steps=4, fast_steps=4,
        lora=LoraSettings(rank=4, alpha=8), optimizer=OptimizerSettings(lr=5e-2, warmup_steps=1),
        max_sequence_length=32, output_dir=str(out),
    )
    data = GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=64)
    L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, default_root_dir=out).fit(module, data)
    return out


def stock_pipe() -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(tiny_model_path("tiny:flux"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def record_timesteps(pipe: FluxPipeline) -> list[tuple[float, list[str]]]:
    seen: list[tuple[float, list[str]]] = []

    def hook(module, args, kwargs):
        seen.append((float(kwargs["timestep"][0]), list(pipe.get_active_adapters())))

    pipe.transformer.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


def sampler_args(trained: Path, **overrides) -> argparse.Namespace:
    values = dict(model="tiny:flux", slow=str(trained / "slow"), fast=str(trained / "fast"), family=None,
                  guidance=None, dtype="float32", device="cpu", control=[])
    values.update(overrides)
    return argparse.Namespace(**values)


def test_our_sampler_and_a_stock_pipeline_on_the_chain_give_the_same_latents(trained: Path):
    module, info = load_sampler(sampler_args(trained))
    assert info["from_metadata"] and info["family"] == "flux"
    ours = module.generate_latents(PROMPT, seed=3, height=64, width=64)

    pipe = stock_pipe()
    loras = load_glance_loras(pipe, trained / "slow", trained / "fast")
    packed = chained_call(pipe, loras, prompt=PROMPT, height=64, width=64, guidance_scale=1.0,
                          max_sequence_length=32, generator=torch.Generator().manual_seed(3),
                          output_type="latent").images
    theirs = FluxPipeline._unpack_latents(packed, 64, 64, pipe.vae_scale_factor)
    torch.testing.assert_close(ours, theirs.float(), atol=2e-4, rtol=1e-4)


def test_stock_pipeline_on_the_chain_steps_through_exactly_the_trained_sigmas(trained: Path):
    pipe = stock_pipe()
    loras = load_glance_loras(pipe, trained / "slow", trained / "fast")
    seen = record_timesteps(pipe)
    chained_call(pipe, loras, prompt=PROMPT, height=64, width=64, max_sequence_length=32, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
    chain = [t / 1000 for t in SLOW + FAST]
    assert [t for t, _ in seen] == pytest.approx(chain, abs=1e-6)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(chain + [0.0], abs=1e-6)
    assert [a for _, a in seen] == [["slow"]] * 5 + [["fast"]] * 5


def test_the_seeds_two_call_recipe_steps_through_other_sigmas(trained: Path):
    """Documents the defect we fix: stock set_timesteps re-shifts the given sigmas and ends the Slow call at 0."""
    pipe = stock_pipe()
    pipe.load_lora_weights(str(trained / "slow"), adapter_name="slow")
    pipe.load_lora_weights(str(trained / "fast"), adapter_name="fast")
    seen = record_timesteps(pipe)
    common = dict(prompt=PROMPT, height=1024 // 16, width=1024 // 16, max_sequence_length=32, guidance_scale=1.0)
    pipe.set_adapters("slow")
    latents = pipe(**common, sigmas=[t / 1000 for t in SLOW], num_inference_steps=5, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    slow_call_end = float(pipe.scheduler.sigmas[-1])
    pipe.set_adapters("fast")
    pipe(**common, sigmas=[t / 1000 for t in FAST], num_inference_steps=5, latents=latents, output_type="latent")
    stepped = [t for t, _ in seen]
    trained_sigmas = [t / 1000 for t in SLOW + FAST]
    assert max(abs(a - b) for a, b in zip(stepped, trained_sigmas)) > 1e-2  # shifted again
    assert slow_call_end == 0.0  # the Slow call denoises fully before Fast starts at f1


def test_sample_command_writes_images_with_settings_and_never_overwrites(trained: Path, tmp_path: Path, capsys):
    argv = ["--model", "tiny:flux", "--slow", str(trained / "slow"), "--fast", str(trained / "fast"),
            "--prompt", PROMPT, "--seed", "0", "--seed", "1", "--height", "64", "--width", "64",
            "--output", str(tmp_path / "out")]
    assert run_sample_command(argv) == 0
    out = capsys.readouterr().out
    images = sorted((tmp_path / "out").glob("*.png"))
    # one line per image (path, seed, time per phase) and nothing else
    assert [line.split("  ")[:2] for line in out.splitlines()] == [[str(images[0]), "seed 0"],
                                                                     [str(images[1]), "seed 1"]]
    assert all(line.endswith("s") and "  slow " in line and "  fast " in line for line in out.splitlines())
    assert [p.name for p in images] == ["p0_s0.png", "p0_s1.png"]
    text = json.loads(Image.open(images[0]).text["glance"])
    assert text["schedule"]["slow"] == pytest.approx(SLOW) and text["seed"] == 0 and text["prompt"] == PROMPT
    assert text["from_metadata"] is True
    assert run_sample_command(argv) == 0
    assert len(list((tmp_path / "out").glob("*.png"))) == 4


OTHER_FAST = [900.0, 800.0, 600.0, 400.0, 50.0]


@pytest.mark.parametrize("change", ["run_id", "base_model", "lists"])
def test_sample_refuses_a_slow_and_a_fast_lora_of_two_runs_unless_allowed(change: str, trained: Path,
                                                                         tmp_path: Path, capsys):
    saved = load_file(trained / "fast" / "pytorch_lora_weights.safetensors")
    state = {k.removeprefix("transformer."): v for k, v in saved.items()}
    meta = read_glance_metadata(trained / "fast")
    assert meta["run_id"] == read_glance_metadata(trained / "slow")["run_id"]  # one run: one id in both files
    if change == "run_id":
        meta["run_id"] = "0" * 32
    elif change == "base_model":
        meta["base_model"] = "some/other-model"
    else:  # another run trained for other lists
        meta["timesteps"], meta["schedule"] = OTHER_FAST, {"slow": SLOW, "fast": OTHER_FAST}
    save_lora(tmp_path / "other_fast", state, {"r": 4, "lora_alpha": 4}, meta)  # the file's B is already scaled
    argv = ["--model", "tiny:flux", "--slow", str(trained / "slow"), "--fast", str(tmp_path / "other_fast"),
            "--prompt", "x", "--height", "64", "--width", "64", "--output", str(tmp_path / "o")]
    assert run_sample_command(argv) == 2
    err = capsys.readouterr().err
    label = {"run_id": "run", "base_model": "base model", "lists": "Slow/Fast lists"}[change]
    assert "are not from one run" in err and f"({label} " in err and "--allow-mixed-pair" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "o").exists()  # one line, nothing written

    assert run_sample_command([*argv, "--allow-mixed-pair"]) == 0
    err = capsys.readouterr().err
    assert "mixed pair" in err and str(tmp_path / "other_fast") in err  # says where each list comes from
    text = json.loads(Image.open(next((tmp_path / "o").glob("*.png"))).text["glance"])
    assert text["schedule"]["fast"] == pytest.approx(OTHER_FAST if change == "lists" else FAST)
    assert text["schedule"]["slow"] == pytest.approx(SLOW)


def test_sample_says_which_lists_it_uses(trained: Path, tmp_path: Path, capsys):
    argv = ["--model", "tiny:flux", "--slow", str(trained / "slow"), "--fast", str(trained / "fast"),
            "--prompt", "x", "--height", "64", "--width", "64", "--output", str(tmp_path / "o")]
    assert run_sample_command(argv) == 0
    err = capsys.readouterr().err
    assert "from the LoRA metadata" in err and "986.9786" in err and "60.5503" in err


def test_official_qwen_mode_is_refused_for_flux(trained: Path):
    module, _ = load_sampler(sampler_args(trained))
    with pytest.raises(ValueError, match="official-qwen"):
        module.generate_latents(PROMPT, 0, 64, 64, mode="official-qwen")


def test_single_files_without_glance_metadata_need_family_and_get_the_derived_chain(trained: Path, tmp_path: Path,
                                                                                     capsys):
    from safetensors.torch import save_file

    for phase in ("slow", "fast"):  # like the official releases: bare .safetensors, no Glance metadata
        tensors = load_file(trained / phase / "pytorch_lora_weights.safetensors")
        save_file(tensors, tmp_path / f"glance_{phase}.safetensors", metadata={"format": "pt"})
    argv = ["--model", "tiny:flux", "--slow", str(tmp_path / "glance_slow.safetensors"), "--fast",
            str(tmp_path / "glance_fast.safetensors"), "--prompt", "x", "--height", "64", "--width", "64",
            "--output", str(tmp_path / "out")]
    assert run_sample_command(argv) == 2
    assert "--family" in capsys.readouterr().err
    assert run_sample_command([*argv, "--family", "flux"]) == 0
    note = capsys.readouterr().err  # stdout has the image lines only; a derived chain is a note on stderr
    assert "derived from the model's scheduler: the LoRAs carry no lists" in note and "986.9786" in note


def test_sample_on_an_int8_base_with_a_chosen_attention_kernel_stays_close(trained: Path, tmp_path: Path):
    common = ["--model", "tiny:flux", "--slow", str(trained / "slow"), "--fast", str(trained / "fast"),
              "--prompt", PROMPT, "--height", "64", "--width", "64", "--dtype", "bfloat16"]
    assert run_sample_command([*common, "--output", str(tmp_path / "plain")]) == 0
    assert run_sample_command([*common, "--base-quantization", "int8-weight-only", "--attention-backend",
                               "sdpa-math", "--output", str(tmp_path / "int8")]) == 0
    plain, int8 = (torch.from_numpy(np.asarray(Image.open(tmp_path / d / "p0_s0.png"), dtype=np.float32))
                   for d in ("plain", "int8"))
    mse = ((plain - int8) / 255).pow(2).mean().item()
    assert mse > 0 and -10 * np.log10(mse) > 25  # quantised, yet the same image to within 25 dB PSNR


def test_sample_refuses_unusable_speed_options_before_loading(trained: Path, tmp_path: Path, capsys):
    argv = ["--model", "/no/such/model", "--slow", str(trained / "slow"), "--fast", str(trained / "fast"),
            "--prompt", PROMPT, "--output", str(tmp_path / "o")]
    assert run_sample_command([*argv, "--attention-backend", "_native_cudnn"]) == 2
    assert "--attention-backend='_native_cudnn'" in capsys.readouterr().err
    assert run_sample_command([*argv, "--base-quantization", "nf4"]) == 2
    assert "--base-quantization=nf4 needs a CUDA GPU" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ sample defaults, refusals


def test_sample_defaults_to_the_training_resolution_of_the_loras(trained: Path, tmp_path: Path):
    argv = ["--model", "tiny:flux", "--slow", str(trained / "slow"), "--fast", str(trained / "fast"),
            "--prompt", PROMPT, "--output", str(tmp_path / "out")]
    assert read_glance_metadata(trained / "slow")["resolution"] == 64
    assert run_sample_command(argv) == 0
    image = Image.open(tmp_path / "out" / "p0_s0.png")
    assert image.size == (64, 64)  # the quick start's 64x64, not 1024
    assert json.loads(image.text["glance"])["size"] == [64, 64]
    assert run_sample_command([*argv, "--height", "32"]) == 0  # a given side is kept, the other defaulted
    assert Image.open(tmp_path / "out" / "p0_s0-1.png").size == (64, 32)


def test_sample_refuses_a_model_of_another_family_before_loading_it(trained: Path, tmp_path: Path, capsys):
    common = ["--slow", str(trained / "slow"), "--fast", str(trained / "fast"), "--prompt", "x",
              "--output", str(tmp_path / "o")]
    assert run_sample_command(["--model", "tiny:qwen-image", *common]) == 2
    err = capsys.readouterr().err
    assert "qwen-image" in err and "trained for flux" in err
    folder = tmp_path / "Qwen-Image"  # only a model_index.json: loading it would fail differently
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "QwenImagePipeline"}))
    assert run_sample_command(["--model", str(folder), *common]) == 2
    err = capsys.readouterr().err
    assert "QwenImagePipeline" in err and "give a flux model" in err
    assert not (tmp_path / "o").exists()


def test_sample_warns_about_another_base_model_and_an_untrained_phase(trained: Path, tmp_path: Path, capsys):
    from glance_lightning.lora_layouts import read_lora

    fast = read_lora(trained / "fast")
    meta = json.loads(fast.metadata["glance"])
    meta["trained_steps"] = 0
    save_lora(tmp_path / "fast", {k.removeprefix("transformer."): v for k, v in fast.tensors.items()},
              {"r": 4, "lora_alpha": 4}, meta)
    folder = tiny_model_path("tiny:flux")  # the same weights, named by a path: not the recorded "tiny:flux"
    argv = ["--model", folder, "--slow", str(trained / "slow"), "--fast", str(tmp_path / "fast"), "--prompt", "x",
            "--output", str(tmp_path / "o")]
    assert run_sample_command(argv) == 0
    err = capsys.readouterr().err
    assert "trained on tiny:flux" in err and f"--model {folder}" in err
    assert "Fast LoRA was trained for 0 steps" in err
