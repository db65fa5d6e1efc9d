"""Mistakes a new user makes, as one table: each ends in one line naming the file or setting and the fix, exit
status 2, no traceback, before any model is loaded, and nothing written (no run folder, no output folder, the
encode cache as it was). A new case is one row: argv (with {placeholders} from the ``world`` fixture), the words
the message must hold, and the paths under tmp_path that must not exist afterwards."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lightning  # noqa: F401 (imported at collection: its log handler then writes to a stream that stays open)
import pytest
import torch
from PIL import Image

from glance_lightning import errors
from glance_lightning.cli import main

FIT = """
trainer:
  accelerator: cpu
  default_root_dir: {tmp}/run
  enable_progress_bar: false
  logger: true
  enable_checkpointing: true
model:
  class_path: glance_lightning.families.flux.FluxGlance
  init_args:
    pretrained_model: tiny:flux
    timesteps: {{slow: [1000, 960], fast: [800, 300]}}
    slow_steps: 1
    fast_steps: 1
    max_sequence_length: 64
    lora: {{rank: 4, alpha: 4}}
    encode_cache: {tmp}/cache
data:
  class_path: glance_lightning.datamodules.glance.GlanceDataModule
  init_args: {{path: {repo}/glance_lightning/assets/samples/t2i, resolution: 64, size_multiple: 32}}
"""
CAPTION = "a red ball on green grass"


@dataclass(frozen=True)
class Case:
    argv: str  # split on spaces after formatting with the world's placeholders
    words: tuple[str, ...]  # each must appear in the message
    absent: tuple[str, ...] = ()  # paths under tmp_path that must not exist afterwards
    env: dict[str, str] = field(default_factory=dict)


def _fit(*extra: str, words: tuple[str, ...], env: dict[str, str] | None = None) -> Case:
    return Case(" ".join(("fit --config {tmp}/fit.yaml", *extra)), words, ("run", "cache"), env or {})


def _sample(*extra: str, words: tuple[str, ...]) -> Case:
    base = "sample --model tiny:flux --slow {loras}/slow --fast {loras}/fast"
    return Case(" ".join((base, *extra)), words, ("samples",))


MODEL = "--model.init_args.pretrained_model"
DATA = "--data.init_args.path"
CASES = {
    # 1. a damaged model folder
    "model_index.json truncated": _fit(MODEL, "{tmp}/m_index", words=(
        "model.pretrained_model", "m_index/model_index.json is not valid JSON", "download the model again")),
    "transformer config.json invalid": _fit(MODEL, "{tmp}/m_transformer", words=(
        "m_transformer/transformer/config.json is not valid JSON",)),
    "scheduler config invalid": _fit(MODEL, "{tmp}/m_scheduler", words=(
        "m_scheduler/scheduler/scheduler_config.json is not valid JSON",)),
    "tokenizer json not UTF-8": _fit(MODEL, "{tmp}/m_tokenizer", words=(
        "m_tokenizer/tokenizer/tokenizer_config.json is not UTF-8",)),
    "model_index.json a list": _fit(MODEL, "{tmp}/m_list", words=("m_list/model_index.json holds a JSON list",)),
    "declared component missing": _fit(MODEL, "{tmp}/m_novae", words=("declares the component 'vae'",
                                                                        "m_novae/vae is missing")),
    "plan: damaged model folder": Case("plan --config {tmp}/fit.yaml " + MODEL + " {tmp}/m_index",
                                       ("m_index/model_index.json is not valid JSON",)),
    "transformer override config invalid": _fit("--model.init_args.transformer", "{tmp}/m_transformer/transformer",
                                                words=("model.transformer", "transformer/config.json is not valid")),
    # 2. the encode cache
    "encode_cache is a file": _fit("--model.init_args.encode_cache", "{tmp}/file", words=(
        "model.encode_cache: ", "/file is a file, not a folder")),
    "encode_cache under a file": _fit("--model.init_args.encode_cache", "{tmp}/file/sub", words=(
        "model.encode_cache: ", "lies under", "which is a file")),
    "GLANCE_LIGHTNING_CACHE is a file": _fit(words=("GLANCE_LIGHTNING_CACHE: ", "/file is a file",
                                                    "point GLANCE_LIGHTNING_CACHE at a folder"),
                                             env={"GLANCE_LIGHTNING_CACHE": "{tmp}/file"}),
    # 3. sample
    "prompt file not UTF-8": _sample("--prompt-file {tmp}/latin1.txt --output {tmp}/samples", words=(
        "--prompt-file", "latin1.txt: not UTF-8 text (byte 0xe9 at offset 5")),
    "sample output unwritable": Case("sample --model tiny:flux --slow {loras}/slow --fast {loras}/fast --prompt x "
                                     "--output /proc/glance/samples", ("--output /proc/glance/samples",
                                                                       "cannot write in /proc")),
    "sample output under a file": _sample("--prompt x --output {tmp}/file/samples", words=(
        "--output", "/file is a file, not a folder")),
    # 4. numbers and families
    "schedule steps 1e12": Case("schedule --family flux --steps 1000000000000", ("--steps", "at most 10000")),
    "schedule steps not an integer": Case("schedule --family flux --steps 2.5", ("--steps", "'2.5' is not a whole")),
    "schedule steps in exponent form": Case("schedule --family flux --steps 1e12", ("--steps", "'1e12' is not")),
    "plan gpu-memory negative": Case("plan --config {tmp}/fit.yaml --gpu-memory -8", ("--gpu-memory -8", "> 0")),
    "plan gpu-memory zero": Case("plan --config {tmp}/fit.yaml --gpu-memory 0", ("--gpu-memory 0",)),
    "plan gpu-memory nan": Case("plan --config {tmp}/fit.yaml --gpu-memory nan", ("--gpu-memory nan",)),
    "plan gpu-memory inf": Case("plan --config {tmp}/fit.yaml --gpu-memory inf", ("--gpu-memory inf",)),
    "plan architecture of another family": Case("plan --config {tmp}/fit.yaml --architecture {sd3}/transformer/"
                                                "config.json", ("--architecture", "SD3Transformer2DModel config",
                                                                "not flux's FluxTransformer2DModel")),
    "plan model folder of another family": Case("plan --config {tmp}/fit.yaml " + MODEL + " {sd3}", (
        "model.pretrained_model=", "is a sd3 model", "not flux")),
    "fit model folder of another family": _fit(MODEL, "{sd3}", words=("is a sd3 model", "SD3Glance")),
    "plan text tokens zero": Case("plan --config {tmp}/fit.yaml --text-tokens 0", ("--text-tokens 0",)),
    "schedule resolution absurd": Case("schedule --family flux --resolution 1000000000", ("at most 16384",)),
    "schedule config values not numbers": Case("schedule --family flux --scheduler-config {tmp}/sched.json", (
        "--scheduler-config", "shift='abc'", "must be numbers")),
    "schedule config an image": Case("schedule --family flux --scheduler-config {image}", (
        "red_ball.png is not a json text file",)),
    "fit text tokens zero": _fit("--model.init_args.max_sequence_length 0", words=(
        "model.max_sequence_length=0: give 1 to 512",)),
    "fit text tokens beyond the pipeline's": _fit("--model.init_args.max_sequence_length 100000", words=(
        "model.max_sequence_length=100000",)),
    "fit accumulate_grad_batches zero": _fit("--trainer.accumulate_grad_batches 0", words=(
        "trainer.accumulate_grad_batches=0: must be >= 1",)),
    "fit resume from a LoRA file": _fit("--ckpt_path {loras}/slow/pytorch_lora_weights.safetensors", words=(
        "--ckpt_path", "not a Lightning checkpoint")),
    "fit resume from a dict that is no checkpoint": _fit("--ckpt_path {tmp}/dict.ckpt", words=(
        "dict.ckpt: not a Lightning checkpoint",)),
    "fit resume from a folder": _fit("--ckpt_path {loras}", words=("--ckpt_path", ": a folder; give a checkpoint",)),
    "validate-data config a list": Case("validate-data --config {tmp}/list.yaml", ("list.yaml: the file holds a",)),
    "validate-data config data a number": Case("validate-data --config {tmp}/data5.yaml", (
        "data5.yaml: data should be a mapping of settings, not 5",)),
    "validate-data size multiple zero": Case("validate-data --path {tmp}/d_empty --size-multiple 0", (
        "data.size_multiple=0: must be > 0",)),
    "validate-data resolution not a multiple": Case("validate-data --path {tmp}/d_empty --resolution 100", (
        "data.resolution=100 must be a multiple of data.size_multiple=32",)),
    "sample device unknown": _sample("--prompt x --output {tmp}/samples --device banana", words=(
        "--device banana: not a device name",)),
    "sample guidance nan": _sample("--prompt x --output {tmp}/samples --guidance nan", words=(
        "--guidance nan: give a finite number",)),
    "sample width absurd": _sample("--prompt x --output {tmp}/samples --width 100000000", words=(
        "--width 100000000: at most 8192",)),
    "sample dtype unknown": _sample("--prompt x --output {tmp}/samples --dtype int8", words=(
        "--dtype", "invalid choice: 'int8'")),
    "sample mode of another family": _sample("--prompt x --output {tmp}/samples --mode official-qwen", words=(
        "--mode official-qwen", "not for flux")),
    "sample the same LoRA twice": Case("sample --model tiny:flux --slow {loras}/slow --fast {loras}/slow --prompt x "
                                       "--output {tmp}/samples", ("both hold the 'slow' adapter",), ("samples",)),
    "sample unknown tiny model": Case("sample --model tiny:nope --slow {loras}/slow --fast {loras}/fast --prompt x "
                                      "--output {tmp}/samples", ("--model tiny:nope: no tiny model",), ("samples",)),
    "sample prompt file a folder": _sample("--prompt-file {tmp}/d_empty --output {tmp}/samples", words=(
        "d_empty: a folder, not a text file",)),
    "export output a file": Case("export --lora {loras}/slow --format comfyui --output {tmp}/file", (
        "--output", "/file is a file, not a folder")),
    "export output unwritable": Case("export --lora {loras}/slow --format comfyui --output /proc/g/x.safetensors", (
        "--output /proc/g/x.safetensors: cannot write in /proc",)),
    "cache without a cache": Case("cache --config {tmp}/fit.yaml --model.init_args.encode_cache null", (
        "glance_lightning: cache: error: model.encode_cache is null",)),
    # 5. captions and images
    "caption not UTF-8": _fit(DATA, "{tmp}/d_latin1", words=("d_latin1/ball.txt", "not UTF-8 text",
                                                             "at offset 5")),
    "caption with NUL bytes": _fit(DATA, "{tmp}/d_utf16_no_bom", words=("ball.txt", "NUL byte at offset 1")),
    "caption empty": _fit(DATA, "{tmp}/d_empty", words=("d_empty/ball.txt", "empty caption",
                                                        "data.allow_empty_captions")),
    "caption whitespace only": _fit(DATA, "{tmp}/d_blank", words=("d_blank/ball.txt", "empty caption")),
    "image a dangling symlink": _fit(DATA, "{tmp}/d_dangling", words=("d_dangling/ball.png",
                                                                      "dangling symlink to", "gone.png")),
    "image too small to encode": _fit(DATA, "{tmp}/d_small", words=("d_small/ball.png", "degenerate size 4x4")),
}


def _model_copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory, repo: Path) -> Path:
    """A Slow/Fast pair of tiny:flux, for the sample rows."""
    root = tmp_path_factory.mktemp("loras")
    (root / "fit.yaml").write_text(FIT.format(tmp=root, repo=repo))
    assert main(["fit", "--config", str(root / "fit.yaml"), "--trainer.logger", "false"]) == 0
    return next((root / "run").glob("version_*"))


@pytest.fixture
def world(tmp_path: Path, repo: Path, loras: Path) -> dict[str, str]:
    """The files the rows name: a fit config, damaged model folders, datasets, a latin-1 prompt file."""
    from glance_lightning.tiny import tiny_model_path

    (tmp_path / "fit.yaml").write_text(FIT.format(tmp=tmp_path, repo=repo))
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "latin1.txt").write_bytes("a caf\u00e9\n".encode("latin-1"))
    flux = Path(tiny_model_path("tiny:flux"))
    _model_copy(flux, tmp_path / "m_index").joinpath("model_index.json").write_text('{"_class_name": "Flux')
    _model_copy(flux, tmp_path / "m_transformer").joinpath("transformer", "config.json").write_text('{"a": 1,')
    _model_copy(flux, tmp_path / "m_scheduler").joinpath("scheduler", "scheduler_config.json").write_text("")
    _model_copy(flux, tmp_path / "m_tokenizer").joinpath("tokenizer", "tokenizer_config.json").write_bytes(b"\xff{}")
    _model_copy(flux, tmp_path / "m_list").joinpath("model_index.json").write_text("[1, 2]")
    shutil.rmtree(_model_copy(flux, tmp_path / "m_novae") / "vae")
    image = repo / "glance_lightning/assets/samples/t2i/red_ball.png"
    captions = {"latin1": f"a caf\u00e9 {CAPTION}".encode("latin-1"), "utf16_no_bom": CAPTION.encode("utf-16-le"),
                "empty": b"", "blank": b" \n\t\n", "dangling": CAPTION.encode(), "small": CAPTION.encode()}
    for name, text in captions.items():
        folder = tmp_path / f"d_{name}"
        folder.mkdir()
        (folder / "ball.txt").write_bytes(text)
        if name == "dangling":
            (folder / "ball.png").symlink_to(tmp_path / "gone.png")
        elif name == "small":
            Image.new("RGB", (4, 4), "red").save(folder / "ball.png")
        else:
            shutil.copy(image, folder / "ball.png")
    (tmp_path / "sched.json").write_text('{"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": "abc"}')
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "data5.yaml").write_text("data: 5\n")
    torch.save({"x": 1}, tmp_path / "dict.ckpt")
    return {"tmp": str(tmp_path), "loras": str(loras), "sd3": tiny_model_path("tiny:sd3"), "image": str(image)}


@pytest.mark.parametrize("name", list(CASES))
def test_a_mistake_is_one_line_with_exit_status_2_and_nothing_written(name, world, tmp_path, capsys, monkeypatch,
                                                                      no_model_load):
    case = CASES[name]
    for key, value in case.env.items():
        monkeypatch.setenv(key, value.format(**world))
    code = main(case.argv.format(**world).split(" "))
    captured = capsys.readouterr()
    out = captured.err + captured.out
    assert code == errors.EXIT_USER_ERROR, out
    assert "Traceback" not in out, out
    assert sum("error:" in line for line in out.splitlines()) >= 1, out
    for word in case.words:
        assert word.format(**world) in out, (word, out)
    for path in case.absent:
        assert not (tmp_path / path).exists(), (path, sorted(map(str, (tmp_path / path).rglob("*"))))


# ------------------------------------------------------------------------------------ read, not refused


def _cache_files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def filled_cache(world, tmp_path, capsys) -> Path:
    """The encode cache of a finished fit, one of its two entries then truncated (what a full disk leaves)."""
    assert main(["fit", "--config", str(tmp_path / "fit.yaml"), "--trainer.logger", "false"]) == 0
    capsys.readouterr()
    entries = sorted((tmp_path / "cache").rglob("*.safetensors"))
    assert len(entries) == 2, entries  # the sample's latents and its caption's conditioning
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    shutil.rmtree(tmp_path / "run")
    return tmp_path / "cache"


def test_a_read_only_encode_cache_is_read_and_the_rest_encoded_in_memory(filled_cache, tmp_path, capsys, caplog,
                                                                        monkeypatch):
    import glance_lightning.encode_store as encode_store

    monkeypatch.setattr(encode_store, "folder_writable", lambda path: False)  # as a read-only mount reports
    before = _cache_files(filled_cache)
    code = main(["fit", "--config", str(tmp_path / "fit.yaml")])
    out = capsys.readouterr().err
    assert code == 0, out
    assert f"encode cache {filled_cache / 'flux'} is read-only" in out
    assert "1 read back" in caplog.text  # the valid entry was used, the truncated one encoded again in memory
    assert _cache_files(filled_cache) == before  # nothing deleted, rewritten or added
    assert (next((tmp_path / "run").glob("version_*")) / "fast" / "pytorch_lora_weights.safetensors").is_file()


def test_a_cache_that_refuses_writes_at_save_time_is_said_once_and_the_fit_goes_on(world, tmp_path, capsys,
                                                                                   monkeypatch):
    import errno

    import glance_lightning.encode_store as encode_store

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(encode_store, "atomic_save_safetensors", refuse)
    code = main(["fit", "--config", str(tmp_path / "fit.yaml"), "--trainer.logger", "false"])
    out = capsys.readouterr().err
    assert code == 0, out
    assert out.count("is read-only: its valid entries are used") == 1, out
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_captions_with_a_byte_order_mark_train_and_empty_ones_train_when_allowed(world, tmp_path, repo, capsys):
    from glance_lightning.datamodules.validation import validate_dataset

    folder = tmp_path / "d_marked"
    folder.mkdir()
    shutil.copy(repo / "glance_lightning/assets/samples/t2i/red_ball.png", folder / "ball.png")
    for encoding in ("utf-8-sig", "utf-16", "utf-32"):
        (folder / "ball.txt").write_bytes(CAPTION.encode(encoding))
        assert [s.caption for s in validate_dataset(folder)] == [CAPTION], encoding
    code = main(["fit", "--config", str(tmp_path / "fit.yaml"), "--trainer.logger", "false", DATA, str(folder)])
    assert code == 0, capsys.readouterr().err
    code = main(["fit", "--config", str(tmp_path / "fit.yaml"), "--trainer.logger", "false", DATA,
                 str(tmp_path / "d_blank"), "--data.init_args.allow_empty_captions", "true"])
    assert code == 0, capsys.readouterr().err
    assert len(list((tmp_path / "run").glob("version_*/fast/pytorch_lora_weights.safetensors"))) == 2


def test_only_a_run_folder_holding_nothing_but_its_start_is_released(tmp_path):
    from glance_lightning.trainer_cli import release

    started, saved, trained = (tmp_path / "root" / f"version_{n}" for n in range(3))
    for run in (started, saved, trained):
        (run / "tensorboard").mkdir(parents=True)
        (run / "config.yaml").write_text("x")
    (saved / "slow").mkdir()  # e.g. the LoRAs a NaN stop at the first step wrote
    release([started, saved, tmp_path / "root"], untrained=True)
    release([trained], untrained=False)
    assert not started.exists()
    assert (saved / "slow").is_dir() and (trained / "config.yaml").is_file() and (tmp_path / "root").is_dir()
