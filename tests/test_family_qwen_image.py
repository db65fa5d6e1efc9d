"""What only Qwen-Image does, on the tiny model: the official recipe's defaults, true CFG as the stock pipeline
combines it, padded batches of prompts of different lengths, and the VAE's per-channel latent normalisation.
Training, the quick start, stock-pipeline LoRAs, the timestep convention and learning are the family
contract's (test_family_contract.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from glance_lightning.datamodules.glance import GlanceDataModule

from glance_lightning.families.qwen_image import QWEN_LORA_TARGETS, QwenImageGlance
from glance_lightning.settings import TimestepSettings

SLOW = [1000.0, 979.1915, 957.5157, 934.9171, 911.3354]
FAST = [886.7053, 745.0728, 562.9505, 320.0802, 20.0]
T2I = "glance_lightning/assets/samples/t2i"


@pytest.fixture(scope="module")
def loaded() -> QwenImageGlance:
    """A loaded, untrained module (adapters at their init: lora_B = 0, so the base model's output)."""
    module = QwenImageGlance(pretrained_model="tiny:qwen-image", timesteps=TimestepSettings(slow=SLOW, fast=FAST))
    module.load_base_model()
    module.transformer.eval()
    return module


def test_official_recipe_defaults(repo: Path):
    assert QwenImageGlance.default_lora_targets == (
        "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
        "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1",
    )
    config = yaml.safe_load((repo / "configs/qwen-image.yaml").read_text())
    args = config["model"]["init_args"]
    assert args["lora"]["targets"] == list(QWEN_LORA_TARGETS)
    assert (args["lora"]["rank"], args["lora"]["alpha"], args["optimizer"]["lr"]) == (32, 128, 0.0003)
    assert args["caption_dropout"] == 0.1 and args["dropout_prompt"] == " "
    assert args["timesteps"] == {"slow": SLOW, "fast": FAST}


def test_true_cfg_matches_the_stock_pipeline_combination(loaded: QwenImageGlance):
    """guided_velocity = the pipeline's neg + s (pos - neg), rescaled per token to the conditional norm."""
    module = loaded
    noisy = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.tensor([0.8])
    cond, neg = module.conditioning_for("a red ball"), module.conditioning_for(" ")
    with torch.no_grad():
        guided = module.guided_velocity(noisy, sigma, cond, neg, 4.0)
        pos_t, neg_t = module.predict_tokens(noisy, sigma, cond), module.predict_tokens(noisy, sigma, neg)
        unguided = module.guided_velocity(noisy, sigma, cond, neg, 1.0)
    comb = neg_t + 4.0 * (pos_t - neg_t)
    expected = module._unpack(comb * (pos_t.norm(dim=-1, keepdim=True) / comb.norm(dim=-1, keepdim=True)), 8, 8)
    torch.testing.assert_close(guided, expected)
    torch.testing.assert_close(unguided, module._unpack(pos_t, 8, 8))
    assert (guided - unguided).abs().max() > 1e-4


def test_padded_batch_matches_single_samples(loaded: QwenImageGlance):
    """Prompts of different lengths collate with padding + mask and predict as they do alone."""
    module = loaded
    short, long = module.conditioning_for("ball"), module.conditioning_for("a small shiny red ball on a table")
    assert short["prompt_embeds"].shape[1] < long["prompt_embeds"].shape[1]
    batch = module.collate_conditions([short, long])
    assert batch["prompt_embeds"].shape[:2] == batch["prompt_embeds_mask"].shape == (2, long["prompt_embeds"].shape[1])
    assert batch["prompt_embeds_mask"][0].sum() == short["prompt_embeds"].shape[1]
    noisy = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([0.9, 0.5])
    with torch.no_grad():
        together = module.predict_velocity(noisy, sigma, batch)
        alone = [module.predict_velocity(noisy[i : i + 1], sigma[i : i + 1], c) for i, c in enumerate((short, long))]
    torch.testing.assert_close(together, torch.cat(alone), rtol=1e-4, atol=1e-5)


def test_latents_round_trip_the_qwen_vae_normalisation(loaded: QwenImageGlance, repo: Path):
    module = loaded
    data = GlanceDataModule(path=str(repo / T2I), resolution=64)
    data.setup()
    with torch.no_grad():
        latents = module.encode_sample_latents(data.train_samples[0])
        assert latents.shape == (1, *module.latent_shape(64, 64)) == (1, 4, 8, 8)
        vae = module.pipe.vae
        raw = vae.encode(data.train_samples[0].pixels[None, :, None]).latent_dist.mode()[:, :, 0]
        mean = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1)
        std = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1)
        torch.testing.assert_close(latents, (raw - mean) / std)
        images = module.decode_to_images(latents)
    assert images.shape == (1, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
