"""The family registry is the one place a family is declared: everything else reads it, and production code
never imports the tiny builders unless a `tiny:` name is opened."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest
import yaml

from glance_lightning.cli import main
from glance_lightning.commands.validate_data import run_validate_data_command
from glance_lightning.family_spec import IDENTITY_LAYOUT, INHERITED
from glance_lightning.registry import (
    FamilySpec,
    family_names,
    get_family,
    markdown_table,
    register_family,
    unregister_family,
)
from glance_lightning.schedules import derive_timesteps

from reaping import run_reaped

BUILTINS = ("flux", "flux-kontext", "flux2", "flux2-klein", "sd3", "qwen-image", "qwen-image-2", "qwen-image-edit",
            "qwen-image-edit-plus")


def test_builtins_are_registered_and_consistent():
    assert family_names()[: len(BUILTINS)] == BUILTINS
    for name in BUILTINS:
        spec = get_family(name)
        assert spec.module_class().family == name
        assert spec.pipeline_class().__name__.endswith("Pipeline")
        assert spec.scheduler()["_class_name"] == "FlowMatchEulerDiscreteScheduler"
        assert spec.scheduler() is not spec.scheduler_config  # callers get a copy
    assert [n for n in BUILTINS if get_family(n).official_qwen] == ["qwen-image", "qwen-image-edit",
                                                                   "qwen-image-edit-plus"]
    assert get_family("qwen-image-edit-plus").control_images == (1, 3)


def test_readme_family_table_is_the_registry(repo: Path):
    assert markdown_table() in (repo / "docs" / "families.md").read_text()


def test_bad_registrations_are_refused():
    with pytest.raises(ValueError, match="plain name"):
        register_family(FamilySpec(name="tiny:x", module="a:b", pipeline="a:b", scheduler_config={}))
    with pytest.raises(ValueError, match="min, max"):
        register_family(FamilySpec(name="x", module="a:b", pipeline="a:b", scheduler_config={},
                                   control_images=(2, 1)))
    with pytest.raises(ValueError, match="already registered"):
        register_family(FamilySpec(name="flux", module="a:b", pipeline="a:b", scheduler_config={}))
    assert "x" not in family_names()


def test_a_spec_like_another_takes_what_it_leaves_unset():
    """like="flux": FLUX's scheduler, architecture, encoder sizes, ComfyUI layout, guidance and tiny builder, unless
    the spec sets its own."""
    flux = get_family("flux")
    try:
        spec = register_family(FamilySpec(name="like-flux", like="flux", module="a:b",
                                          pipeline="diffusers:FluxKontextPipeline", control_images=(1, 1)))
        assert get_family("like-flux") == spec
        for name in INHERITED:
            assert getattr(spec, name) == getattr(flux, name), name
        assert spec.control_images == (1, 1) and spec.pipeline_name == "FluxKontextPipeline"
        own = register_family(FamilySpec(name="like-flux-own", like="flux", module="a:b", pipeline="a:b",
                                         scheduler_config={"shift": 2.0}, guidance_kind="none",
                                         lora_layout=IDENTITY_LAYOUT))
        assert (own.scheduler_config, own.guidance_kind, own.lora_layout) == ({"shift": 2.0}, "none", "diffusers")
        assert own.architecture == flux.architecture and own.encoder_params == flux.encoder_params
        # the built-in edit families are declared like="qwen-image"
        assert get_family("qwen-image-edit").encoder_params == get_family("qwen-image").encoder_params
    finally:
        unregister_family("like-flux")
        unregister_family("like-flux-own")


def test_bad_likes_and_guidance_kinds_are_refused():
    with pytest.raises(ValueError, match="like='nope' is not a registered family"):
        register_family(FamilySpec(name="x", like="nope", module="a:b", pipeline="a:b"))
    with pytest.raises(ValueError, match="guidance_kind='strong'; expected one of embedded, cfg, none"):
        register_family(FamilySpec(name="x", module="a:b", pipeline="a:b", scheduler_config={},
                                   guidance_kind="strong"))
    with pytest.raises(ValueError, match="give its scheduler_config"):
        register_family(FamilySpec(name="x", module="a:b", pipeline="a:b"))
    assert "x" not in family_names()


@pytest.mark.parametrize(("family", "settings", "unused"), [
    ("flux", {"guidance": 3.5}, None),
    ("flux", {"guidance_scale": 1.0}, None),  # a scale of 1 is no guidance
    ("flux", {"guidance_scale": 4.0}, "guidance_scale"),
    ("flux", {"negative_prompt": ""}, "negative_prompt"),
    ("sd3", {"guidance_scale": 4.0, "negative_prompt": "blur"}, None),
    ("sd3", {"guidance": 3.5}, "guidance"),
    ("qwen-image-edit", {"guidance": 3.5, "guidance_scale": 4.0}, "guidance"),
])
def test_a_spec_names_the_guidance_setting_its_sampling_would_ignore(family, settings, unused):
    assert get_family(family).unused_guidance(**settings) == unused


def test_no_family_name_is_compared_outside_the_family_modules(repo: Path):
    """Shared code decides by a family's spec and hooks, never by its name: no built-in family's name appears as
    a string outside glance_lightning/families/ (the tiny builders' ``__all__`` names functions)."""
    found = []
    for root in ("glance_lightning", "datamodules", "callbacks"):
        for path in sorted((repo / root).rglob("*.py")):
            if path.parent == repo / "glance_lightning" / "families":
                continue
            tree = ast.parse(path.read_text())
            exported = {id(n) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                        and any(getattr(t, "id", None) == "__all__" for t in node.targets)
                        for n in ast.walk(node.value)}
            found += [f"{path.relative_to(repo)}:{node.lineno} {node.value!r}" for node in ast.walk(tree)
                      if isinstance(node, ast.Constant) and node.value in BUILTINS and id(node) not in exported]
    assert not found, found


def test_families_from_installed_packages_are_loaded_through_entry_points(monkeypatch, tmp_path: Path):
    import importlib.metadata

    from glance_lightning import registry

    (tmp_path / "my_family_pkg.py").write_text(
        "from glance_lightning.registry import FamilySpec, register_family\n"
        "register_family(FamilySpec(name='from-entry-point', module='a:b', pipeline='a:b',\n"
        "                           scheduler_config={'num_train_timesteps': 1000}))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    entry = importlib.metadata.EntryPoint("mine", "my_family_pkg", registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points",
                        lambda group: [entry] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setattr(registry, "_BUILTINS_LOADED", False)
    try:
        assert "from-entry-point" in registry.family_names()
    finally:
        registry.unregister_family("from-entry-point")


def test_production_code_imports_no_tiny_builder_and_patches_nothing_until_asked(tiny_cache: Path):
    """Opening a local folder imports neither the tiny builders nor the Qwen2-VL processor work-around; the
    work-around is applied where an edit pipeline is loaded."""
    from glance_lightning.tiny import tiny_model_path

    flux, edit = tiny_model_path("tiny:flux"), tiny_model_path("tiny:qwen-image-edit")
    code = f"""
import sys
from glance_lightning import cli, commands, inference, evaluation
from glance_lightning.commands import sample, schedule, validate_data
from glance_lightning.families.flux import FluxGlance
from glance_lightning.families.qwen_image_edit import QwenImageEditGlance
from transformers import Qwen2VLProcessor
m = FluxGlance(pretrained_model={flux!r}, timesteps={{"slow": [1.0], "fast": [0.5]}})
m.load_base_model()
assert not getattr(Qwen2VLProcessor, "_glance_without_video", False)
assert not [k for k in sys.modules if k.startswith("glance_lightning.tiny")], "tiny imported"
e = QwenImageEditGlance(pretrained_model={edit!r}, timesteps={{"slow": [1.0], "fast": [0.5]}})
e.load_base_model()
print("edit processor", type(e.pipe.processor).__name__)
assert not [k for k in sys.modules if k.startswith("glance_lightning.tiny")], "tiny imported"
"""
    result = run_reaped([sys.executable, "-c", code], timeout=240, merge_stderr=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "edit processor Qwen2VLProcessor" in result.stdout


def test_the_cli_links_the_data_resolution_to_the_derived_lists(repo: Path, tmp_path: Path, monkeypatch):
    """A config without lists derives them at the resolution it trains at, not at a fixed 1024."""
    monkeypatch.chdir(repo)
    overlay = tmp_path / "derive.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"timesteps": {"slow": None, "fast": None}}}}))
    assert main(["fit", "--config", "configs/quickstart.yaml", "--config", str(overlay), "--trainer.default_root_dir",
                 str(tmp_path), "--model.init_args.slow_steps", "1", "--model.init_args.fast_steps", "1",
                 "--trainer.callbacks.init_args.every_n_steps", "0", "--trainer.callbacks.init_args.at_end",
                 "false"]) == 0
    from glance_lightning.lora_io import read_glance_metadata

    meta = read_glance_metadata(tmp_path / "version_0" / "slow")
    at_64 = derive_timesteps("flux", resolution=64)
    assert meta["schedule"]["slow"] == pytest.approx(at_64["slow"], abs=1e-3)
    assert meta["schedule"]["slow"] != pytest.approx(derive_timesteps("flux", resolution=1024)["slow"], abs=1e-3)


def test_validate_data_checks_the_control_count_of_a_family(repo: Path, capsys):
    edit = str(repo / "glance_lightning/assets/samples/edit")
    assert run_validate_data_command(["--path", edit, "--family", "qwen-image-edit"]) == 0
    capsys.readouterr()
    assert run_validate_data_command(["--path", edit, "--family", "flux"]) == 1
    assert "control" in capsys.readouterr().out


def test_every_config_copies_the_lists_its_family_derives(repo: Path):
    """Copied lists are the family's own schedule at 1024x1024 (the official derivation), not another family's."""
    families = {get_family(n).module: n for n in BUILTINS}  # "package.module:Class" -> family
    checked = 0
    for config in sorted((repo / "configs").glob("*.yaml")):
        model = yaml.safe_load(config.read_text())["model"]
        module, _, cls = model["class_path"].rpartition(".")
        lists = model["init_args"].get("timesteps") or {}
        if "slow" in lists:
            expected = derive_timesteps(families[f"{module}:{cls}"], resolution=1024)
            assert lists["slow"] == pytest.approx(expected["slow"], abs=1e-3), config.name
            assert lists["fast"] == pytest.approx(expected["fast"], abs=1e-3), config.name
            checked += 1
    assert checked >= 9  # the shipped model configs copy their lists


def test_the_new_family_guide_covers_every_hook_and_spec_field(repo: Path):
    """docs/new-family.md lists every family hook and FamilySpec field (a new one must be documented there)."""
    import dataclasses

    from glance_lightning.families.hooks import FamilyHooks

    guide = (repo / "docs" / "new-family.md").read_text()
    hooks = [n for n, v in vars(FamilyHooks).items() if not n.startswith("_") and callable(v)]
    assert hooks and [h for h in hooks if f"`{h}(" not in guide] == []
    fields = [f.name for f in dataclasses.fields(FamilySpec) if f.name != "extra"]
    assert [f for f in fields if f"`{f}`" not in guide] == []
