"""The model card a run folder gets (README.md in the Hugging Face format) and `export --hub`."""

from __future__ import annotations

import re

import pytest
from huggingface_hub import ModelCard

from glance_lightning.cli import main
from glance_lightning.lora_io import LORA_WEIGHT_NAME, read_glance_metadata
from glance_lightning.model_card import render


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_the_quick_start_run_folder_has_a_model_card(quickstart_run):
    run = quickstart_run("configs/quickstart.yaml")
    card = ModelCard.load(run / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and {"lora", "glance", "flux"} <= set(data["tags"])
    assert "base_model" not in data  # tiny:flux is not a hub repo
    assert data["instance_prompt"] == data["widget"][0]["text"]
    assert all((run / w["output"]["url"]).is_file() for w in data["widget"])
    meta = read_glance_metadata(run / "slow")
    for phase in ("slow", "fast"):
        assert f"`{phase}/{LORA_WEIGHT_NAME}`" in card.text
        listed = ", ".join(f"{t:g}" for t in read_glance_metadata(run / phase)["timesteps"])
        assert listed in card.text, phase
    assert f"rank {meta['rank']}" in card.text and "`tiny:flux`" in card.text
    assert "LoraLoaderModelOnly" in card.text and "ManualSigmas" in card.text
    for block in _python_blocks(card.text):
        compile(block, "model card", "exec")  # the snippets are valid Python


def test_a_hub_base_model_gives_base_model_and_its_license():
    meta = {p: {"family": "flux", "base_model": "black-forest-labs/FLUX.1-dev", "rank": 32, "alpha": 128,
                "resolution": 1024, "trained_steps": 60,
                "timesteps": [1000.0, 990.0] if p == "slow" else [500.0, 100.0]} for p in ("slow", "fast")}
    paths = {p: f"{p}/{LORA_WEIGHT_NAME}" for p in ("slow", "fast")}
    card = ModelCard(render(meta, paths, [("samples/a.png", {"prompt": "a cat", "seed": 0})]))
    data = card.data.to_dict()
    assert data["base_model"] == "black-forest-labs/FLUX.1-dev"
    assert data["license"] == "other" and data["license_name"] == "flux-1-dev-non-commercial-license"
    assert 'FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev"' in card.text
    assert "sigmas = [1.0, 0.99, 0.5, 0.1]" in card.text and "if step == 2 - 1:" in card.text
    edit = {p: {**m, "family": "qwen-image-edit", "base_model": "Qwen/Qwen-Image-Edit"} for p, m in meta.items()}
    text = render(edit, paths, [])
    assert "QwenImageEditPipeline" in text and 'image=load_image("control.png")' in text
    assert ModelCard(text).data.to_dict()["license"] == "apache-2.0"


def test_export_hub_writes_a_folder_ready_to_upload(quickstart_run, tmp_path, capsys):
    run = quickstart_run("configs/quickstart.yaml")
    hub = tmp_path / "hub"
    assert main(["export", "--lora", str(run), "--hub", str(hub)]) == 0
    assert "upload_folder" in capsys.readouterr().out
    for phase in ("slow", "fast"):
        assert (hub / phase / LORA_WEIGHT_NAME).read_bytes() == (run / phase / LORA_WEIGHT_NAME).read_bytes()
    data = ModelCard.load(hub / "README.md").data.to_dict()
    assert data["widget"] and all((hub / w["output"]["url"]).is_file() for w in data["widget"])
    assert sorted(p.name for p in hub.iterdir()) == ["README.md", "fast", "samples", "slow"]
    before = (hub / "README.md").read_bytes()
    assert main(["export", "--lora", str(run), "--hub", str(hub)]) == 2  # never into a non-empty folder
    assert "--hub" in capsys.readouterr().err and (hub / "README.md").read_bytes() == before


@pytest.mark.parametrize("fmt", ["comfyui"])
def test_export_hub_in_another_layout(quickstart_run, tmp_path, fmt):
    from safetensors import safe_open

    run = quickstart_run("configs/quickstart.yaml")
    assert main(["export", "--lora", str(run), "--hub", str(tmp_path / "hub"), "--format", fmt]) == 0
    with safe_open(tmp_path / "hub" / "slow" / LORA_WEIGHT_NAME, "pt") as f:
        assert all(key.startswith("diffusion_model.") for key in f.keys())  # noqa: SIM118 (safe_open is not iterable); ComfyUI's names
