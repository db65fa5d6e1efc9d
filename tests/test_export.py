"""LoRA files load at the trained strength everywhere: the default file and every ``export`` format, for the FLUX,
SD3 and Qwen-Image key layouts, compared with the weight change diffusers applies (and the adapter was trained with).

``comfyui_weight_changes`` re-implements ComfyUI's LoRA loader from its source (comfyanonymous/ComfyUI),
independently of ``glance_lightning.lora_io``:

- comfy/sd.py ``load_lora_for_models``: ``key_map = comfy.lora.model_lora_keys_unet(model)``, ``lora =
  comfy.lora_convert.convert_lora(lora)`` (a no-op here: it only rewrites BFL-control, Wan-Fun and USO files),
  ``patches = comfy.lora.load_lora(lora, key_map)``, ``model.add_patches(patches, strength_model)``.
- comfy/lora.py ``model_lora_keys_unet``: for every ``diffusion_model.<k>.weight`` of the model,
  ``lora_unet_<k with "." -> "_">`` and ``diffusion_model.<k>`` (the generic format); then per model class:
  Flux: for each diffusers key ``d`` of ``comfy.utils.flux_to_diffusers``: ``transformer.<d>``, ``lycoris_<d_>``,
  ``lora_transformer_<d_>`` and ``<d>`` (DiffSynth); SD3: ``comfy.utils.mmdit_to_diffusers``, ``transformer.<d>``,
  ``base_model.model.<d>``, ``lora_transformer_<d_>``, ``lycoris_<d_>``; QwenImage: ``<k>``, ``transformer.<k>``,
  ``lycoris_<k_>``.
- comfy/utils.py ``flux_to_diffusers`` / ``mmdit_to_diffusers``: a diffusers weight -> a ComfyUI weight, or
  ``(weight, (dim, offset, size))`` for a slice of a fused weight, or ``(weight, None, swap_scale_shift)``.
- comfy/lora.py ``load_lora``: for each key ``x`` of the key map, ``alpha = lora["x.alpha"].item()`` if present
  else None; comfy/weight_adapter/lora.py ``LoRAAdapter.load``: (up, down) = ``x.lora_up.weight`` /
  ``x.lora_down.weight``, else ``x_lora.up.weight`` / ``x_lora.down.weight``, ``x.lora_B.weight`` /
  ``x.lora_A.weight``, ``x.lora.up.weight`` / ``x.lora.down.weight``, ``x.lora_B`` / ``x.lora_A``,
  ``x.lora_linear_layer.up.weight`` / ``...down...``, ``x.lora_B.default.weight`` / ``x.lora_A.default.weight``;
  every file key not used is logged "lora key not loaded".
- ``LoRAAdapter.calculate_weight``: ``alpha = v[2] / mat2.shape[0]`` if an alpha was found else ``1.0`` (mat2 =
  down), ``lora_diff = mm(up.flatten(1), down.flatten(1)).reshape(weight.shape)``, ``weight +=
  function(strength * alpha * lora_diff)``, on ``weight.narrow(*offset)`` where the key has an offset
  (comfy/lora.py ``calculate_weight``). The metadata is never read.

ComfyUI's MMDiT computes the fused qkv slice height as ``depth * 64``, which is its hidden size by construction; the
tiny SD3 has hidden 32 with 2 blocks, so the slice height here is the hidden size and the last block is
``num_layers - 1``. Only ``.weight`` entries are transcribed (LoRAs patch weights).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, QwenImagePipeline, StableDiffusion3Pipeline
from peft.tuners.lora import LoraLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from glance_lightning.commands.export import run_export_command
from glance_lightning.commands.sample import run_sample_command
from glance_lightning.families import family_class
from glance_lightning.inference import load_glance_loras
from glance_lightning.lora_layouts import FORMATS, read_lora
from glance_lightning.settings import LoraSettings
from glance_lightning.tiny import tiny_model_path

# Wide target lists: every ComfyUI name rule of each family is exercised (fused q/k/v and linear1, the
# swap_scale_shift modulations, embedders, a Conv2d for SD3).
TARGETS = {
    "flux": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out", "proj_mlp",
             "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
             "norm1_context.linear", "norm.linear", "norm_out.linear", "x_embedder", "context_embedder", "linear_1",
             "linear_2"],
    "sd3": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
            "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "norm1.linear",
            "norm1_context.linear", "norm_out.linear", "proj_out", "pos_embed.proj", "context_embedder", "linear_1",
            "linear_2"],
    "qwen-image": ["to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                   "img_mlp.net.0.proj", "img_mlp.net.2", "img_mod.1", "txt_mlp.net.0.proj", "txt_mlp.net.2",
                   "txt_mod.1", "img_in", "txt_in", "proj_out", "norm_out.linear", "linear_1", "linear_2"],
}
PIPELINES = {"flux": FluxPipeline, "sd3": StableDiffusion3Pipeline, "qwen-image": QwenImagePipeline}
RANK, ALPHA = 4, 16  # alpha/rank = 4, as every config of the project


# ------------------------------------------------------------------------------------------ ComfyUI, transcribed


def _swap_scale_shift(weight: torch.Tensor) -> torch.Tensor:  # comfy/utils.py swap_scale_shift
    shift, scale = weight.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_to_diffusers(depth: int, depth_single: int, hidden: int) -> dict:
    """comfy/utils.py flux_to_diffusers, the ".weight" entries, output_prefix "diffusion_model."."""
    key_map = {}
    for index in range(depth):
        f, t = f"transformer_blocks.{index}", f"diffusion_model.double_blocks.{index}"
        for i, c in enumerate("qkv"):
            key_map[f"{f}.attn.to_{c}.weight"] = (f"{t}.img_attn.qkv.weight", (0, hidden * i, hidden))
            key_map[f"{f}.attn.add_{c}_proj.weight"] = (f"{t}.txt_attn.qkv.weight", (0, hidden * i, hidden))
        block_map = {"attn.to_out.0": "img_attn.proj", "norm1.linear": "img_mod.lin",
                     "norm1_context.linear": "txt_mod.lin", "attn.to_add_out": "txt_attn.proj",
                     "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                     "ff_context.net.2": "txt_mlp.2"}
        for k, v in block_map.items():
            key_map[f"{f}.{k}.weight"] = f"{t}.{v}.weight"
    for index in range(depth_single):
        f, t = f"single_transformer_blocks.{index}", f"diffusion_model.single_blocks.{index}"
        for i, c in enumerate("qkv"):
            key_map[f"{f}.attn.to_{c}.weight"] = (f"{t}.linear1.weight", (0, hidden * i, hidden))
        key_map[f"{f}.proj_mlp.weight"] = (f"{t}.linear1.weight", (0, hidden * 3, hidden * 4))
        key_map[f"{f}.norm.linear.weight"] = f"{t}.modulation.lin.weight"
        key_map[f"{f}.proj_out.weight"] = f"{t}.linear2.weight"
    basic = {"final_layer.linear": "proj_out", "img_in": "x_embedder",
             "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2", "txt_in": "context_embedder",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2"}
    for comfy, diffusers in basic.items():
        key_map[f"{diffusers}.weight"] = f"diffusion_model.{comfy}.weight"
    key_map["norm_out.linear.weight"] = ("diffusion_model.final_layer.adaLN_modulation.1.weight", None,
                                         _swap_scale_shift)
    return key_map


def mmdit_to_diffusers(num_blocks: int, hidden: int) -> dict:
    """comfy/utils.py mmdit_to_diffusers (MMDIT_MAP_BLOCK, MMDIT_MAP_BASIC), ".weight" entries."""
    block = {"context_block.adaLN_modulation.1": "norm1_context.linear", "context_block.attn.proj": "attn.to_add_out",
             "context_block.mlp.fc1": "ff_context.net.0.proj", "context_block.mlp.fc2": "ff_context.net.2",
             "x_block.adaLN_modulation.1": "norm1.linear", "x_block.attn.proj": "attn.to_out.0",
             "x_block.mlp.fc1": "ff.net.0.proj", "x_block.mlp.fc2": "ff.net.2"}
    key_map = {}
    for i in range(num_blocks):
        f, t = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        for j, c in enumerate("qkv"):
            key_map[f"{f}.attn.to_{c}.weight"] = (f"{t}.x_block.attn.qkv.weight", (0, hidden * j, hidden))
            key_map[f"{f}.attn.add_{c}_proj.weight"] = (f"{t}.context_block.attn.qkv.weight", (0, hidden * j, hidden))
        for comfy, diffusers in block.items():
            key_map[f"{f}.{diffusers}.weight"] = f"{t}.{comfy}.weight"
    basic = {"context_embedder": "context_embedder", "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
             "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2", "x_embedder.proj": "pos_embed.proj",
             "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
             "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2", "final_layer.linear": "proj_out"}
    for comfy, diffusers in basic.items():
        key_map[f"{diffusers}.weight"] = f"diffusion_model.{comfy}.weight"
    key_map["norm_out.linear.weight"] = ("diffusion_model.final_layer.adaLN_modulation.1.weight", None,
                                         _swap_scale_shift)
    last = f"transformer_blocks.{num_blocks - 1}.norm1_context.linear.weight"
    key_map[last] = (f"diffusion_model.joint_blocks.{num_blocks - 1}.context_block.adaLN_modulation.1.weight", None,
                     _swap_scale_shift)
    return key_map


def _target(to) -> tuple[str, tuple | None, object]:
    if isinstance(to, str):
        return to, None, None
    return to[0], to[1], (to[2] if len(to) > 2 else None)


class ComfyModel:
    """The ComfyUI model's weights (names, shapes) for a tiny diffusers transformer, and ComfyUI's key map."""

    def __init__(self, family: str, transformer: torch.nn.Module) -> None:
        sd = {k: v.shape for k, v in transformer.state_dict().items() if k.endswith(".weight")}
        config = transformer.config
        hidden = config.num_attention_heads * config.attention_head_dim
        if family == "flux":
            self.dmap = flux_to_diffusers(config.num_layers, config.num_single_layers, hidden)
        elif family == "sd3":
            self.dmap = mmdit_to_diffusers(config.num_layers, hidden)
        else:  # QwenImage: ComfyUI's module names are diffusers'
            self.dmap = {k: f"diffusion_model.{k}" for k in sd}
        self.dmap = {k: v for k, v in self.dmap.items() if k in sd}
        shapes: dict[str, list[int]] = {}
        for d, to in self.dmap.items():  # a fused weight is as tall as its slices reach
            key, offset, _ = _target(to)
            shape = list(sd[d])
            if offset is not None:
                shape[0] = max(offset[1] + offset[2], shapes[key][0] if key in shapes else 0)
            shapes[key] = shape
        self.shapes = {k: tuple(v) for k, v in shapes.items()}
        self.key_map = self._lora_key_map(family)

    def _lora_key_map(self, family: str) -> dict:  # comfy/lora.py model_lora_keys_unet
        key_map = {}
        for k in self.shapes:
            base = k[len("diffusion_model."):-len(".weight")]
            key_map[f"lora_unet_{base.replace('.', '_')}"] = k
            key_map[k[:-len(".weight")]] = k
        for d, to in self.dmap.items():
            d = d[:-len(".weight")]
            if family == "flux":
                for key in (f"transformer.{d}", f"lycoris_{d.replace('.', '_')}",
                            f"lora_transformer_{d.replace('.', '_')}", d):
                    key_map[key] = to
            elif family == "sd3":
                for key in (f"transformer.{d}", f"base_model.model.{d}", f"lora_transformer_{d.replace('.', '_')}",
                            f"lycoris_{d.replace('.', '_')}"):
                    key_map[key] = to
            else:
                for key in (d, f"transformer.{d}", f"lycoris_{d.replace('.', '_')}"):
                    key_map[key] = to
        return key_map

    def weight_changes(self, lora: dict[str, torch.Tensor], strength: float = 1.0) -> tuple[dict, set]:
        """What ComfyUI adds to each of its weights for LoRA file tensors ``lora``; and the keys it did not load."""
        loaded, patches = set(), {}
        for x, to in self.key_map.items():  # comfy/lora.py load_lora + LoRAAdapter.load
            alpha = None
            if f"{x}.alpha" in lora:
                alpha = lora[f"{x}.alpha"].item()
                loaded.add(f"{x}.alpha")
            for up_name, down_name in ((f"{x}.lora_up.weight", f"{x}.lora_down.weight"),
                                       (f"{x}_lora.up.weight", f"{x}_lora.down.weight"),
                                       (f"{x}.lora_B.weight", f"{x}.lora_A.weight"),
                                       (f"{x}.lora.up.weight", f"{x}.lora.down.weight"),
                                       (f"{x}.lora_B", f"{x}.lora_A"),
                                       (f"{x}.lora_linear_layer.up.weight", f"{x}.lora_linear_layer.down.weight"),
                                       (f"{x}.lora_B.default.weight", f"{x}.lora_A.default.weight")):
                if up_name in lora:
                    patches[to if isinstance(to, str) else tuple(to)] = (lora[up_name], lora[down_name], alpha)
                    loaded.update((up_name, down_name))
                    break
        deltas = {k: torch.zeros(shape) for k, shape in self.shapes.items()}
        for to, (up, down, alpha) in patches.items():  # LoRAAdapter.calculate_weight
            key, offset, function = _target(to)
            weight = deltas[key] if offset is None else deltas[key].narrow(*offset)
            scale = alpha / down.shape[0] if alpha is not None else 1.0
            diff = torch.mm(up.flatten(start_dim=1).float(), down.flatten(start_dim=1).float()).reshape(weight.shape)
            change = strength * scale * diff
            weight += function(change) if function else change
        return {k: v for k, v in deltas.items() if v.abs().sum() > 0}, set(lora) - loaded

    def from_diffusers(self, module_deltas: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-module diffusers weight changes placed into ComfyUI's weights (the same slices and swaps)."""
        deltas = {k: torch.zeros(shape) for k, shape in self.shapes.items()}
        for module, delta in module_deltas.items():
            key, offset, function = _target(self.dmap[f"{module}.weight"])
            weight = deltas[key] if offset is None else deltas[key].narrow(*offset)
            weight += function(delta) if function else delta
        return {k: v for k, v in deltas.items() if v.abs().sum() > 0}


# ------------------------------------------------------------------------------------------ fixtures


def diffusers_weight_changes(pipe, adapter: str) -> dict[str, torch.Tensor]:
    """What diffusers applies: peft's get_delta_weight (B @ A * scale, what fuse_lora adds) of every LoRA layer."""
    return {name: m.get_delta_weight(adapter).detach().float() for name, m in pipe.transformer.named_modules()
            if isinstance(m, LoraLayer) and adapter in m.lora_A}


def stock_pipe(family: str):
    pipe = PIPELINES[family].from_pretrained(tiny_model_path(f"tiny:{family}"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class Run:
    def __init__(self, family: str, root: Path) -> None:
        module = family_class(family)(pretrained_model=f"tiny:{family}",
                                      lora=LoraSettings(rank=RANK, alpha=ALPHA, targets=TARGETS[family]))
        module.load_base_model()
        generator = torch.Generator().manual_seed(0)
        for name, param in module.transformer.named_parameters():
            if "lora_B" in name:  # as if trained: B is no longer 0
                param.data = torch.randn(param.shape, generator=generator) * 0.05
        self.family, self.root = family, root
        self.paths = module.save_loras(root)
        self.trained = {phase: diffusers_weight_changes(module.pipe, phase) for phase in ("slow", "fast")}
        self.peft_state = {p: get_peft_model_state_dict(module.transformer, adapter_name=p) for p in ("slow", "fast")}
        self.comfy = ComfyModel(family, stock_pipe(family).transformer)


@pytest.fixture(scope="module", params=list(TARGETS))
def run(request, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return Run(request.param, tmp_path_factory.mktemp(f"export_{request.param}"))


def _close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:6]
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-7, msg=key)


def _ratio(comfy: dict[str, torch.Tensor], diffusers: dict[str, torch.Tensor]) -> float:
    """ComfyUI's weight change over diffusers', as one Frobenius-norm ratio over all weights."""
    norm = lambda d: sum(v.pow(2).sum() for v in d.values()).sqrt().item()  # noqa: E731
    return norm(comfy) / norm(diffusers)


RATIOS: dict[str, dict[str, float]] = {}


def _record(run: Run, what: str, ratio: float) -> None:
    RATIOS.setdefault(run.family, {})[what] = ratio
    print(f"ComfyUI/diffusers weight change, {run.family}, {what}: {ratio:.4f}")


# ------------------------------------------------------------------------------------------ tests


def test_default_file_loads_at_the_trained_strength_in_diffusers_and_comfyui(run: Run):
    for phase in ("slow", "fast"):
        pipe = stock_pipe(run.family)
        pipe.load_lora_weights(str(run.root / phase), adapter_name="ref")  # diffusers' own loader and metadata
        diffusers = diffusers_weight_changes(pipe, "ref")
        _close(diffusers, run.trained[phase])
        comfy, not_loaded = run.comfy.weight_changes(load_file(run.root / phase / "pytorch_lora_weights.safetensors"))
        assert not not_loaded
        _close(comfy, run.comfy.from_diffusers(diffusers))
        _record(run, f"default file ({phase})", _ratio(comfy, run.comfy.from_diffusers(diffusers)))
    assert read_lora(run.root / "slow").glance["scale_folded"] == ALPHA / RANK


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_export_format_gives_comfyui_the_trained_weight_change(run: Run, fmt: str, tmp_path: Path, capsys):
    assert run_export_command(["--lora", str(run.root), "--format", fmt, "--output", str(tmp_path)]) == 0
    for phase in ("slow", "fast"):
        path = tmp_path / f"glance_{phase}_{fmt}.safetensors"
        assert str(path) in capsys.readouterr().out or path.is_file()
        tensors = load_file(path)
        prefix = {"diffusers": "transformer.", "comfyui": "diffusion_model.", "kohya": "lora_unet_"}[fmt]
        assert all(k.startswith(prefix) for k in tensors)
        comfy, not_loaded = run.comfy.weight_changes(tensors)
        assert not not_loaded
        _close(comfy, run.comfy.from_diffusers(run.trained[phase]))
        _record(run, f"{fmt} export ({phase})", _ratio(comfy, run.comfy.from_diffusers(run.trained[phase])))
        assert read_lora(path).glance["family"] == run.family and read_lora(path).glance["layout"] == fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_sample_reads_every_export_back_at_the_trained_strength(run: Run, fmt: str, tmp_path: Path):
    assert run_export_command(["--lora", str(run.root), "--format", fmt, "--output", str(tmp_path)]) == 0
    pipe = stock_pipe(run.family)
    loras = load_glance_loras(pipe, tmp_path / f"glance_slow_{fmt}.safetensors",
                              tmp_path / f"glance_fast_{fmt}.safetensors")
    assert loras.family == run.family
    for phase in ("slow", "fast"):
        _close(diffusers_weight_changes(pipe, phase), run.trained[phase])
    # --lora-scale multiplies the whole weight change
    pipe = stock_pipe(run.family)
    load_glance_loras(pipe, tmp_path / f"glance_slow_{fmt}.safetensors", tmp_path / f"glance_fast_{fmt}.safetensors",
                      lora_scale=0.5)
    _close(diffusers_weight_changes(pipe, "slow"), {k: v * 0.5 for k, v in run.trained["slow"].items()})


def _legacy_file(run: Run, phase: str, folder: Path) -> Path:
    """A file as this project wrote them before the fold: lora_B as trained, alpha only in the adapter metadata."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"transformer.{k}": v.contiguous() for k, v in run.peft_state[phase].items()}
    adapter = {"transformer.r": RANK, "transformer.lora_alpha": ALPHA,
               "transformer.target_modules": TARGETS[run.family], "transformer.init_lora_weights": "gaussian"}
    meta = read_lora(run.root / phase).metadata["glance"]
    path = folder / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(adapter),
                                           "glance": meta})
    return path


def test_files_written_before_the_fold_were_a_quarter_strength_in_comfyui_and_export_repairs_them(run: Run,
                                                                                                  tmp_path: Path):
    legacy = _legacy_file(run, "slow", tmp_path / "legacy")
    pipe = stock_pipe(run.family)
    pipe.load_lora_weights(str(legacy.parent), adapter_name="ref")
    diffusers = diffusers_weight_changes(pipe, "ref")
    _close(diffusers, run.trained["slow"])  # diffusers reads alpha from the metadata: the trained strength
    comfy, _ = run.comfy.weight_changes(load_file(legacy))
    before = _ratio(comfy, run.comfy.from_diffusers(diffusers))
    _record(run, "before (unfolded, alpha in metadata only)", before)
    assert before == pytest.approx(RANK / ALPHA, rel=1e-5)  # 1/4
    repaired = tmp_path / "repaired.safetensors"
    assert run_export_command(["--lora", str(legacy.parent), "--format", "diffusers", "--output", str(repaired)]) == 0
    comfy, _ = run.comfy.weight_changes(load_file(repaired))
    assert _ratio(comfy, run.comfy.from_diffusers(diffusers)) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("family", ["flux", "qwen-image"])
def test_alpha_tensors_on_an_unfolded_diffusers_file_break_diffusers(family: str, run: Run, tmp_path: Path):
    """Why the scale is folded instead of written as .alpha tensors (diffusers 0.42)."""
    if run.family != family:
        pytest.skip("one family per fixture")
    legacy = _legacy_file(run, "slow", tmp_path / "legacy")
    lora = read_lora(legacy)
    tensors = dict(lora.tensors)
    for key in list(tensors):
        if key.endswith(".lora_A.weight"):
            tensors[key.replace(".lora_A.weight", ".alpha")] = torch.tensor(float(ALPHA))
    save_file(tensors, str(legacy), metadata=lora.metadata)
    with pytest.raises(Exception):  # noqa: B017  FLUX: "Both `network_alphas` and `metadata`"; Qwen: no module match
        stock_pipe(family).load_lora_weights(str(legacy.parent), adapter_name="x")


def test_diffusers_own_converters_read_our_comfyui_and_kohya_names(run: Run, tmp_path: Path):
    """Cross-check of the name tables with diffusers' converters where they handle the tiny models: Qwen-Image's
    (any size) and FLUX's kohya converter for the double blocks (its single-block split assumes FLUX.1's widths)."""
    if run.family == "sd3":
        pytest.skip("diffusers 0.42 has no SD3 converter for ComfyUI/kohya names (sample uses lora_io's tables)")
    for fmt in ("comfyui", "kohya"):
        assert run_export_command(["--lora", str(run.root / "slow"), "--format", fmt, "--output",
                                   str(tmp_path / f"{fmt}.safetensors")]) == 0
        tensors = load_file(tmp_path / f"{fmt}.safetensors")
        want = run.trained["slow"]
        if run.family == "flux":
            tensors = {k: v for k, v in tensors.items() if "double_blocks" in k}
            want = {k: v for k, v in want.items() if k.startswith("transformer_blocks.")}
        pipe = stock_pipe(run.family)
        pipe.load_lora_weights(tensors, adapter_name="theirs")
        _close(diffusers_weight_changes(pipe, "theirs"), want)


def test_sample_loads_loras_in_another_trainers_layout(run: Run, tmp_path: Path, capsys):
    """kohya / ComfyUI files without Glance metadata (as other trainers write them): --family, the derived chain,
    the trained strength (the .alpha tensors)."""
    for phase in ("slow", "fast"):
        assert run_export_command(["--lora", str(run.root / phase), "--format", "kohya", "--output",
                                   str(tmp_path / f"{phase}.safetensors")]) == 0
        path = tmp_path / f"{phase}.safetensors"
        save_file(load_file(path), str(path))  # no metadata at all
    argv = ["--model", f"tiny:{run.family}", "--slow", str(tmp_path / "slow.safetensors"), "--fast",
            str(tmp_path / "fast.safetensors"), "--family", run.family, "--prompt", "a red ball", "--height", "32",
            "--width", "32", "--output", str(tmp_path / "out")]
    assert run_sample_command(argv) == 0
    assert "carry no alpha" not in capsys.readouterr().err  # their .alpha tensors give the strength
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_export_never_overwrites_and_needs_a_folder_for_two_loras(run: Run, tmp_path: Path, capsys):
    if run.family != "flux":
        pytest.skip("command behaviour, once")
    copy = tmp_path / "run"
    shutil.copytree(run.root, copy)
    assert run_export_command(["--lora", str(copy), "--format", "comfyui"]) == 0
    written = sorted(p.name for p in copy.rglob("glance_*_comfyui.safetensors"))
    assert written == ["glance_fast_comfyui.safetensors", "glance_slow_comfyui.safetensors"]
    assert run_export_command(["--lora", str(copy), "--format", "comfyui"]) == 2
    assert "never overwritten" in capsys.readouterr().err
    one_file = str(tmp_path / "x.safetensors")
    assert run_export_command(["--lora", str(copy), "--format", "kohya", "--output", one_file]) == 2
    assert "give a folder" in capsys.readouterr().err
    assert run_export_command(["--lora", str(tmp_path / "nothing"), "--format", "kohya"]) == 2


def test_layouts_lora_io_does_not_know_go_through_diffusers_converters(run: Run, tmp_path: Path):
    """An XLabs FLUX file (``double_blocks.N.processor.qkv_lora1.down.weight``, ...): diffusers' converter reads it."""
    if run.family != "flux":
        pytest.skip("an XLabs layout exists for FLUX only")
    from glance_lightning.schedules import derive_timesteps
    from glance_lightning.timesteps import GlanceTimesteps

    assert run_export_command(["--lora", str(run.root / "slow"), "--format", "comfyui", "--output",
                               str(tmp_path / "comfy.safetensors")]) == 0
    native = load_file(tmp_path / "comfy.safetensors")
    xlabs = {}
    for comfy, theirs in (("img_attn.qkv", "qkv_lora1"), ("img_attn.proj", "proj_lora1")):
        for ours, kind in (("lora_down", "down"), ("lora_up", "up")):
            xlabs[f"double_blocks.0.processor.{theirs}.{kind}.weight"] = native[f"diffusion_model.double_blocks.0."
                                                                              f"{comfy}.{ours}.weight"]
    save_file(xlabs, str(tmp_path / "xlabs.safetensors"))
    lists = derive_timesteps("flux")
    pipe = stock_pipe("flux")
    loras = load_glance_loras(pipe, tmp_path / "xlabs.safetensors", tmp_path / "xlabs.safetensors", family="flux",
                              timesteps=GlanceTimesteps.from_lists(lists["slow"], lists["fast"], "timesteps"))
    assert loras.read["slow"].layout == "diffusers converter"
    want = {f"transformer_blocks.0.attn.{m}": run.trained["slow"][f"transformer_blocks.0.attn.{m}"]
            for m in ("to_q", "to_k", "to_v", "to_out.0")}
    _close(diffusers_weight_changes(pipe, "slow"), want)
