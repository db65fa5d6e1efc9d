"""Every user mistake is one short message naming the setting or file, exit status 2, no traceback; checked
before any model is loaded where the mistake allows it; resumes refuse settings that contradict the checkpoint."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning  # noqa: F401 (imported at collection: its log handler then writes to a stream that stays open)
import pytest
import torch
from safetensors.torch import save_file

from glance_lightning import errors
from glance_lightning.cli import main

BASE = """
trainer:
  accelerator: cpu
  default_root_dir: {root}
  enable_progress_bar: false
  logger: {logger}
  enable_checkpointing: {checkpoints}
{callbacks}model:
  class_path: glance_lightning.families.flux.FluxGlance
  init_args:
    pretrained_model: tiny:flux
    timesteps: {{slow: [1000, 960], fast: [800, 300]}}
    slow_steps: 2
    fast_steps: 2
    max_sequence_length: 64
    lora: {{rank: 4, alpha: 4}}
data:
  class_path: glance_lightning.datamodules.glance.GlanceDataModule
  init_args: {{path: {repo}/glance_lightning/assets/samples/t2i, resolution: 64, size_multiple: 32}}
"""


CHECKPOINT_EVERY_STEP = """  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {every_n_train_steps: 1, save_last: true, save_top_k: -1}
"""


def config(tmp_path: Path, repo: Path, logger: bool = False, checkpoints: bool = False) -> Path:
    """A 2 + 2 step fit of tiny:flux into tmp_path/run (checkpoints: after every step, all kept)."""
    path = tmp_path / "fit.yaml"
    path.write_text(BASE.format(root=tmp_path / "run", repo=repo, logger=str(logger).lower(),
                                checkpoints=str(checkpoints).lower(),
                                callbacks=CHECKPOINT_EVERY_STEP if checkpoints else ""))
    return path


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.err + captured.out


def assert_user_error(code: int, out: str, *named: str, max_lines: int = 6) -> None:
    assert code == errors.EXIT_USER_ERROR, out
    assert "Traceback" not in out
    message = [line for line in out.splitlines() if "error:" in line or line.startswith("  ")]
    assert message and len(message) <= max_lines, out
    for name in named:
        assert name in out, (name, out)


@pytest.mark.parametrize(("override", "named"), [
    (["--model.init_args.lora.rank", "0"], "model.init_args.lora.rank=0: must be > 0"),
    (["--model.init_args.lora.alpha", "-1"], "model.init_args.lora.alpha=-1: must be > 0"),
    (["--model.init_args.lora.dropout", "2"], "model.init_args.lora.dropout=2: must be in [0, 1)"),
    (["--model.init_args.optimizer.lr", "-1"], "model.init_args.optimizer.lr=-1"),
    (["--model.init_args.optimizer.warmup_steps", "-1"], "model.init_args.optimizer.warmup_steps=-1"),
    (["--model.init_args.torch_dtype", "int8"], "model.init_args.torch_dtype=int8: use one of float32"),
    (["--model.init_args.bogus", "1"], "model.init_args.bogus: no such setting"),
    (["--model.init_args.slow_steps", "many"], "model.init_args.slow_steps"),
    (["--model.init_args.timesteps", "{slow: [1000, 950], fast: [0.5, 0.1]}"], "fast=[0.5, 0.1] as sigmas"),
    (["--model.init_args.lora.targets", "[to_q, nope]"], "model.lora.targets: ['nope']"),
    (["--model.init_args.pretrained_model", "/no/such/model"], "model.pretrained_model='/no/such/model'"),
    (["--trainer.default_root_dir", "/proc/no/such"], "trainer.default_root_dir: cannot create /proc/no/such"),
    (["--model.init_args.transformer", "/no/such.safetensors"], "model.transformer='/no/such.safetensors'"),
    (["--trainer.accelerator", "gpu"] if not torch.cuda.is_available() else ["--trainer.devices", "-7"],
     "trainer settings:"),
    (["--trainer.devices", "2"], "trainer.strategy: DDP must be told"),  # refused before any process starts
])
def test_config_mistakes_are_one_line_before_any_model_loads(override, named, tmp_path, repo, capsys,
                                                             no_model_load):
    code, out = run_cli(capsys, "fit", "--config", str(config(tmp_path, repo)), *override)
    assert_user_error(code, out, named, max_lines=2)


FSDP2 = ["--trainer.devices", "2", "--trainer.strategy", "fsdp2"]
PERF = "--model.init_args.performance."


@pytest.mark.parametrize(("override", "named"), [
    (["--trainer.strategy", "fsdp3"], "trainer.strategy: 'fsdp3' is not a strategy; did you mean fsdp2?"),
    (["--trainer.strategy", "fsdp"], "trainer.strategy: fsdp is not supported"),
    (["--trainer.strategy", "deepspeed_stage_3"], "use strategy: fsdp2"),
    (["--trainer.devices", "4096", "--trainer.strategy", "fsdp2"], "trainer.devices=4096: this machine has"),
    ([*FSDP2, PERF + "base_quantization", "int8-weight-only"],
     "model.performance.base_quantization cannot be used with trainer.strategy: fsdp2"),
    ([*FSDP2, PERF + "offload", "block", PERF + "gradient_checkpointing", "true"],
     "model.performance.offload cannot be used with trainer.strategy: fsdp2"),
    ([*FSDP2, PERF + "compile_blocks", "true"], "model.performance.compile_blocks cannot be used"),
    ([*FSDP2, "--model.init_args.optimizer.name", "adamw8bit"], "model.optimizer.name=adamw8bit cannot be used"),
    ([*FSDP2, "--model.init_args.encode_cache", "null"], "model.encode_cache=null with trainer.strategy: fsdp2"),
])
def test_strategies_and_sharding_settings_it_cannot_serve_are_one_line_with_nothing_written(
        override, named, tmp_path, repo, capsys, no_model_load):
    """Refused before Lightning's launcher starts another process or any model loads: no run folder is left."""
    code, out = run_cli(capsys, "fit", "--config", str(config(tmp_path, repo)), *override)
    assert_user_error(code, out, named, max_lines=2)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").rglob("*")), out


def test_a_model_of_another_family_is_refused_from_its_model_index(tmp_path, repo, capsys, no_model_load):
    from glance_lightning.tiny import tiny_model_path

    sd3 = tiny_model_path("tiny:sd3")
    code, out = run_cli(capsys, "fit", "--config", str(config(tmp_path, repo)),
                        "--model.init_args.pretrained_model", str(sd3))
    assert_user_error(code, out, "model.pretrained_model", "StableDiffusion3Pipeline", "not flux",
                      "glance_lightning.families.sd3")


SAMPLES_WITH = """  callbacks:
    - class_path: callbacks.samples.ChainedSampleCallback
      init_args: {{prompts: [a cat], every_n_steps: 1, {setting}}}
"""


@pytest.mark.parametrize(("setting", "named"), [
    ("guidance_scale: 3.5", "guidance_scale: flux has no classifier-free guidance"),
    ("negative_prompt: blurry", "negative_prompt: flux has no classifier-free guidance"),
])
def test_sample_callback_cfg_settings_are_refused_for_a_family_without_cfg(setting, named, tmp_path, repo, capsys,
                                                                           no_model_load):
    path = config(tmp_path, repo)
    path.write_text(path.read_text().replace("model:\n", SAMPLES_WITH.format(setting=setting) + "model:\n", 1))
    code, out = run_cli(capsys, "fit", "--config", str(path))
    assert_user_error(code, out, named, "model.init_args.guidance", max_lines=2)


def test_debug_flag_keeps_the_traceback(tmp_path, repo):
    with pytest.raises(errors.ConfigError, match="model.lora.targets"):
        main(["fit", "--config", str(config(tmp_path, repo)), "--model.init_args.lora.targets", "[nope]",
              "--debug"])


def test_parse_error_summary_of_a_nested_union_dump():
    dump = """Parser key "model":
  Does not validate against any of the Union subtypes
  Errors:
    - Problem with given class_path 'glance_lightning.families.flux.FluxGlance':
        Parser key "optimizer":
          Does not validate against any of the Union subtypes
          Errors:
            - Problem with given class_path 'glance_lightning.settings.OptimizerSettings':
                Parser key "warmup_steps":
                  Not of type NonNegativeInt: -3 does not conform to restriction v>=0
            - Expected a <class 'NoneType'>
          Given value type: <class 'jsonargparse._util.NestedArg'>
    - Expected a <class 'NoneType'>"""
    expected = "model.init_args.optimizer.warmup_steps=-3: must be >= 0 (NonNegativeInt)"
    assert errors.parse_error_message(dump) == expected


# ------------------------------------------------------------------------------------------------ resume


@pytest.fixture
def finished_run(tmp_path: Path, repo: Path, capsys) -> tuple[Path, Path]:
    """A 4-step run with a checkpoint after every step, logged in version_0: (config, run dir)."""
    path = config(tmp_path, repo, logger=True, checkpoints=True)
    code, out = run_cli(capsys, "fit", "--config", str(path))
    assert code == 0, out
    return path, tmp_path / "run" / "version_0"


@pytest.mark.parametrize(("override", "named"), [
    (["--model.init_args.lora.rank", "8"], "model.lora.rank: the checkpoint has 4, this run 8"),
    (["--model.init_args.timesteps", "{slow: [1000, 990], fast: [800, 300]}"],
     "model.timesteps (slow, 0-1000): the checkpoint has [1000.0, 960.0], this run [1000.0, 990.0]"),
    (["--model.init_args.slow_steps", "3"], "model.slow_steps: the checkpoint has 2, this run 3"),
    (["--model.init_args.fast_steps", "1"], "model.fast_steps: the checkpoint is at step 4, past this run's 3"),
])
def test_a_resume_refuses_settings_that_contradict_the_checkpoint(override, named, finished_run, capsys,
                                                                  no_model_load):
    path, run = finished_run
    code, out = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", "last", *override)
    assert_user_error(code, out, named, str(run / "checkpoints" / "last.ckpt"))


def test_a_damaged_checkpoint_is_named_with_the_one_to_use_instead(finished_run, capsys, no_model_load):
    path, run = finished_run
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:2000])  # what a full disk or a killed copy leaves
    code, out = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", str(last))
    assert_user_error(code, out, f"--ckpt_path {last}: cannot be read",
                      str(run / "checkpoints" / "epoch=0-step=4.ckpt"))


def test_every_resume_of_a_run_continues_in_that_run_folder(finished_run, capsys):
    path, run = finished_run
    loras = {p: (run / p / "pytorch_lora_weights.safetensors") for p in ("slow", "fast")}
    first = {p: f.stat().st_mtime_ns for p, f in loras.items()}
    middle = run / "checkpoints" / "epoch=0-step=2.ckpt"
    code, out = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", str(middle))
    assert code == 0, out
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4  # the resumed steps were checkpointed in the same run folder
    code, out = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", "last")
    assert code == 0, out
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # no second folder for a resume
    assert all(loras[p].stat().st_mtime_ns > first[p] for p in loras)  # rewritten in place, in version_0


def test_python_api_resume_with_other_lists_is_refused(finished_run, tmp_path, repo):
    import lightning as L
    from glance_lightning.datamodules.glance import GlanceDataModule

    from glance_lightning.families.flux import FluxGlance
    from glance_lightning.settings import LoraSettings, TimestepSettings

    _, run = finished_run
    module = FluxGlance(pretrained_model="tiny:flux", timesteps=TimestepSettings(slow=[1000, 900], fast=[800, 300]),
                        slow_steps=2, fast_steps=2, lora=LoraSettings(rank=4, alpha=4), max_sequence_length=64,
                        output_dir=str(tmp_path / "api"))
    data = GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=64, size_multiple=32)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_checkpointing=False,
                        default_root_dir=tmp_path / "api_root")
    with pytest.raises(errors.ConfigError, match=r"model.timesteps \(slow, 0-1000\)"):
        trainer.fit(module, data, ckpt_path=str(run / "checkpoints" / "last.ckpt"))


# ------------------------------------------------------------------------------------------------ sample


@pytest.fixture
def loras(tmp_path: Path, repo: Path, capsys) -> Path:
    path = config(tmp_path, repo)
    code, out = run_cli(capsys, "fit", "--config", str(path))
    assert code == 0, out
    return tmp_path / "run" / "version_0"


def sample_args(loras: Path, tmp_path: Path, *extra: str, slow: str | None = None) -> list[str]:
    return ["sample", "--model", "tiny:flux", "--slow", slow or str(loras / "slow"), "--fast", str(loras / "fast"),
            "--prompt", "a red ball", "--output", str(tmp_path / "samples"), *extra]


@pytest.mark.parametrize(("extra", "named"), [
    (["--height", "65"], "--height 65: give a positive multiple of 16 (e.g. 64)"),
    (["--height", "0"], "--height 0"),
    (["--width", "-64"], "--width -64"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999"),
    (["--lora-scale", "nan"], "--lora-scale nan"),
])
def test_sample_options_are_checked_before_loading(extra, named, loras, tmp_path, capsys, no_model_load):
    code, out = run_cli(capsys, *sample_args(loras, tmp_path, *extra))
    assert_user_error(code, out, named, max_lines=2)
    assert not (tmp_path / "samples").exists()


def test_damaged_and_non_lora_files_are_named(loras, tmp_path, capsys, no_model_load):
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes((loras / "slow" / "pytorch_lora_weights.safetensors").read_bytes()[:300])
    model = tmp_path / "model.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(model))
    for path, named in ((damaged, "not a readable .safetensors file"), (model, "holds no LoRA tensors")):
        code, out = run_cli(capsys, *sample_args(loras, tmp_path, slow=str(path)))
        assert_user_error(code, out, f"LoRA {path}", named, max_lines=2)


def test_a_full_copy_of_the_loras_still_samples(loras, tmp_path, capsys):
    shutil.copytree(loras / "slow", tmp_path / "copy")
    code, out = run_cli(capsys, *sample_args(loras, tmp_path, "--height", "64", "--width", "64",
                                             slow=str(tmp_path / "copy")))
    assert code == 0, out
    assert len(list((tmp_path / "samples").glob("*.png"))) == 1


def test_an_earlier_runs_folder_is_never_written_into(tmp_path, repo, capsys, monkeypatch):
    path = config(tmp_path, repo)
    code, out = run_cli(capsys, "fit", "--config", str(path), "--model.init_args.output_dir", str(tmp_path / "a"))
    assert code == 0, out
    first = tmp_path / "run" / "version_0"
    saved = (first / "config.yaml").read_bytes()
    code, out = run_cli(capsys, "fit", "--config", str(path), "--model.init_args.output_dir", str(tmp_path / "b"))
    assert code == 0, out  # a second run into the same root gets the next folder
    assert (tmp_path / "run" / "version_1" / "config.yaml").is_file()
    monkeypatch.setenv("GLANCE_LIGHTNING_RUN_DIR", str(first))  # a launcher pointing at the earlier run
    code, out = run_cli(capsys, "fit", "--config", str(path), "--model.init_args.output_dir", str(tmp_path / "c"))
    assert_user_error(code, out, f"{first / 'config.yaml'} is an earlier run's config")
    assert (first / "config.yaml").read_bytes() == saved
    assert not (tmp_path / "c").exists()


def test_a_root_dir_that_is_a_file_is_named(tmp_path, repo, capsys, no_model_load):
    (tmp_path / "file").write_text("x")
    code, out = run_cli(capsys, "fit", "--config", str(config(tmp_path, repo)),
                        "--trainer.default_root_dir", str(tmp_path / "file"))
    assert_user_error(code, out, f"trainer.default_root_dir: {tmp_path / 'file'} is a file", max_lines=2)


def test_validate_data_reads_a_fit_configs_data_settings(repo, capsys, monkeypatch):
    monkeypatch.chdir(repo)
    code, out = run_cli(capsys, "validate-data", "--config", "configs/quickstart.yaml")
    assert code == 0 and "0 warnings" in out, out  # its resolution 64: the 128 px sample is no upscale
    code, out = run_cli(capsys, "validate-data", "--path", "glance_lightning/assets/samples/t2i")
    assert code == 0 and "upscaled 8.0x" in out, out  # the default 1024
    code, out = run_cli(capsys, "validate-data", "--config", "no-such.yaml")
    assert_user_error(code, out, "--config no-such.yaml: no such file", max_lines=2)


@pytest.mark.parametrize(("kind", "values", "named"), [
    ("LoraSettings", {"rank": 0}, "model.lora.rank=0: must be > 0"),
    ("LoraSettings", {"dropout": 1.5}, "model.lora.dropout=1.5: must be in [0, 1)"),
    ("OptimizerSettings", {"warmup_steps": -2}, "model.optimizer.warmup_steps=-2: must be >= 0"),
    ("OptimizerSettings", {"betas": (0.9, 1.0)}, "model.optimizer.betas=[0.9, 1.0]"),
    ("ScheduleDerivation", {"num_steps": 0}, "model.timesteps.derive.num_steps=0: must be > 0"),
])
def test_python_callers_get_the_command_lines_checks(kind, values, named):
    import glance_lightning.settings as settings

    with pytest.raises(errors.ConfigError) as info:
        getattr(settings, kind)(**values)
    assert named in str(info.value)


def test_a_run_resumed_with_performance_auto_keeps_the_checkpoints_optimizer(finished_run, capsys):
    """auto leaves the optimizer unset until setup; a resume takes it (and the quantised base) from the
    checkpoint, so the resume is not refused as "other settings" and continues."""
    path, run = finished_run
    middle = run / "checkpoints" / "epoch=0-step=2.ckpt"
    code, out = run_cli(capsys, "fit", "--config", str(path), "--ckpt_path", str(middle),
                        "--model.init_args.performance.auto", "true")
    assert code == 0, out
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 4
    assert last["glance_identity"]["model.optimizer.name"] == "adamw"
