"""The foundation end to end: the quick-start config through the CLI, saved LoRAs in stock diffusers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline
from safetensors import safe_open

from glance_lightning.cli import main
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.tiny import tiny_model_path


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory, fit_config) -> Path:
    return fit_config("configs/quickstart.yaml", tmp_path_factory.mktemp("quickstart"))



def test_quickstart_trains_both_loras_and_renders_a_chained_sample(quickstart_run: Path):
    for phase in ("slow", "fast"):
        meta = read_glance_metadata(quickstart_run / phase)
        assert meta["family"] == "flux" and meta["phase"] == phase
        assert meta["rank"] == 8 and meta["alpha"] == 32 and meta["resolution"] == 64
        assert meta["trained_steps"] == 150
    slow_meta = read_glance_metadata(quickstart_run / "slow")
    assert slow_meta["timesteps"] == pytest.approx([1000.0, 986.9786, 973.2042, 958.6094, 943.1188])
    assert slow_meta["schedule"]["fast"][-1] == pytest.approx(60.5503)
    samples = sorted((quickstart_run / "samples").glob("*.png"))
    assert any(p.name.startswith("step000300") for p in samples)
    assert (quickstart_run / "config.yaml").is_file()


def test_checkpoint_holds_only_trainable_weights(quickstart_run: Path):
    ckpt = quickstart_run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    keys = list(state["state_dict"])
    assert keys and all("lora_" in k for k in keys)
    assert any(".slow." in k for k in keys) and any(".fast." in k for k in keys)
    assert state["optimizer_states"]


def test_adapters_were_trained_only_in_their_phase(quickstart_run: Path):
    for phase in ("slow", "fast"):
        with safe_open(str(quickstart_run / phase / "pytorch_lora_weights.safetensors"), "pt") as f:
            b_norm = sum(f.get_tensor(k).norm().item() for k in f.keys() if "lora_B" in k)  # noqa: SIM118
            assert all(k.startswith("transformer.") for k in f.keys())  # noqa: SIM118
            adapter_meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert b_norm > 0, f"{phase} LoRA B matrices are still zero: it was never trained"
        assert adapter_meta["transformer.r"] == 8 and adapter_meta["transformer.lora_alpha"] == 32


def test_saved_loras_load_into_stock_flux_pipeline_and_change_its_output(quickstart_run: Path):
    pipe = FluxPipeline.from_pretrained(tiny_model_path("tiny:flux"))
    pipe.set_progress_bar_config(disable=True)

    def run():
        return pipe(
            "a red ball", height=64, width=64, num_inference_steps=2, max_sequence_length=32,
            generator=torch.Generator().manual_seed(0), output_type="pt",
        ).images

    base = run()
    pipe.load_lora_weights(str(quickstart_run / "slow"), adapter_name="slow")
    pipe.load_lora_weights(str(quickstart_run / "fast"), adapter_name="fast")
    # alpha/rank came back from the metadata, not guessed from the shapes
    layer = pipe.transformer.transformer_blocks[0].attn.to_q
    assert layer.scaling["slow"] == pytest.approx(32 / 8)
    pipe.set_adapters("slow")
    with_slow = run()
    pipe.set_adapters("fast")
    with_fast = run()
    assert (with_slow - base).abs().max() > 1e-4
    assert (with_fast - with_slow).abs().max() > 1e-4


def test_fit_ckpt_path_last_continues_the_newest_run_in_place(repo: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(repo)
    common = ["fit", "--config", "configs/quickstart.yaml", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.slow_steps", "2", "--trainer.callbacks.init_args.every_n_steps", "0"]
    assert main([*common, "--model.init_args.fast_steps", "2"]) == 0
    assert main([*common, "--model.init_args.fast_steps", "4", "--ckpt_path", "last"]) == 0
    run = tmp_path / "lightning_logs" / "version_0"
    assert read_glance_metadata(run / "fast")["trained_steps"] == 4
    assert not (tmp_path / "lightning_logs" / "version_1" / "fast").exists()
    from glance_lightning.cli import find_last_checkpoint

    state = torch.load(find_last_checkpoint(tmp_path), map_location="cpu", weights_only=True)
    assert state["global_step"] == 6  # a further `--ckpt_path last` continues from here


def test_existing_run_directory_is_not_overwritten(repo: Path, quickstart_run: Path, monkeypatch):
    monkeypatch.chdir(repo)
    before = (quickstart_run / "slow" / "pytorch_lora_weights.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="output_dir"):
        main(["fit", "--config", "configs/quickstart.yaml", "--model.init_args.output_dir", str(quickstart_run),
              "--trainer.default_root_dir", str(quickstart_run.parent.parent / "other")])
    assert (quickstart_run / "slow" / "pytorch_lora_weights.safetensors").read_bytes() == before
