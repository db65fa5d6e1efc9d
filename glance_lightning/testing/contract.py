"""The family contract as a reusable pytest class: what every family must do, built-in or from a package.

Subclass ``FamilyContract`` in a test module (name the subclass ``Test...``), set ``family`` and ``config`` (a
quick-start fit config that trains both LoRAs on ``tiny:<family>`` on the CPU), and pytest runs every check
below on that family; ``docs/new-family.md`` shows a whole family package with its contract test. The quick start
runs once per process (``fit_once``) and the checks read that run:

- the spec says what every command needs (hooks overridden, guidance kind, control images, tiny builder);
- ``validate-data --config`` accepts the quick start's dataset;
- ``fit`` trains both LoRAs (trained, with Glance metadata) and renders the chained sample;
- one training step moves only the active adapter's LoRA weights;
- training lowers the flow-matching loss at each adapter's timesteps;
- the LoRA files load into the stock diffusers pipeline at their trained strength and change its output;
- ``sample`` chains them with the family's guidance option, and refuses the other one;
- ``export --format comfyui`` reads back to the same weight change (or is refused where the family has no layout);
- ``plan`` predicts the training step of the quick start's model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from glance_lightning.testing.runs import (
    config_objects,
    fit_once,
    lora_deltas,
    pipeline_parameters,
    read_config,
    run_command,
)

REQUIRED_HOOKS = ("encode_prompts", "encode_images", "decode_latents", "predict_velocity")
GUIDANCE_FLAGS = {"embedded": ["--guidance", "2.0"], "cfg": ["--guidance-scale", "2.0"], "none": []}
LORA_FILE = "pytorch_lora_weights.safetensors"


class FamilyContract:
    """The contract checks, for the family named by ``family`` trained by the quick-start ``config``."""

    family: ClassVar[str]
    config: ClassVar[str]  # a fit config training both LoRAs on tiny:<family> (relative to ``workdir``)
    workdir: ClassVar[str | None] = None  # where fit runs (its data paths are relative to it); None: the cwd
    prompt: ClassVar[str] = "a red ball"  # for the sample command and the stock pipeline calls
    controls: ClassVar[tuple[str, ...]] = ()  # control image files (relative to ``workdir``), for edit families
    stock_kwargs: ClassVar[dict[str, Any]] = {}  # the stock pipeline call's family-specific arguments
    loss_ratio: ClassVar[float] = 0.9  # trained loss at most this times the untrained one, per phase

    # -------------------------------------------------------------------------------------------- fixtures
    @pytest.fixture(scope="class")
    @classmethod
    def run(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        """The quick start's run folder (made once per process; read it, never write into it)."""
        return fit_once(cls.config, tmp_path_factory.mktemp(f"contract-{cls.family}"), workdir=cls.workdir)

    @pytest.fixture(scope="class")
    @classmethod
    def settings(cls) -> dict[str, Any]:
        """The quick-start config, its data path absolute."""
        return read_config(cls.config, cls.workdir)

    def spec(self) -> Any:
        from glance_lightning.registry import get_family

        return get_family(self.family)

    def path(self, name: str) -> Path:
        return Path(self.workdir or ".").resolve() / name

    def metadata(self, run: Path, phase: str) -> dict[str, Any]:
        from glance_lightning.lora_io import read_glance_metadata

        return read_glance_metadata(run / phase)

    def trained_deltas(self, run: Path, phase: str) -> dict[str, torch.Tensor]:
        """The weight change of each module of a saved LoRA at its trained strength (alpha / rank is folded into
        the file's B matrices where its metadata says ``scale_folded``)."""
        meta = self.metadata(run, phase)
        scale = 1.0 if meta.get("scale_folded") else meta["alpha"] / meta["rank"]
        return lora_deltas(load_file(run / phase / LORA_FILE), scale)

    # -------------------------------------------------------------------------------------------- the spec
    def test_spec_declares_what_the_commands_need(self) -> None:
        from glance_lightning.families.base import GlanceModule
        from glance_lightning.families.hooks import FamilyHooks
        from glance_lightning.family_spec import GUIDANCE_KINDS

        spec = self.spec()
        cls = spec.module_class()
        assert issubclass(cls, GlanceModule) and cls.family == self.family
        missing = [h for h in REQUIRED_HOOKS if getattr(cls, h) is getattr(FamilyHooks, h)]
        assert not missing, f"{cls.__name__} must implement {missing}"
        assert spec.guidance_kind in GUIDANCE_KINDS
        assert spec.tiny_builder, f"{self.family}: the contract trains on tiny:{self.family} (give a tiny_builder)"
        low, high = spec.control_images
        assert low <= len(self.controls) <= high, "set `controls` to as many control images as the family takes"

    def test_validate_data_accepts_the_quickstart_dataset(self) -> None:
        code, out, err = run_command(["validate-data", "--config", self.config], self.workdir)
        assert code == 0, out + err
        assert "OK:" in out

    # -------------------------------------------------------------------------------------------- training
    def test_fit_trains_both_loras_and_renders_the_chained_sample(self, run: Path, settings: dict) -> None:
        args = settings["model"]["init_args"]
        for phase in ("slow", "fast"):
            meta = self.metadata(run, phase)
            assert meta["family"] == self.family and meta["phase"] == phase
            assert meta["timesteps"] == pytest.approx(meta["schedule"][phase])
            assert meta["trained_steps"] == args.get(f"{phase}_steps", meta["trained_steps"]) > 0
            tensors = load_file(run / phase / LORA_FILE)
            ups = [t for k, t in tensors.items() if "lora_B" in k]
            assert ups and any(t.abs().sum() > 0 for t in ups), f"the {phase} LoRA is still its zero init"
        assert list((run / "samples").glob("*.png")), "no chained sample was rendered"

    def test_one_training_step_moves_only_the_active_adapter(self, settings: dict, tmp_path: Path) -> None:
        import lightning as L

        module, data = config_objects(settings, model={
            "slow_steps": 1, "fast_steps": 0, "optimizer": {"lr": 0.05, "warmup_steps": 1},
            "output_dir": str(tmp_path / "out")}, data={"batch_size": 1})
        module.load_base_model()
        before = {k: p.detach().clone() for k, p in pipeline_parameters(module.pipe).items()}
        trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, default_root_dir=tmp_path)
        trainer.fit(module, data)
        assert trainer.global_step == 1
        after = pipeline_parameters(module.pipe)  # text encoders may be freed once the data is encoded
        changed = {k for k in after if k in before and not torch.equal(before[k], after[k].detach())}
        assert changed and all("lora_" in k and ".slow." in k for k in changed), sorted(changed)
        fast_b = [p for k, p in after.items() if "lora_B.fast" in k]
        assert fast_b and all(p.abs().sum() == 0 for p in fast_b)

    def test_training_lowers_the_loss_at_each_adapters_timesteps(self, run: Path, settings: dict) -> None:
        from glance_lightning.evaluation import phase_losses
        from glance_lightning.inference import load_glance_loras

        before, data = config_objects(settings)
        data.setup()
        before.load_base_model()
        before.build_cache(data.train_samples)
        after, _ = config_objects(settings)
        after.load_base_model(with_adapters=False)
        load_glance_loras(after.pipe, run / "slow", run / "fast")
        after.build_cache(data.train_samples)
        untrained, trained = phase_losses(before), phase_losses(after)
        for phase in ("slow", "fast"):
            assert trained[phase] < self.loss_ratio * untrained[phase], (phase, untrained, trained)

    # -------------------------------------------------------------------------------------------- using the LoRAs
    def stock_call(self, **kwargs: Any) -> dict[str, Any]:
        call = {"prompt": self.prompt, "height": 64, "width": 64, "generator": torch.Generator().manual_seed(0),
                **self.stock_kwargs, **kwargs}
        if self.controls:
            images = [Image.open(self.path(c)).convert("RGB") for c in self.controls]
            call["image"] = images[0] if len(images) == 1 else images
        return call

    def test_loras_load_into_the_stock_pipeline_at_their_strength(self, run: Path) -> None:
        from glance_lightning.compat import allow_qwen2vl_processor_without_torchvision
        from glance_lightning.inference import load_glance_loras
        from glance_lightning.tiny import tiny_model_path

        allow_qwen2vl_processor_without_torchvision()
        pipe = self.spec().pipeline_class().from_pretrained(tiny_model_path(f"tiny:{self.family}"))
        pipe.set_progress_bar_config(disable=True)
        base = pipe(**self.stock_call(num_inference_steps=2, output_type="pt")).images
        load_glance_loras(pipe, run / "slow", run / "fast")
        for phase in ("slow", "fast"):
            saved = self.trained_deltas(run, phase)
            loaded = {f"transformer.{n}": m.scaling[phase] * (m.lora_B[phase].weight.flatten(1)
                                                              @ m.lora_A[phase].weight.flatten(1))
                      for n, m in pipe.transformer.named_modules() if phase in getattr(m, "lora_A", {})}
            assert loaded.keys() == saved.keys()
            for name, delta in saved.items():
                torch.testing.assert_close(loaded[name], delta, rtol=1e-5, atol=1e-7, msg=name)
            pipe.set_adapters(phase)
            changed = pipe(**self.stock_call(num_inference_steps=2, output_type="pt")).images
            assert (changed - base).abs().max() > 1e-4, f"the {phase} LoRA does not change the stock output"

    def test_sample_chains_the_loras_with_the_familys_guidance(self, run: Path, tmp_path: Path) -> None:
        kind = self.spec().guidance_kind
        argv = ["sample", "--model", f"tiny:{self.family}", "--slow", str(run / "slow"), "--fast",
                str(run / "fast"), "--prompt", self.prompt, "--height", "64", "--width", "64",
                *[arg for c in self.controls for arg in ("--control", str(self.path(c)))]]
        code, out, err = run_command([*argv, *GUIDANCE_FLAGS[kind], "--output", str(tmp_path / "images")])
        assert code == 0, out + err
        (image,) = sorted((tmp_path / "images").glob("*.png"))
        text = json.loads(Image.open(image).text["glance"])
        assert text["family"] == self.family
        assert text["schedule"]["slow"] == pytest.approx(self.metadata(run, "slow")["timesteps"])
        for other, flags in GUIDANCE_FLAGS.items():
            if other != kind and flags:  # the other family kind's option is refused, never ignored
                code, _, err = run_command([*argv, *flags, "--output", str(tmp_path / other)])
                assert code == 2 and flags[0] in err, err
                assert not (tmp_path / other).exists()

    def test_export_comfyui_reads_back_to_the_same_weight_change(self, run: Path, tmp_path: Path) -> None:
        from glance_lightning.lora_layouts import read_lora_modules

        target = tmp_path / "slow_comfyui.safetensors"
        code, out, err = run_command(["export", "--lora", str(run / "slow"), "--format", "comfyui", "--output",
                                      str(target)])
        if self.spec().lora_layout is None:
            assert code == 2 and "--format diffusers" in err, err
            return
        assert code == 0, out + err
        saved = self.trained_deltas(run, "slow")
        modules, _ = read_lora_modules(target, self.family)
        read = {f"transformer.{n}": b.flatten(1).float() @ a.flatten(1).float() for n, (a, b) in modules.items()}
        assert read.keys() == saved.keys()
        for name, delta in saved.items():
            torch.testing.assert_close(read[name], delta, rtol=1e-4, atol=1e-6, msg=name)

    def test_plan_predicts_the_quickstart_step(self) -> None:
        from glance_lightning.tiny import tiny_model_path

        architecture = Path(tiny_model_path(f"tiny:{self.family}")) / "transformer" / "config.json"
        code, out, err = run_command(["plan", "--config", self.config, "--architecture", str(architecture),
                                      "--format", "json"], self.workdir)
        assert code == 0, out + err
        plan = json.loads(out)
        assert plan["family"] == self.family and plan["predicted"] is True
        assert plan["peak_gib"] > 0 and plan["step_s"] > 0
