"""Qwen-Image end to end on the tiny model: training step, CLI quick start, stock-pipeline LoRAs, the timestep
convention against the stock pipeline, true CFG, and learning (measured on the quick start's checkpoint)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
from glance_lightning.datamodules.glance import GlanceDataModule

from glance_lightning.evaluation import chain_fidelity, phase_losses
from glance_lightning.families.qwen_image import QWEN_LORA_TARGETS, QwenImageGlance
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings
from glance_lightning.tiny import tiny_model_path

CONFIG = "configs/quickstart-qwen-image.yaml"
SLOW = [1000.0, 979.1915, 957.5157, 934.9171, 911.3354]
FAST = [886.7053, 745.0728, 562.9505, 320.0802, 20.0]
T2I = "glance_lightning/assets/samples/t2i"



@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, fit_config) -> Path:
    return fit_config(CONFIG, tmp_path_factory.mktemp("quickstart_qwen"))


def quickstart_module(repo: Path, tmp_path: Path) -> QwenImageGlance:
    """A fresh module with exactly the quick start's model settings (untrained adapters)."""
    args = yaml.safe_load((repo / CONFIG).read_text())["model"]["init_args"]
    return QwenImageGlance(
        pretrained_model=args["pretrained_model"], timesteps=TimestepSettings(**args["timesteps"]),
        lora=LoraSettings(**args["lora"]), max_sequence_length=args["max_sequence_length"],
        output_dir=str(tmp_path / "unused"),
    )


def exact_scheduler(pipe) -> None:
    """Make the stock pipeline step through the sigmas it is given (no shift), so its timesteps are known."""
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(
        pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0, shift_terminal=None
    )


def test_official_recipe_defaults():
    assert QwenImageGlance.default_lora_targets == (
        "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
        "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1",
    )
    assert QwenImageGlance.family == "qwen-image" and QwenImageGlance.timestep_scale == 1.0
    config = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/qwen-image.yaml").read_text())
    args = config["model"]["init_args"]
    assert args["lora"]["targets"] == list(QWEN_LORA_TARGETS)
    assert (args["lora"]["rank"], args["lora"]["alpha"], args["optimizer"]["lr"]) == (32, 128, 0.0003)
    assert args["caption_dropout"] == 0.1 and args["dropout_prompt"] == " "
    assert args["timesteps"] == {"slow": SLOW, "fast": FAST}


def test_one_training_step_moves_only_the_active_lora(repo: Path, tmp_path: Path):
    module = QwenImageGlance(
        pretrained_model="tiny:qwen-image", timesteps=TimestepSettings(slow=SLOW, fast=FAST), slow_steps=1,
        fast_steps=0, lora=LoraSettings(rank=4, alpha=16), optimizer=OptimizerSettings(lr=1e-2),
        output_dir=str(tmp_path / "out"),
    )
    data = GlanceDataModule(path=str(repo / T2I), resolution=64)
    module.load_base_model()
    pipe = module.pipe
    tracked = {f"{name}.{n}": p for name in ("transformer", "text_encoder", "vae")
               for n, p in getattr(pipe, name).named_parameters()}
    before = {k: p.detach().clone() for k, p in tracked.items()}
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 1
    changed = {k for k, p in tracked.items() if not torch.equal(p.detach(), before[k])}
    assert changed and all(".slow." in k and "lora_" in k for k in changed), sorted(changed)
    assert any("lora_B.slow" in k for k in changed)
    # only the official targets got adapters
    adapted = {k.split(".lora_A")[0] for k in tracked if "lora_A.slow" in k}
    assert adapted and all(any(layer.endswith("." + t) for t in QWEN_LORA_TARGETS) for layer in adapted)
    assert {t for t in QWEN_LORA_TARGETS if any(layer.endswith("." + t) for layer in adapted)} == set(QWEN_LORA_TARGETS)


def test_quickstart_trains_both_loras_and_renders_a_chained_sample(quickstart_run: Path):
    for phase in ("slow", "fast"):
        meta = read_glance_metadata(quickstart_run / phase)
        assert meta["family"] == "qwen-image" and meta["phase"] == phase
        assert meta["rank"] == 8 and meta["alpha"] == 32 and meta["resolution"] == 64
        assert meta["trained_steps"] == 150
        assert meta["timesteps"] == pytest.approx(SLOW if phase == "slow" else FAST)
        assert meta.get("family_options", {}).get("max_sequence_length", 512) == 512
    samples = sorted((quickstart_run / "samples").glob("*.png"))
    assert [p.name for p in samples] == ["step000150_p0_s0.png", "step000300_p0_s0.png"]


def test_saved_loras_load_into_stock_qwen_pipeline_and_change_its_output(quickstart_run: Path):
    pipe = QwenImagePipeline.from_pretrained(tiny_model_path("tiny:qwen-image"))
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe("a red ball", height=64, width=64, num_inference_steps=2, true_cfg_scale=1.0,
                    generator=torch.Generator().manual_seed(0), output_type="pt").images

    base = run()
    pipe.load_lora_weights(str(quickstart_run / "slow"), adapter_name="slow")
    pipe.load_lora_weights(str(quickstart_run / "fast"), adapter_name="fast")
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.scaling["slow"] == pytest.approx(32 / 8)
    pipe.set_adapters("slow")
    with_slow = run()
    pipe.set_adapters("fast")
    with_fast = run()
    assert base.shape == (1, 3, 64, 64)
    assert (with_slow - base).abs().max() > 1e-4
    assert (with_fast - with_slow).abs().max() > 1e-4


def test_timestep_and_velocity_match_the_stock_pipeline(tmp_path: Path):
    """The stock pipeline calls the transformer with t / 1000 = sigma; so must predict_velocity. With t and t/1000
    swapped the recorded timesteps differ by 1000x (and the predictions differ)."""
    sigma = 0.7
    pipe = QwenImagePipeline.from_pretrained(tiny_model_path("tiny:qwen-image"))
    pipe.set_progress_bar_config(disable=True)
    exact_scheduler(pipe)
    calls = []

    def record(module, args, kwargs, output):
        calls.append({"timestep": kwargs["timestep"].clone(), "hidden": kwargs["hidden_states"].clone(),
                      "img_shapes": kwargs["img_shapes"], "out": output[0].clone()})

    handle = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    pipe("a red ball", height=64, width=64, sigmas=[sigma, 0.3], num_inference_steps=2, true_cfg_scale=1.0,
         generator=torch.Generator().manual_seed(0), output_type="latent")
    handle.remove()
    stock = calls[0]
    assert stock["timestep"].tolist() == pytest.approx([sigma])
    assert stock["img_shapes"] == [[(1, 4, 4)]]

    module = QwenImageGlance(pretrained_model="tiny:qwen-image", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                             output_dir=str(tmp_path / "o"))
    module.load_base_model()
    seen = []
    handle = module.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["timestep"].clone()), with_kwargs=True
    )
    noisy = module._unpack(stock["hidden"], 8, 8)
    with torch.no_grad():
        pred = module.predict_velocity(noisy, torch.tensor([sigma]), module.conditioning_for("a red ball"))
    handle.remove()
    assert seen[0].tolist() == pytest.approx(stock["timestep"].tolist())
    assert seen[0].tolist() == pytest.approx([sigma])
    # same latents, same text, same sigma: the same velocity as the stock pipeline's transformer call
    torch.testing.assert_close(pred, module._unpack(stock["out"], 8, 8), rtol=1e-4, atol=1e-5)
    assert QwenImageGlance.timestep_scale * sigma == pytest.approx(sigma)


def test_true_cfg_matches_the_stock_pipeline_combination(tmp_path: Path):
    """guided_velocity = the pipeline's neg + s (pos - neg), rescaled per token to the conditional norm."""
    module = QwenImageGlance(pretrained_model="tiny:qwen-image", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                             output_dir=str(tmp_path / "o"))
    module.load_base_model()
    module.transformer.eval()
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


def test_padded_batch_matches_single_samples(tmp_path: Path):
    """Prompts of different lengths collate with padding + mask and predict as they do alone."""
    module = QwenImageGlance(pretrained_model="tiny:qwen-image", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                             output_dir=str(tmp_path / "o"))
    module.load_base_model()
    module.transformer.eval()
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


def test_latents_round_trip_the_qwen_vae_normalisation(repo: Path, tmp_path: Path):
    module = QwenImageGlance(pretrained_model="tiny:qwen-image", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                             output_dir=str(tmp_path / "o"))
    module.load_base_model()
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


def test_training_lowers_loss_and_pulls_the_chain_to_the_sample(repo: Path, quickstart_run: Path, tmp_path: Path):
    """Learning, measured on the quick start's own checkpoint: the same module before (zero LoRA B) and after
    loading the trained adapters from the Lightning checkpoint."""
    module = quickstart_module(repo, tmp_path)
    data = GlanceDataModule(path=str(repo / T2I), resolution=64)
    data.setup()
    module.load_base_model()
    module.build_cache(data.train_samples)
    before_loss, before = phase_losses(module), chain_fidelity(module, data.train_samples[0])

    (ckpt,) = (quickstart_run / "checkpoints").glob("*.ckpt")
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    result = module.load_state_dict(state, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    after_loss, after = phase_losses(module), chain_fidelity(module, data.train_samples[0])

    for phase in ("slow", "fast"):
        assert after_loss[phase] < 0.6 * before_loss[phase], (phase, before_loss, after_loss)
    # the exact Slow->Fast chain from pure noise lands near the training latents and, decoded, near the image
    assert after["latent_mse"] < 0.3 * before["latent_mse"], (before, after)  # measured 0.06-0.08 (seeds 0-3)
    assert after["psnr"] > before["psnr"] + 4.0, (before, after)  # 9.1 dB before, +8.9 to +10.3 dB
    assert np.isfinite(after["psnr"])
