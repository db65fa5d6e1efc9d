"""A family from outside the project, as a user adds one: the FLUX.1 Kontext example package of
docs/new-family.md (docs/examples/flux_kontext_family), copied into a temporary folder with the package metadata
pip would write for its pyproject (the entry point that puts the family on the command line), then used in new
processes exactly as a user does: validate-data, fit, plan, sample --guidance, export --format comfyui, and the
testing kit's contract suite, with no change to glance_lightning."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import tomllib
from conftest import REPO
from PIL import Image
from safetensors import safe_open

from glance_lightning.testing import FamilyContract

from reaping import run_reaped

EXAMPLE = REPO / "docs" / "examples" / "flux_kontext_family"
FAMILY = "kontext-example"


def install_metadata(root: Path) -> None:
    """What `pip install` of the example writes beside the package: METADATA and the entry points of its
    pyproject (read from it, so the test follows what the example declares)."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    info = root / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    groups = [f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items())
              for group, entries in project["entry-points"].items()]
    (info / "entry_points.txt").write_text("\n".join(groups))


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Path:
    root = tmp_path_factory.mktemp("outside_family")
    shutil.copytree(EXAMPLE, root, dirs_exist_ok=True)
    shutil.copytree(REPO / "glance_lightning" / "assets" / "samples" / "edit", root / "data")
    install_metadata(root)
    return root


def glance(root: Path, *args: str, timeout: float = 240) -> tuple[int, str]:
    """`python -m glance_lightning ARGS` in the package folder, the package importable (as once installed)."""
    env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
    done = run_reaped([sys.executable, "-m", "glance_lightning", *args], timeout, cwd=root, env=env)
    return done.returncode, done.stdout


@pytest.fixture(scope="module")
def run(package: Path) -> Path:
    code, out = glance(package, "fit", "--config", "quickstart.yaml")
    assert code == 0, out[-3000:]
    (folder,) = sorted((package / "runs" / "kontext").glob("version_*"))
    return folder


def test_validate_data_checks_the_outside_familys_control_images(package: Path):
    code, out = glance(package, "validate-data", "--config", "quickstart.yaml")
    assert code == 0 and "OK:" in out, out
    # the same config on a dataset without control images: the family's (1, 1) is checked, not skipped
    flat = (package / "quickstart.yaml").read_text().replace("path: data ", f"path: {REPO}/glance_lightning/"
                                                              "assets/samples/t2i ")
    (package / "flat.yaml").write_text(flat)
    code, out = glance(package, "validate-data", "--config", "flat.yaml")
    assert code == 1 and "needs 1 control image(s) per sample" in out, out
    assert "num_controls" not in out


def test_fit_trains_both_loras_of_the_outside_family(run: Path):
    for phase in ("slow", "fast"):
        with safe_open(run / phase / "pytorch_lora_weights.safetensors", "pt") as f:
            assert json.loads(f.metadata()["glance"])["family"] == FAMILY
    assert list((run / "samples").glob("*.png"))


def test_plan_answers_at_full_size_through_the_familys_hooks(package: Path):
    code, out = glance(package, "plan", "--config", "quickstart.yaml", "--format", "json")
    assert code == 0, out[-3000:]
    plan = json.loads(out[out.index("{"):])
    # like="flux": FLUX.1-dev's full-size transformer and encoders; the control tokens come from its own hook
    assert plan["family"] == FAMILY and plan["architecture"] == f"registry ({FAMILY})"
    assert plan["breakdown_gib"]["base_weights"] > 40  # 11.9e9 parameters in float32 (the quick start's dtype)


def test_sample_takes_the_guidance_of_the_family_it_is_like(package: Path, run: Path):
    common = ["sample", "--model", f"tiny:{FAMILY}", "--slow", str(run / "slow"), "--fast", str(run / "fast"),
              "--prompt", "Make the ball red", "--control", "data/control/ball.png"]
    code, out = glance(package, *common, "--guidance", "2.5", "--output", "images")
    assert code == 0, out[-3000:]
    (image,) = (package / "images").glob("*.png")
    assert json.loads(Image.open(image).text["glance"])["family"] == FAMILY
    code, out = glance(package, *common, "--guidance-scale", "3", "--output", "refused")
    assert code == 2 and "--guidance-scale 3: kontext-example has no classifier-free guidance" in out, out
    assert not (package / "refused").exists()
    code, out = glance(package, "sample", "--help")
    assert code == 0 and FAMILY in out  # the entry point puts it among the --family choices


def test_export_comfyui_uses_the_layout_of_the_family_it_is_like(package: Path, run: Path):
    target = package / "slow_comfyui.safetensors"
    code, out = glance(package, "export", "--lora", str(run / "slow"), "--format", "comfyui", "--output",
                       str(target))
    assert code == 0, out[-3000:]
    with safe_open(target, "pt") as f:
        keys = set(f.keys())
    assert "diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight" in keys  # FLUX's fused q/k/v


def test_the_testing_kits_contract_passes_for_the_outside_family(package: Path, run: Path):
    env = {**os.environ, "PYTHONPATH": str(package), "HF_HUB_OFFLINE": "1"}
    done = run_reaped([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_contract.py"], 280,
                      cwd=package, env=env)
    assert done.returncode == 0, done.stdout[-4000:]
    checks = sum(name.startswith("test_") for name in dir(FamilyContract)) + 1  # and the package's own test
    assert f"\n{checks} passed" in done.stdout, done.stdout[-2000:]
