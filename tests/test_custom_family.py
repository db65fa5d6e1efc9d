"""A new model family added through library imports alone, defined here and trained via the public API."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from diffusers import FluxPipeline
from glance_lightning.datamodules.glance import GlanceDataModule

from glance_lightning.families.base import Conditioning, GlanceModule
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings


class PooledOnlyFlux(GlanceModule):
    """A deliberately different family: FLUX weights, T5 text only through a mean-pooled token, no guidance."""

    family = "pooled-only-flux"
    pipeline_class = FluxPipeline
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
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        out = self.transformer(
            hidden_states=packed, timestep=sigma, guidance=torch.ones(b), pooled_projections=cond["pooled"],
            encoder_hidden_states=cond["embeds"], txt_ids=torch.zeros(1, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return FluxPipeline._unpack_latents(out, h * 2, w * 2, 2)


def test_a_family_defined_outside_the_library_trains_and_saves(repo: Path, tmp_path: Path):
    module = PooledOnlyFlux(
        pretrained_model="tiny:flux", timesteps=TimestepSettings(slow=[1.0, 0.95], fast=[0.7, 0.3], unit="sigmas"),
        slow_steps=3, fast_steps=3, lora=LoraSettings(rank=4, alpha=4), optimizer=OptimizerSettings(lr=1e-2),
        output_dir=str(tmp_path / "out"),
    )
    data = GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=64)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 6
    meta = read_glance_metadata(tmp_path / "out" / "slow")
    assert meta["family"] == "pooled-only-flux" and meta["timesteps"] == [1000.0, 950.0]
    lora_targets = {n.split(".lora_")[0].rsplit(".", 1)[-1] for n, _ in module.transformer.named_parameters()
                    if "lora_A.slow" in n}
    assert lora_targets == {"to_q", "to_v", "proj_out"}
    # the shared chained sampler works for it too
    latents = module.generate_latents("a red ball", seed=0, height=64, width=64)
    assert latents.shape == (1, *module.latent_shape(64, 64)) and torch.isfinite(latents).all()
