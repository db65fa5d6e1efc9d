"""Real checkpoints as users have them: hub ids through a local hub cache (offline), component overrides from a
diffusers folder or a single file in the original layout, staged loading, and the on-disk encode cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from glance_lightning.datamodules.glance import GlanceDataModule

from glance_lightning.families.encoding import UnencodedPromptError
from glance_lightning.families.flux import FluxGlance
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.models import ModelNotFoundError, ResolvedModel, is_hub_id, resolve_pretrained
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings
from glance_lightning.tiny import tiny_model_path

LISTS = TimestepSettings(slow=[1.0, 0.95], fast=[0.7, 0.3], unit="sigmas")
SAMPLES = "glance_lightning/assets/samples/t2i"


def hub_cache_from(model: Path, cache: Path, repo: str) -> str:
    """Lay ``model`` out as huggingface_hub caches a download: blobs named by content, snapshot symlinks, refs."""
    root = cache / f"models--{repo.replace('/', '--')}"
    commit = hashlib.sha1(repo.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    for file in model.rglob("*"):
        if file.is_file():
            blob = root / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, blob)
            link = snapshot / file.relative_to(model)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(blob)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return commit


@pytest.fixture()
def offline_hub(tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "hf-cache"
    hub_cache_from(Path(tiny_model_path("tiny:flux")), cache, "tiny-org/tiny-flux")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _fit(module: FluxGlance, repo: Path, root: Path) -> L.Trainer:
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=root)
    trainer.fit(module, GlanceDataModule(path=str(repo / SAMPLES), resolution=64))
    return trainer


def _module(tmp_path: Path, name: str = "tiny:flux", **kwargs) -> FluxGlance:
    kwargs.setdefault("encode_cache", str(tmp_path / "encoded"))
    kwargs.setdefault("output_dir", str(tmp_path / "out"))
    return FluxGlance(pretrained_model=name, timesteps=LISTS, slow_steps=2, fast_steps=2,
                      lora=LoraSettings(rank=4, alpha=4), optimizer=OptimizerSettings(lr=1e-2),
                      max_sequence_length=16, **kwargs)


# ------------------------------------------------------------------------------------------ hub ids


def test_a_hub_id_trains_offline_from_the_hub_cache(offline_hub: Path, repo: Path, tmp_path: Path):
    module = _module(tmp_path, "tiny-org/tiny-flux")
    assert _fit(module, repo, tmp_path).global_step == 4
    assert module.resolve_model().path.startswith(str(offline_hub))
    assert module.resolve_model().revision == hashlib.sha1(b"tiny-org/tiny-flux").hexdigest()
    assert read_glance_metadata(tmp_path / "out" / "slow")["base_model"] == "tiny-org/tiny-flux"


def test_a_revision_is_resolved_and_a_missing_one_is_named(offline_hub: Path):
    commit = hashlib.sha1(b"tiny-org/tiny-flux").hexdigest()
    assert resolve_pretrained(f"tiny-org/tiny-flux@{commit}").path.endswith(commit)
    with pytest.raises(ModelNotFoundError, match="HF_HUB_OFFLINE=1 and it is not in the cache"):
        resolve_pretrained("tiny-org/tiny-flux@v9")


@pytest.mark.parametrize(("error", "match"), [
    ("GatedRepoError", "gated repository: accept its licence.*HF_TOKEN"),
    ("RepositoryNotFoundError", "no such repository on the Hugging Face Hub"),
    ("RevisionNotFoundError", "has no revision"),
    ("LocalEntryNotFoundError", "the Hub cannot be reached"),
])
def test_hub_failures_name_the_id_and_the_fix(error: str, match: str, monkeypatch):
    import huggingface_hub
    import huggingface_hub.errors as errors

    def fail(*args, **kwargs):
        cls = getattr(errors, error)
        exc = cls.__new__(cls)  # the HTTP errors need a response object; the message is what matters
        Exception.__init__(exc, "simulated")
        raise exc

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    with pytest.raises(ModelNotFoundError, match=f"model.pretrained_model='someone/model(@main)?'.*{match}"):
        resolve_pretrained("someone/model@main" if error == "RevisionNotFoundError" else "someone/model")


def test_an_uncached_id_offline_is_refused_before_anything_loads(offline_hub: Path, tmp_path: Path):
    with pytest.raises(ModelNotFoundError, match="'nobody/absent'.*not in the cache.*hf download nobody/absent"):
        _module(tmp_path, "nobody/absent").resolve_model()


def test_names_are_told_apart(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("black-forest-labs/FLUX.1-dev") and is_hub_id("Qwen/Qwen-Image@main")
    (tmp_path / "models" / "flux").mkdir(parents=True)
    assert not is_hub_id("models/flux")  # an existing relative folder is a folder
    with pytest.raises(ModelNotFoundError, match="has no model_index.json"):
        resolve_pretrained("models/flux")
    with pytest.raises(ModelNotFoundError, match="no such directory"):
        resolve_pretrained("/no/such/model")


# ------------------------------------------------------------------------------------------ overrides


def test_a_transformer_folder_override_is_used_with_the_rest_of_the_pipeline(tmp_path: Path):
    from diffusers import FluxTransformer2DModel

    base = Path(tiny_model_path("tiny:flux"))
    other = FluxTransformer2DModel.from_pretrained(base / "transformer")
    torch.manual_seed(1)
    for p in other.parameters():
        p.data.normal_()
    other.save_pretrained(tmp_path / "my-transformer")
    module = _module(tmp_path, transformer=str(tmp_path / "my-transformer"))
    module.load_base_model(with_adapters=False)
    loaded = dict(module.transformer.named_parameters())
    assert all(torch.equal(p, loaded[n]) for n, p in other.named_parameters())
    with pytest.raises(ModelNotFoundError, match="model.transformer=.*no such folder or checkpoint file"):
        _module(tmp_path, transformer=str(tmp_path / "nothing.safetensors")).load_base_model()


def to_bfl_layout(state: dict[str, torch.Tensor], double: int, single: int) -> dict[str, torch.Tensor]:
    """diffusers FLUX keys -> the original (BFL) layout ComfyUI users download, the inverse of diffusers'
    convert_flux_transformer_checkpoint_to_diffusers (fused qkv / linear1, adaLN shift-scale order)."""
    out = {"time_in.in_layer.weight": state["time_text_embed.timestep_embedder.linear_1.weight"]}
    pairs = {"time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
             "txt_in": "context_embedder", "img_in": "x_embedder", "final_layer.linear": "proj_out"}
    for i in range(double):
        d, b = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        pairs.update({f"{d}img_mod.lin": f"{b}norm1.linear", f"{d}txt_mod.lin": f"{b}norm1_context.linear",
                      f"{d}img_mlp.0": f"{b}ff.net.0.proj", f"{d}img_mlp.2": f"{b}ff.net.2",
                      f"{d}txt_mlp.0": f"{b}ff_context.net.0.proj", f"{d}txt_mlp.2": f"{b}ff_context.net.2",
                      f"{d}img_attn.proj": f"{b}attn.to_out.0", f"{d}txt_attn.proj": f"{b}attn.to_add_out"})
        for part in ("weight", "bias"):
            out[f"{d}img_attn.qkv.{part}"] = torch.cat([state[f"{b}attn.to_{x}.{part}"] for x in "qkv"])
            out[f"{d}txt_attn.qkv.{part}"] = torch.cat([state[f"{b}attn.add_{x}_proj.{part}"] for x in "qkv"])
        for side, prefix in (("img", "norm_"), ("txt", "norm_added_")):
            out[f"{d}{side}_attn.norm.query_norm.scale"] = state[f"{b}attn.{prefix}q.weight"]
            out[f"{d}{side}_attn.norm.key_norm.scale"] = state[f"{b}attn.{prefix}k.weight"]
    for i in range(single):
        s, b = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        pairs.update({f"{s}modulation.lin": f"{b}norm.linear", f"{s}linear2": f"{b}proj_out"})
        for part in ("weight", "bias"):
            out[f"{s}linear1.{part}"] = torch.cat([state[f"{b}attn.to_{x}.{part}"] for x in "qkv"]
                                                  + [state[f"{b}proj_mlp.{part}"]])
        out[f"{s}norm.query_norm.scale"] = state[f"{b}attn.norm_q.weight"]
        out[f"{s}norm.key_norm.scale"] = state[f"{b}attn.norm_k.weight"]
    for bfl, ours in pairs.items():
        for part in ("weight", "bias"):
            out[f"{bfl}.{part}"] = state[f"{ours}.{part}"]
    for part in ("weight", "bias"):  # the original splits adaLN into (shift, scale), diffusers into (scale, shift)
        scale, shift = state[f"norm_out.linear.{part}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{part}"] = torch.cat([shift, scale])
    return {f"model.diffusion_model.{k}": v.contiguous() for k, v in out.items()}  # ComfyUI's prefix


def test_a_single_file_flux_transformer_in_the_original_layout_loads(tmp_path: Path):
    """diffusers' FLUX single-file converter assumes the real width (3072, MLP 4x), so the tiny model here has it
    with one block of each kind; the rest of the pipeline is the tiny FLUX."""
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import save_file

    base = Path(tiny_model_path("tiny:flux"))
    config = {**FluxTransformer2DModel.load_config(base / "transformer"), "num_layers": 1, "num_single_layers": 1,
              "num_attention_heads": 24, "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56]}
    model_dir = tmp_path / "wide-flux"
    shutil.copytree(base, model_dir, ignore=shutil.ignore_patterns("transformer"))
    with torch.device("meta"):
        wide = FluxTransformer2DModel.from_config(config)
    state = {n: (torch.arange(p.numel(), dtype=torch.float32) % 997 / 997).view(p.shape).to(torch.bfloat16)
             for n, p in wide.state_dict().items()}  # distinct values, cheap to make: a wrong split shows
    (model_dir / "transformer").mkdir()
    (model_dir / "transformer" / "config.json").write_text(json.dumps(config))
    checkpoint = tmp_path / "flux1-wide.safetensors"
    save_file(to_bfl_layout(state, 1, 1), str(checkpoint))
    module = _module(tmp_path, name=str(model_dir), transformer=str(checkpoint), torch_dtype="bfloat16")
    module.load_base_model(with_adapters=False)
    loaded = module.transformer.state_dict()
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------ staged loading


def test_fit_frees_the_text_encoders_before_loading_the_transformer(repo: Path, tmp_path: Path, monkeypatch):
    import glance_lightning.families.loading as loading

    seen = []
    real = loading.load_transformer

    def spy(*args, **kwargs):
        seen.append([n for n in ("text_encoder", "text_encoder_2") if getattr(module.pipe, n) is not None])
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_transformer", spy)
    module = _module(tmp_path)
    _fit(module, repo, tmp_path)
    assert seen == [[]]  # no text encoder left when the transformer was loaded
    with pytest.raises(UnencodedPromptError, match="'a prompt nobody registered'.*ChainedSampleCallback prompts"):
        module.generate_latents("a prompt nobody registered", 0, 64, 64)
    module.generate_latents(module.data.train_samples[0].caption, 0, 64, 64)  # the caption was encoded


def test_a_second_run_on_the_same_data_loads_no_text_encoder(repo: Path, tmp_path: Path, monkeypatch):
    from transformers import CLIPTextModel, T5EncoderModel

    _fit(_module(tmp_path), repo, tmp_path / "first")
    calls = []
    for cls in (CLIPTextModel, T5EncoderModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, **k: calls.append(c) or 1 / 0))
    module = _module(tmp_path, output_dir=str(tmp_path / "out2"))
    _fit(module, repo, tmp_path / "second")
    assert calls == [] and module.encode_store().hits == 2 and module.encode_store().misses == 0


def test_a_corrupt_or_stale_cache_entry_is_rebuilt_not_used(repo: Path, tmp_path: Path):
    first = _module(tmp_path)
    _fit(first, repo, tmp_path / "first")
    entries = sorted((tmp_path / "encoded" / "flux").glob("*.safetensors"))
    assert len(entries) == 2
    entries[0].write_bytes(entries[0].read_bytes()[:100])  # truncated
    second = _module(tmp_path, output_dir=str(tmp_path / "out2"))
    _fit(second, repo, tmp_path / "second")
    store = second.encode_store()
    assert store.rebuilt == 1 and store.hits == 1
    assert torch.equal(second.latent_cache[0], first.latent_cache[0])
    assert all(torch.equal(second.cond_cache[0][k], first.cond_cache[0][k]) for k in first.cond_cache[0])
    # another max_sequence_length is another key, never the old entry
    third = FluxGlance(pretrained_model="tiny:flux", timesteps=LISTS, max_sequence_length=8,
                       encode_cache=str(tmp_path / "encoded"))
    assert not third.all_encoded(second.data.train_samples)


def test_model_fingerprints_change_with_the_weights(tmp_path: Path):
    base = Path(tiny_model_path("tiny:flux"))
    shutil.copytree(base, tmp_path / "m")
    model = ResolvedModel("m", str(tmp_path / "m"))
    before = model.fingerprint(["vae", "text_encoder"])
    assert model.fingerprint(["vae", "text_encoder"]) == before
    weights = next((tmp_path / "m" / "vae").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")
    assert model.fingerprint(["vae", "text_encoder"]) != before


def test_the_cache_command_fills_the_store_so_fit_loads_no_text_encoder(repo: Path, tmp_path: Path, monkeypatch):
    from transformers import CLIPTextModel, T5EncoderModel

    from glance_lightning.cli import main

    monkeypatch.chdir(repo)
    common = ["--config", "configs/quickstart.yaml", "--model.init_args.encode_cache", str(tmp_path / "enc"),
              "--trainer.default_root_dir", str(tmp_path / "run")]
    assert main(["cache", *common]) == 0
    assert len(list((tmp_path / "enc" / "flux").glob("*.safetensors"))) == 2
    for cls in (CLIPTextModel, T5EncoderModel):
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, **k: 1 / 0))
    assert main(["fit", *common, "--model.init_args.slow_steps", "1", "--model.init_args.fast_steps", "1",
                 "--trainer.callbacks.init_args.every_n_steps", "0"]) == 0


def test_the_host_memory_benchmark_runs_and_prints_its_tables(capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_host_memory.py"
    spec = importlib.util.spec_from_file_location("bench_host_memory", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--width", "256", "--t5-layers", "1", "--transformer-layers", "1"])
    assert [r["variant"] for r in results] == ["all at once", "staged"] and all(r["peak_rss_gib"] > 0 for r in results)
    out = capsys.readouterr().out
    assert "| staged |" in out and "FLUX.1-dev (bf16, predicted)" in out


def test_sample_encodes_every_prompt_frees_the_encoders_then_loads_the_transformer(repo: Path, tmp_path: Path,
                                                                                  monkeypatch, capsys):
    import glance_lightning.families.loading as loading
    from glance_lightning.commands.sample import run_sample_command
    from glance_lightning.families.encoding import EncodeOnce

    _fit(_module(tmp_path), repo, tmp_path)
    tiny_root = Path(tiny_model_path("tiny:flux")).parents[1]  # keep the session's tiny models ...
    monkeypatch.setattr("glance_lightning.tiny.cache_dir", lambda: tiny_root)
    monkeypatch.setenv("GLANCE_LIGHTNING_CACHE", str(tmp_path / "cache"))  # ... with an empty encode cache
    seen, encoded = [], []
    real_load, real_encode = loading.load_transformer, EncodeOnce.encode_condition
    monkeypatch.setattr(loading, "load_transformer",
                        lambda *a, **k: seen.append(list(encoded)) or real_load(*a, **k))
    monkeypatch.setattr(EncodeOnce, "encode_condition",
                        lambda self, prompt, controls: encoded.append(prompt) or real_encode(self, prompt, controls))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red ball\n\na blue cube\n")
    argv = ["--model", "tiny:flux", "--slow", str(tmp_path / "out" / "slow"), "--fast", str(tmp_path / "out" / "fast"),
            "--prompt", "a green cone", "--prompt-file", str(prompts), "--output", str(tmp_path / "images")]
    capsys.readouterr()
    assert run_sample_command(argv) == 0
    assert seen == [["a green cone", "a red ball", "a blue cube"]]  # all encoded before the transformer loaded
    assert sorted(p.name for p in (tmp_path / "images").glob("*.png")) == ["p0_s0.png", "p1_s0.png", "p2_s0.png"]
    from PIL import Image

    with Image.open(tmp_path / "images" / "p0_s0.png") as image:
        assert image.size == (64, 64)  # the LoRAs' training resolution, from their metadata
    assert run_sample_command([*argv[:-4], "--prompt-file", str(tmp_path / "none.txt"), "--output", "x"]) == 2
    assert "--prompt-file" in capsys.readouterr().err
