"""The family contract: what every built-in family of the registry must do, checked once, parametrised over it.

`CONTRACT` holds only per-family data (its quick start, the stock pipeline's call and conventions, what the
metadata must say, how much the quick start must learn); a test keeps it equal to the registry's built-in
families, so a new family cannot skip the contract. Every family's quick start runs ONCE per session through
the real CLI (`quickstart_run` in conftest.py) and every test here reads that run:

(a) the quick start trains both LoRAs, writes their metadata and the chained sample;
(b) its checkpoint and LoRA files hold only the trained adapters;
(c) the transformer gets the stock pipeline's inputs (timestep convention included) and gives its velocity;
(d) the saved LoRAs load into the stock diffusers pipeline, which then applies exactly the trained weight change
    (alpha/rank included), so each changes its output, and on the exact chain steps through the trained timesteps;
(e) one training step moves only the active adapter's LoRA weights;
(f) training lowered the flow-matching loss at the trained timesteps and pulled the chained sample towards the
    training image: the quick start's LoRAs against the same untrained module.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from glance_lightning.datamodules.glance import load_pixels
from jsonargparse import ArgumentParser
from lightning import LightningDataModule
from PIL import Image
from safetensors import safe_open

from glance_lightning.compat import allow_qwen2vl_processor_without_torchvision
from glance_lightning.evaluation import chain_fidelity, phase_losses
from glance_lightning.families.base import GlanceModule
from glance_lightning.inference import chained_call, load_glance_loras, use_exact_chain
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.registry import family_names, get_family
from glance_lightning.tiny import tiny_model_path

REPO = Path(__file__).resolve().parents[1]
CONTROL = "glance_lightning/assets/samples/edit/control/ball.png"
RED_BALL = "glance_lightning/assets/samples/t2i/red_ball.png"
# Each family's own 50-step schedule at 1024x1024, indices 0,2,4,6,8 and 10,20,30,40,49 (the configs' lists)
FLUX2 = ([1000.0, 994.5214, 988.634, 982.2905, 975.4355], [968.0046, 918.9985, 834.5034, 654.0879, 133.7189])
FLUX = ([1000.0, 986.9786, 973.2042, 958.6094, 943.1188], [926.6473, 825.7017, 677.9868, 441.1997, 60.5503])
SD3 = ([1000.0, 986.0571, 971.3141, 955.7004, 939.1364], [921.5326, 813.8521, 656.9132, 406.8929, 8.9286])
QWEN = ([1000.0, 979.1915, 957.5157, 934.9171, 911.3354], [886.7053, 745.0728, 562.9505, 320.0802, 20.0])


@dataclass(frozen=True)
class Family:
    config: str  # its quick-start config
    lists: tuple[list[float], list[float]]  # the Slow/Fast timesteps the metadata must carry
    # the options the metadata records for sampling to repeat, with the family's defaults (a run records its
    # config's value where the config sets one)
    family_options: dict[str, Any]
    prompt: str = "a red ball"  # of the stock pipeline calls
    stock_kwargs: dict[str, Any] = field(default_factory=dict)  # the stock call's family-specific arguments
    module_options: dict[str, Any] = field(default_factory=dict)  # the module settings those arguments imply
    controls: tuple[str, ...] = ()  # control images of the stock calls (and of the module's conditioning)
    timestep_scale: float = 1.0  # the stock pipeline calls its transformer with timestep sigma * this
    stock_inputs: dict[str, Any] = field(default_factory=dict)  # expected stock transformer inputs
    step_inputs: dict[str, Any] = field(default_factory=dict)  # expected transformer inputs of a training sample
    # how to train where the family has no quick start of its own: changes to `config`, and images added to
    # its dataset as control_2/ (control_3/) of every sample
    changes: dict[str, Any] = field(default_factory=dict)
    extra_controls: tuple[str, ...] = ()
    # learning, after / before the quick start: loss at most loss_ratio, the chain's latent distance to the
    # training latents at most latent_ratio, the decoded chain's PSNR against the training image psnr_gain dB up
    loss_ratio: float = 0.6
    latent_ratio: float = 0.3
    psnr_gain: float = 4.0


# What the quick starts learn (seed 0, measured on their runs): loss after/before per phase, latent distance
# after/before, PSNR before -> after (the tiny VAE's own reconstruction of the image is about 22 dB):
#   flux                  slow 0.07  fast 0.22   latents 0.07   PSNR 9.4 -> 18.7 dB
#   sd3                   slow 0.22  fast 0.32   latents 0.31   PSNR 8.7 -> 12.8 dB
#   qwen-image            slow 0.04  fast 0.22   latents 0.06   PSNR 9.1 -> 18.7 dB
#   qwen-image-2          slow 0.13  fast 0.29   latents 0.16   PSNR 9.6 -> 14.7 dB (its 16x tiny VAE is cruder)
#   qwen-image-edit       slow 0.05  fast 0.21   latents 0.06   PSNR 9.1 -> 18.9 dB
#   qwen-image-edit-plus  slow 0.04  fast 0.21   latents 0.07   PSNR 9.1 -> 18.9 dB


QWEN_T2I_SHAPES = [[(1, 4, 4)]]  # the 64x64 target: 4x4 tokens after the 8x VAE and 2x2 packing
CONTRACT: dict[str, Family] = {
    "flux": Family(
        config="configs/quickstart.yaml", lists=FLUX, family_options={"guidance": 1.0, "max_sequence_length": 512},
        stock_kwargs={"guidance_scale": 1.0, "max_sequence_length": 32}, module_options={"max_sequence_length": 32},
    ),
    "flux-kontext": Family(
        config="configs/quickstart-flux-kontext.yaml", lists=FLUX,
        family_options={"guidance": 1.0, "max_sequence_length": 512, "auto_resize": True},
        prompt="Make the ball red", controls=(CONTROL,),
        # the stock call at the quick start's sizes: output area 64x64 (max_area), the control kept at its 128x128
        # (16 target tokens, then 64 control tokens with position ids' first axis 1)
        stock_kwargs={"guidance_scale": 1.0, "max_sequence_length": 32, "max_area": 64 * 64, "_auto_resize": False},
        module_options={"max_sequence_length": 32, "auto_resize": False},
    ),
    "flux2": Family(
        config="configs/quickstart-flux2.yaml", lists=FLUX2,
        family_options={"max_sequence_length": 512, "guidance": 1.0},
        stock_kwargs={"guidance_scale": 1.0, "max_sequence_length": 64}, module_options={"max_sequence_length": 64},
    ),
    "flux2-klein": Family(
        config="configs/quickstart-flux2-klein.yaml", lists=FLUX2, family_options={"max_sequence_length": 512},
        stock_kwargs={"guidance_scale": 1.0, "max_sequence_length": 32}, module_options={"max_sequence_length": 32},
    ),
    "sd3": Family(
        config="configs/quickstart-sd3.yaml", lists=SD3, family_options={"max_sequence_length": 256},
        stock_kwargs={"guidance_scale": 1.0, "max_sequence_length": 32}, module_options={"max_sequence_length": 32},
        timestep_scale=1000.0,  # SD3 takes the 0-1000 timestep, the others t / 1000 = sigma
        # the tiny SD3 transformer learns the sample more slowly than the FLUX and Qwen ones (see above)
        latent_ratio=0.45, psnr_gain=2.0,
    ),
    "qwen-image": Family(
        config="configs/quickstart-qwen-image.yaml", lists=QWEN, family_options={"max_sequence_length": 512},
        stock_kwargs={"true_cfg_scale": 1.0}, stock_inputs={"img_shapes": QWEN_T2I_SHAPES},
        step_inputs={"img_shapes": QWEN_T2I_SHAPES},
    ),
    "qwen-image-2": Family(
        config="configs/quickstart-qwen-image-2.yaml", lists=QWEN, family_options={},
        # without the prompt's key/value cache, every call is the whole joint sequence as in training
        stock_kwargs={"true_cfg_scale": 1.0, "use_kv_cache": False}, stock_inputs={"img_shapes": [[(1, 4, 4)]]},
        step_inputs={"img_shapes": [[(1, 4, 4)]]},
    ),
    "qwen-image-edit": Family(
        config="configs/quickstart-qwen-image-edit.yaml", lists=QWEN,
        family_options={"max_sequence_length": 512, "control_resolution": 1024, "condition_resolution": None},
        prompt="Make the ball red", stock_kwargs={"true_cfg_scale": 1.0}, controls=(CONTROL,),
        # the stock pipeline resizes the control to 1024x1024 (64x64 tokens) and packs it after the target;
        # the quick start keeps it at 64x64
        stock_inputs={"img_shapes": [[(1, 4, 4), (1, 64, 64)]]}, step_inputs={"img_shapes": [[(1, 4, 4)] * 2]},
    ),
    "qwen-image-edit-plus": Family(  # no quick start of its own: the edit one with two controls per sample
        config="configs/quickstart-qwen-image-edit.yaml", lists=QWEN,
        changes={"model": {"class_path": "glance_lightning.families.qwen_image_edit.QwenImageEditPlusGlance",
                           "init_args": {"pretrained_model": "tiny:qwen-image-edit-plus",
                                         "condition_resolution": 64}}},
        extra_controls=(RED_BALL,),
        family_options={"max_sequence_length": 512, "control_resolution": 1024, "condition_resolution": 384},
        prompt="Make the ball red", stock_kwargs={"true_cfg_scale": 1.0}, controls=(CONTROL, RED_BALL),
        stock_inputs={"img_shapes": [[(1, 4, 4), (1, 64, 64), (1, 64, 64)]]},
        step_inputs={"img_shapes": [[(1, 4, 4)] * 3]},
    ),
}
FAMILIES = list(CONTRACT)
BUILTIN_MODULES = "glance_lightning.families."


def test_the_contract_covers_exactly_the_builtin_families():
    """Built-in: declared by glance_lightning itself (not by a test or an installed package)."""
    builtin = [n for n in family_names() if module_of(get_family(n).module).startswith(BUILTIN_MODULES)]
    assert builtin == FAMILIES, "every built-in family needs a CONTRACT entry (and only those)"
    for name in FAMILIES:
        spec = get_family(name)
        assert spec.tiny_builder, f"{name}: the contract trains on tiny:{name}"
        assert spec.control_images[0] <= len(CONTRACT[name].controls) <= spec.control_images[1]


# ------------------------------------------------------------------------------------------ helpers


def module_of(ref: Any) -> str:
    """The module a registry entry's ``module`` names ("package.module:Class" or a class), without importing."""
    return ref.partition(":")[0] if isinstance(ref, str) else ref.__module__


def deep_merge(base: dict, changes: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in changes.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and key in merged else value
    return merged


@dataclass
class Quickstart:
    family: str
    config: dict[str, Any]  # as the CLI read it, data path absolute
    config_path: str

    @property
    def model_args(self) -> dict[str, Any]:
        return self.config["model"]["init_args"]

    def objects(self, model: dict[str, Any] | None = None, data: dict[str, Any] | None = None):
        """A fresh (unloaded) module and data module with the quick start's settings, changed by model/data."""
        config = deep_merge(self.config, {"model": {"init_args": model or {}}, "data": {"init_args": data or {}}})
        parser = ArgumentParser()
        parser.add_subclass_arguments(GlanceModule, "model")
        parser.add_subclass_arguments(LightningDataModule, "data")
        objects = parser.instantiate_classes(parser.parse_object({"model": config["model"], "data": config["data"]}))
        return objects.model, objects.data

    def callback_args(self) -> dict[str, Any]:
        (callback,) = [c for c in self.config["trainer"]["callbacks"] if c["class_path"].endswith("SampleCallback")]
        return callback.get("init_args", {})


@pytest.fixture(scope="session")
def quickstarts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Quickstart]:
    """Each family's quick-start settings; a family without a quick start gets its config written here."""
    result = {}
    for name, entry in CONTRACT.items():
        config = yaml.safe_load((REPO / entry.config).read_text())
        data = config["data"]["init_args"]
        data["path"] = str(REPO / data["path"])
        path = entry.config
        if entry.changes or entry.extra_controls:
            config = deep_merge(config, entry.changes)
            folder = tmp_path_factory.mktemp(f"{name}_quickstart")
            if entry.extra_controls:
                dataset = folder / "data"
                shutil.copytree(data["path"], dataset)
                for index, image in enumerate(entry.extra_controls, start=2):
                    for target in sorted((dataset / "image").glob("*.png")):
                        (dataset / f"control_{index}").mkdir(exist_ok=True)
                        shutil.copy(REPO / image, dataset / f"control_{index}" / target.name)
                config["data"]["init_args"]["path"] = str(dataset)
            path = str(folder / "quickstart.yaml")
            Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
        result[name] = Quickstart(name, config, path)
    return result


@pytest.fixture(scope="session")
def quickstart(quickstarts: dict[str, Quickstart], quickstart_run):
    """family -> (its quick-start settings, its run directory), the run made once per session."""

    def get(family: str) -> tuple[Quickstart, Path]:
        settings = quickstarts[family]
        return settings, quickstart_run(settings.config_path)

    return get


_UNTOUCHED_PIPELINES: dict[str, Any] = {}  # stock pipelines a test used without loading LoRAs into them


def stock_pipeline(family: str, *, reuse: bool = False) -> Any:
    """The family's stock pipeline on tiny:<family>. ``reuse``: the caller loads no LoRAs and leaves no hooks
    (it may put the pipeline on the exact chain), so the next test may have it; otherwise the caller may change
    it and gets it for good.
    The edit pipelines VAE-encode their controls at 1024x1024 on every call: the same latents (the mode of the
    distribution) each time, so each control is encoded once per pipeline to keep the suite fast."""
    pipe = _UNTOUCHED_PIPELINES.pop(family, None)
    if pipe is None:
        allow_qwen2vl_processor_without_torchvision()  # the edit pipelines' processor loads without torchvision
        pipe = get_family(family).pipeline_class().from_pretrained(tiny_model_path(f"tiny:{family}"))
        pipe.set_progress_bar_config(disable=True)
        if hasattr(pipe, "_encode_vae_image"):
            pipe._encode_vae_image = memoised_by_image(pipe._encode_vae_image)
    if reuse:
        _UNTOUCHED_PIPELINES[family] = pipe
    return pipe


def memoised_by_image(encode: Any) -> Any:
    """A pipeline's ``_encode_vae_image`` that encodes each image once (the edit pipelines take the mode)."""
    cache: dict[bytes, torch.Tensor] = {}

    def encode_once(image: torch.Tensor, generator: Any = None) -> torch.Tensor:
        key = image.detach().cpu().numpy().tobytes() + str(tuple(image.shape)).encode()
        if key not in cache:
            cache[key] = encode(image, generator)
        return cache[key]

    return encode_once


def stock_call_kwargs(entry: Family, **kwargs: Any) -> dict[str, Any]:
    """The stock pipeline's arguments: 64x64, seed 0, the family's own arguments and control images."""
    call = dict(prompt=entry.prompt, height=64, width=64, generator=torch.Generator().manual_seed(0), **kwargs,
                **entry.stock_kwargs)
    if entry.controls:
        images = [Image.open(REPO / c).convert("RGB") for c in entry.controls]
        call["image"] = images[0] if len(images) == 1 else images
    return call


def control_pixels(path: str) -> torch.Tensor:
    """A control image as the DataModule gives it (at its own size: its exact pixels)."""
    return load_pixels(REPO / path, Image.open(REPO / path).size)


def latents_of(pipe: Any, hidden: torch.Tensor) -> torch.Tensor:
    """A 64x64 image's transformer tokens (or SD3's unpacked latents) -> latents [B, C, 8, 8] (FLUX.2's patchified
    [B, 4C, 4, 4], Qwen-Image 2.x's [B, C, 4, 4]), as the module takes them; control tokens, which follow the
    target's, and Qwen-Image 2.x's text tokens, which precede them in its output, are dropped."""
    if hidden.dim() == 4:
        return hidden
    if type(pipe).__name__ == "QwenImage21Pipeline":  # one token per latent position, the target's last
        return hidden[:, -16:].transpose(1, 2).reshape(hidden.shape[0], -1, 4, 4)
    target = hidden[:, :16]
    if hasattr(pipe, "_unpack_latents_with_ids"):  # FLUX.2: one token per patchified latent position
        return target.transpose(1, 2).reshape(hidden.shape[0], -1, 4, 4)
    return pipe._unpack_latents(target, 64, 64, pipe.vae_scale_factor).reshape(hidden.shape[0], -1, 8, 8)


def last_checkpoint(run: Path) -> str:
    """The checkpoint at the end of the quick start: last.ckpt where it keeps several, else its only one."""
    names = sorted(p.name for p in (run / "checkpoints").glob("*.ckpt"))
    if "last.ckpt" in names:
        return "last.ckpt"
    (name,) = names
    return name


def flat_product(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """B @ A of a linear LoRA, or of a conv LoRA with its kernels flattened: the weight change, unscaled."""
    return b.flatten(1).float() @ a.flatten(1).float()


def lora_deltas(tensors: dict[str, torch.Tensor], scale: float, adapter: str | None = None) -> dict[str, torch.Tensor]:
    """module -> scale * B @ A of a LoRA state dict: a file's (``transformer.<module>.lora_A.weight``) or, with
    ``adapter``, one adapter of a checkpoint's (``transformer.<module>.lora_A.<adapter>.weight``)."""
    infix = f".{adapter}" if adapter else ""
    modules = [k.removesuffix(f".lora_A{infix}.weight") for k in tensors if k.endswith(f".lora_A{infix}.weight")]
    return {m: scale * flat_product(tensors[f"{m}.lora_B{infix}.weight"], tensors[f"{m}.lora_A{infix}.weight"])
            for m in modules}


def pipeline_parameters(pipe: Any) -> dict[str, torch.nn.Parameter]:
    """Every parameter of the pipeline's models (transformer, text encoders, VAE), by component."""
    return {f"{name}.{n}": p for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module) for n, p in component.named_parameters()}


def one_step_trainer(root: Path) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root)


# ------------------------------------------------------------------------------------------ (a) quick start


@pytest.mark.parametrize("family", FAMILIES)
def test_quickstart_trains_both_loras_and_renders_the_chained_sample(family: str, quickstart):
    settings, run = quickstart(family)
    entry, args = CONTRACT[family], settings.model_args
    slow, fast = entry.lists
    total = args["slow_steps"] + args["fast_steps"]
    for phase, lists in (("slow", slow), ("fast", fast)):
        assert (run / phase / "pytorch_lora_weights.safetensors").is_file()
        meta = read_glance_metadata(run / phase)
        assert meta["family"] == family and meta["phase"] == phase
        assert meta["base_model"] == args["pretrained_model"]
        assert (meta["rank"], meta["alpha"]) == (args["lora"]["rank"], args["lora"]["alpha"]) == (8, 32)
        assert meta["resolution"] == settings.config["data"]["init_args"]["resolution"] == 64
        assert meta["trained_steps"] == args[f"{phase}_steps"] == 150
        assert meta["timesteps"] == pytest.approx(lists)
        assert meta["schedule"]["slow"] == pytest.approx(slow) and meta["schedule"]["fast"] == pytest.approx(fast)
        # what sampling must repeat: the quick start's values
        assert meta["family_options"] == {k: args.get(k, default) for k, default in entry.family_options.items()}
    every = settings.callback_args()["every_n_steps"]
    samples = sorted((run / "samples").glob("*.png"))
    assert [p.name for p in samples] == [f"step{s:06d}_p0_s0.png" for s in range(every, total + 1, every)]
    caption = next(Path(settings.config["data"]["init_args"]["path"]).rglob("*.txt")).read_text().strip()
    with Image.open(samples[-1]) as image:
        info = json.loads(image.text["glance"])
        assert image.size == (64, 64)
    callback = settings.callback_args()
    assert info == {"prompt": caption, "seed": 0, "step": total, "family": family,
                    "schedule": {"slow": pytest.approx(slow), "fast": pytest.approx(fast)},
                    "guidance_scale": callback.get("guidance_scale", 1.0),
                    "negative_prompt": callback.get("negative_prompt")}
    assert (run / "config.yaml").is_file()


# ------------------------------------------------------------------------------------------ (b) files


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_and_lora_files_hold_only_the_trained_adapters(family: str, quickstart):
    settings, run = quickstart(family)
    state = torch.load(run / "checkpoints" / last_checkpoint(run), map_location="cpu", weights_only=True)
    weights = state["state_dict"]
    assert weights and all("lora_" in k for k in weights)
    assert any(".slow." in k for k in weights) and any(".fast." in k for k in weights)
    assert state["optimizer_states"] and state["global_step"] == 300
    module, _ = settings.objects()
    module.load_base_model()
    result = module.load_state_dict(weights, strict=False)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]

    for phase in ("slow", "fast"):
        with safe_open(str(run / phase / "pytorch_lora_weights.safetensors"), "pt") as f:
            saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            adapter_meta = json.loads(f.metadata()["lora_adapter_metadata"])
        assert saved and all(k.startswith("transformer.") for k in saved)
        b_norm = sum(v.norm().item() for k, v in saved.items() if "lora_B" in k)
        assert b_norm > 0, f"{phase} LoRA B matrices are still zero: it was never trained"
        meta = read_glance_metadata(run / phase)
        assert adapter_meta["transformer.r"] == meta["rank"] == 8 and meta["alpha"] == 32  # as trained
        # whatever the file's own alpha (alpha/rank may be folded into lora_B), a loader that applies its
        # lora_alpha / r gets exactly the weight change of the last checkpoint's adapter, trained at alpha/rank
        in_file = lora_deltas(saved, adapter_meta["transformer.lora_alpha"] / adapter_meta["transformer.r"])
        trained = lora_deltas(weights, meta["alpha"] / meta["rank"], phase)
        assert in_file.keys() == trained.keys()
        for name, delta in trained.items():
            torch.testing.assert_close(in_file[name], delta, rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------ (c) equivalence


@pytest.mark.parametrize("family", FAMILIES)
def test_transformer_gets_the_stock_pipelines_inputs_and_gives_its_velocity(family: str):
    """Same latents, prompt, control images and sigma: the module calls the transformer with exactly the stock
    pipeline's inputs (its timestep convention, prompt embeddings, packed control tokens, img_shapes...) and
    so gets its velocity, at both steps of a two-step stock call."""
    entry, spec = CONTRACT[family], get_family(family)
    sigmas = (0.7, 0.3)
    pipe = use_exact_chain(stock_pipeline(family, reuse=True))  # steps through exactly the sigmas given
    stock: list[dict[str, Any]] = []
    hook = pipe.transformer.register_forward_hook(
        lambda m, a, kw, out: stock.append({**kw, "out": out[0].clone()}), with_kwargs=True)
    try:
        pipe(**stock_call_kwargs(entry, sigmas=list(sigmas), num_inference_steps=2, output_type="latent"))
    finally:
        hook.remove()
    assert len(stock) == 2
    for call, sigma in zip(stock, sigmas, strict=True):
        assert call["timestep"].tolist() == pytest.approx([sigma * entry.timestep_scale], abs=1e-4)
    for key, expected in entry.stock_inputs.items():
        assert stock[0][key] == expected, key

    module = spec.module_class()(pretrained_model=f"tiny:{family}", timesteps={"slow": [1.0], "fast": [0.5]},
                                 **entry.module_options)
    assert module.timestep_scale == entry.timestep_scale  # the docs/families.md table's timestep column
    module.load_base_model()
    module.transformer.eval()
    cond = module.conditioning_for(entry.prompt, tuple(control_pixels(c) for c in entry.controls))
    ours: list[dict[str, Any]] = []
    module.transformer.register_forward_pre_hook(lambda m, a, kw: ours.append(kw), with_kwargs=True)
    for call, sigma in zip(stock, sigmas, strict=True):
        with torch.no_grad():
            velocity = module.predict_velocity(latents_of(pipe, call["hidden_states"]), torch.tensor([sigma]), cond)
        given = ours[-1]
        assert set(given) <= set(call), sorted(set(given) - set(call))
        for key, value in call.items():
            if key in ("out", "return_dict") or isinstance(value, dict):
                continue  # the output, and attention kwargs the stock call passes empty
            if torch.is_tensor(value):
                assert torch.is_tensor(given.get(key)), key
                assert given[key].dtype == value.dtype, key
                torch.testing.assert_close(given[key], value, rtol=1e-4, atol=1e-5, msg=key)
            else:
                assert given.get(key) == value, key
        torch.testing.assert_close(velocity, latents_of(pipe, call["out"]), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ (d) stock pipeline


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_loras_load_into_the_stock_pipeline_and_change_its_output(family: str, quickstart):
    """`load_glance_loras` (the stock `load_lora_weights` of both files, and the pipeline put on the exact chain):
    every adapted layer then applies exactly the trained weight change, each adapter changes the output, and one
    `chained_call` steps through the trained timesteps, Slow then Fast."""
    _, run = quickstart(family)
    entry = CONTRACT[family]
    pipe = use_exact_chain(stock_pipeline(family))  # for the base image: the same scheduler as with the LoRAs

    def generate() -> torch.Tensor:
        return pipe(**stock_call_kwargs(entry, num_inference_steps=2, output_type="pt")).images[:, :3]  # RGB of RGBA

    base = generate()
    loras = load_glance_loras(pipe, run / "slow", run / "fast")
    assert loras.family == family and loras.adapters == ("slow", "fast")
    # every adapted layer applies exactly the trained weight change, alpha/rank included (the LoRAs were trained
    # at alpha 32, rank 8: a loader that guessed alpha from the shapes, without folding, would apply 1/4 of it)
    weights = torch.load(run / "checkpoints" / last_checkpoint(run), map_location="cpu", weights_only=True)
    meta = read_glance_metadata(run / "slow")
    for phase in ("slow", "fast"):
        trained = lora_deltas(weights["state_dict"], meta["alpha"] / meta["rank"], phase)
        loaded = {f"transformer.{name}": layer.scaling[phase] * flat_product(layer.lora_B[phase].weight,
                                                                           layer.lora_A[phase].weight)
                  for name, layer in pipe.transformer.named_modules() if phase in getattr(layer, "lora_A", {})}
        assert loaded.keys() == trained.keys()
        for name, delta in trained.items():
            torch.testing.assert_close(loaded[name], delta, rtol=1e-5, atol=1e-7, msg=name)
    pipe.set_adapters("slow")
    with_slow = generate()
    pipe.set_adapters("fast")
    with_fast = generate()
    assert base.shape == (1, 3, 64, 64)
    assert (with_slow - base).abs().max() > 1e-4
    assert (with_fast - with_slow).abs().max() > 1e-4

    seen: list[tuple[float, list[str]]] = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((float(kwargs["timestep"][0]), list(pipe.get_active_adapters()))),
        with_kwargs=True,
    )
    chained_call(pipe, loras, **stock_call_kwargs(entry, output_type="latent"))
    sigmas = [t / 1000 for t in entry.lists[0] + entry.lists[1]]
    assert [t for t, _ in seen] == pytest.approx([s * entry.timestep_scale for s in sigmas], rel=1e-5, abs=1e-5)
    assert pipe.scheduler.sigmas.tolist() == pytest.approx(sigmas + [0.0], abs=1e-6)
    assert [a for _, a in seen] == [["slow"]] * 5 + [["fast"]] * 5


# ------------------------------------------------------------------------------------------ (e) training step


@pytest.mark.parametrize("family", FAMILIES)
def test_one_training_step_moves_only_the_active_adapters_lora_weights(family: str, quickstarts, tmp_path: Path):
    """A one-phase config (fast_steps 0) on the family's default LoRA targets: after its one step only Slow
    LoRA weights moved; the Fast adapter, the frozen transformer, text encoders and VAE did not."""
    module, data = quickstarts[family].objects(
        model={"slow_steps": 1, "fast_steps": 0, "lora": {"rank": 4, "alpha": 16, "targets": None},
               "optimizer": {"lr": 0.05, "warmup_steps": 1}, "output_dir": str(tmp_path / "out")},
        data={"batch_size": 1},
    )
    module.load_base_model()
    before = {k: p.detach().clone() for k, p in pipeline_parameters(module.pipe).items()}
    inputs: list[dict[str, Any]] = []
    module.transformer.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw), with_kwargs=True)
    trainer = one_step_trainer(tmp_path)
    trainer.fit(module, data)
    assert trainer.global_step == 1
    after = pipeline_parameters(module.pipe)  # the text encoders may have been freed once the data was encoded
    assert after.keys() <= before.keys()
    assert {k for k in after if k.startswith("transformer.")} == {k for k in before if k.startswith("transformer.")}
    changed = {k for k in after if not torch.equal(before[k], after[k].detach())}
    assert changed and all("lora_" in k and ".slow." in k for k in changed), sorted(changed)
    assert any("lora_B.slow" in k for k in changed)
    frozen = [k for k in after if "lora_" not in k]
    assert frozen and any(k.startswith("vae.") for k in frozen)
    fast_b = [p for k, p in after.items() if "lora_B.fast" in k]
    assert fast_b and all(p.abs().sum() == 0 for p in fast_b)  # still its zero init
    # the adapters sit on the family's default targets, each of them
    targets = module.default_lora_targets
    adapted = {k.split(".lora_A")[0] for k in after if "lora_A.slow" in k}
    assert adapted and all(any(layer.endswith("." + t) for t in targets) for layer in adapted)
    assert {t for t in targets if any(layer.endswith("." + t) for layer in adapted)} == set(targets)
    for key, expected in CONTRACT[family].step_inputs.items():
        assert inputs[0][key] == expected, key
    meta = read_glance_metadata(tmp_path / "out" / "slow")
    assert meta["family"] == family and meta["trained_steps"] == 1


# ------------------------------------------------------------------------------------------ (f) learning


@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_and_pulls_the_chain_to_the_sample(family: str, quickstart):
    """The quick start's own LoRAs, loaded as a user loads them, against the same module untrained (zero
    LoRA B: the base model): lower flow-matching loss at each adapter's timesteps, and the exact Slow->Fast
    chain from pure noise nearer the training latents and, decoded by the tiny VAE (a trained autoencoder),
    nearer the training image."""
    settings, run = quickstart(family)
    entry = CONTRACT[family]
    before, data = settings.objects()
    data.setup()
    sample = data.train_samples[0]
    before.load_base_model()
    before.build_cache(data.train_samples)
    after, _ = settings.objects()
    after.load_base_model(with_adapters=False)
    load_glance_loras(after.pipe, run / "slow", run / "fast")
    after.build_cache(data.train_samples)
    before_loss, before_chain = phase_losses(before), chain_fidelity(before, sample)
    after_loss, after_chain = phase_losses(after), chain_fidelity(after, sample)

    for phase in ("slow", "fast"):
        assert after_loss[phase] < entry.loss_ratio * before_loss[phase], (phase, before_loss, after_loss)
    assert after_chain["latent_mse"] < entry.latent_ratio * before_chain["latent_mse"], (before_chain, after_chain)
    assert after_chain["psnr"] > before_chain["psnr"] + entry.psnr_gain, (before_chain, after_chain)
    assert math.isfinite(after_chain["psnr"])
