"""A new model family added through library imports alone: defined here, registered through the public API with
no timestep lists, it gets `fit` with derived lists, `schedule`, `sample` and `tiny:` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from glance_lightning.datamodules.glance import GlanceDataModule
from PIL import Image

from glance_lightning.commands.sample import run_sample_command
from glance_lightning.commands.schedule import run_schedule_command
from glance_lightning.families.base import Conditioning, GlanceModule
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.registry import FamilySpec, family_names, get_family, register_family, unregister_family
from glance_lightning.schedules import derive_timesteps
from glance_lightning.settings import LoraSettings, OptimizerSettings, ScheduleDerivation, TimestepSettings

NAME = "pooled-only-flux"


class PooledOnlyFlux(GlanceModule):
    """A deliberately different family: FLUX weights, T5 text only through a mean-pooled token, no guidance."""

    family = NAME
    default_lora_targets = ("to_q", "to_v", "proj_out")
    size_multiple = 16

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeds, pooled, _ = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                    max_sequence_length=16)
        return {"embeds": embeds.mean(dim=1, keepdim=True), "pooled": pooled}

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return (vae.encode(pixels).latent_dist.mode() - vae.config.shift_factor) * vae.config.scaling_factor

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample

    def predict_velocity(self, noisy: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        from diffusers import FluxPipeline

        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        out = self.transformer(
            hidden_states=packed, timestep=sigma, guidance=torch.ones(b), pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["embeds"], txt_ids=torch.zeros(1, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * 2, w * 2, 2)


# Its own schedule: a static shift of 2 that the pipeline does not hand linspace sigmas, unlike FLUX's.
SPEC = FamilySpec(
    name=NAME, module=PooledOnlyFlux, pipeline="diffusers:FluxPipeline", linspace_sigmas=False,
    scheduler_config={"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 2.0},
    tiny_builder="glance_lightning.tiny.builders:flux",
)


@pytest.fixture(scope="module")
def registered():
    register_family(SPEC)
    yield SPEC
    unregister_family(NAME)


def test_registration_is_checked_and_listed(registered):
    assert NAME in family_names() and get_family(NAME).module_class() is PooledOnlyFlux
    with pytest.raises(ValueError, match="already registered"):
        register_family(FamilySpec(name=NAME, module=PooledOnlyFlux, pipeline="x:y", scheduler_config={}))
    with pytest.raises(ValueError, match="unknown family 'no-such'"):
        get_family("no-such")


def test_a_registered_family_fits_with_derived_lists_then_schedules_and_samples(registered, repo: Path,
                                                                                tmp_path: Path, capsys):
    derivation = ScheduleDerivation(resolution=64, num_steps=20, slow_indices=[0, 2], fast_indices=[5, 12])
    module = PooledOnlyFlux(
        pretrained_model=f"tiny:{NAME}", timesteps=TimestepSettings(derive=derivation), slow_steps=3, fast_steps=3,
        lora=LoraSettings(rank=4, alpha=4), optimizer=OptimizerSettings(lr=1e-2), output_dir=str(tmp_path / "out"),
    )
    data = GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=64)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 6
    expected = derive_timesteps(NAME, resolution=64, num_steps=20, slow_indices=[0, 2], fast_indices=[5, 12])
    flux_lists = derive_timesteps("flux", resolution=64, num_steps=20, slow_indices=[0, 2], fast_indices=[5, 12])
    assert expected["slow"] != pytest.approx(flux_lists["slow"])  # its own scheduler config, not FLUX's
    meta = read_glance_metadata(tmp_path / "out" / "slow")
    assert meta["family"] == NAME and meta["timesteps"] == pytest.approx(expected["slow"])
    lora_targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in module.transformer.named_parameters()
                    if "lora_A.slow" in n}
    assert lora_targets == {"to_q", "to_v", "proj_out"}

    capsys.readouterr()
    assert run_schedule_command(["--family", NAME, "--resolution", "64", "--steps", "20", "--slow-indices", "0,2",
                                 "--fast-indices", "5,12"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["slow"] == pytest.approx(expected["slow"], abs=1e-4)

    out = tmp_path / "images"
    assert run_sample_command(["--model", f"tiny:{NAME}", "--slow", str(tmp_path / "out" / "slow"), "--fast",
                               str(tmp_path / "out" / "fast"), "--prompt", "a red ball", "--height", "64",
                               "--width", "64", "--output", str(out)]) == 0
    assert [p.name for p in out.glob("*.png")] == ["p0_s0.png"]
    assert capsys.readouterr().out.startswith(f"{out / 'p0_s0.png'}  seed 0  slow ")
    assert json.loads(Image.open(out / "p0_s0.png").text["glance"])["family"] == NAME
