"""What gets installed: datamodules/ and callbacks/ ship as glance_lightning.datamodules / .callbacks, nothing
generic at top level; the tested environment is the one constraints.txt pins, and pyproject keeps ranges."""

from __future__ import annotations

import os
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import glance_lightning.callbacks
import glance_lightning.datamodules
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from reaping import run_reaped


def test_editable_install_maps_the_root_folders(repo: Path):
    assert Path(glance_lightning.datamodules.__file__).parent == repo / "datamodules"
    assert Path(glance_lightning.callbacks.__file__).parent == repo / "callbacks"


def test_wheel_contains_only_the_glance_lightning_package(repo: Path, tmp_path: Path):
    done = run_reaped([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(repo)],
                      timeout=240)
    assert done.returncode == 0, done.stdout
    (wheel,) = tmp_path.glob("glance_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith("glance_lightning/") for n in code)
    for expected in ("glance_lightning/datamodules/glance.py", "glance_lightning/callbacks/samples.py",
                     "glance_lightning/assets/samples/t2i/red_ball.png", "glance_lightning/families/flux.py",
                     "glance_lightning/commands/sample.py", "glance_lightning/tiny/builders.py",
                     "glance_lightning/planner/measured_steps.json"):
        assert expected in names


# ------------------------------------------------------------- reproducible installs (constraints.txt)
SENSITIVE = ("diffusers", "transformers", "peft", "lightning", "bitsandbytes", "torchao")


def _pins(path: Path) -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {canonicalize_name(name): version for name, version in (line.split("==") for line in lines if line)}


def _requirement_closure(root: str = "glance-lightning", extras: tuple[str, ...] = ("dev",)) -> dict[str, str]:
    """Every distribution the project needs with the given extras, transitively: name -> installed version."""
    found: dict[str, str] = {}
    todo, seen = [(root, extra) for extra in ("", *extras)], set()
    while todo:
        name, extra = todo.pop()
        if (canonicalize_name(name), extra) in seen:
            continue
        seen.add((canonicalize_name(name), extra))
        dist = metadata.distribution(name)
        found[canonicalize_name(name)] = dist.version
        for text in dist.requires or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                if requirement.marker is None and extra:
                    continue  # an unconditional requirement: already taken with extra ""
                todo += [(requirement.name, e) for e in ("", *requirement.extras)]
    found.pop(canonicalize_name(root))
    return found


def test_the_tested_environment_is_the_pinned_one(repo: Path):
    """Every package the project and its tests need is installed at exactly the version constraints.txt pins
    (.ci/run points GLANCE_LIGHTNING_CONSTRAINTS at fresh pins when it checks the newest releases)."""
    pins = _pins(Path(os.environ.get("GLANCE_LIGHTNING_CONSTRAINTS", repo / "constraints.txt")))
    needed = _requirement_closure()
    assert {"torch", "transformers", "kernels", "pytest-timeout", "bitsandbytes"} <= needed.keys()
    wrong = {name: (version, pins.get(name)) for name, version in needed.items()
             if Version(version).public != pins.get(name)}
    assert not wrong, ("installed (version, pinned) differ; install with `pip install -c constraints.txt -e .[dev]`"
                       f" or refresh the pins (docs/training.md, 'Upgrading dependencies'): {wrong}")


def test_freeze_pins_every_installed_package_without_local_labels(repo: Path, tmp_path: Path):
    out = tmp_path / "constraints.txt"
    done = run_reaped([sys.executable, str(repo / ".ci" / "freeze.py"), str(out)], timeout=120)
    assert done.returncode == 0, done.stdout
    pins = _pins(out)
    for name, version in _requirement_closure().items():
        assert pins[name] == Version(version).public
    assert "glance-lightning" not in pins and "+" not in "".join(pins.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["constraints.txt"]  # written via a temporary, renamed


def test_pyproject_keeps_ranges_with_upper_bounds_on_the_fast_moving_packages():
    requirements = [Requirement(r) for r in metadata.requires("glance-lightning")]
    for name in SENSITIVE:
        (requirement,) = [r for r in requirements if canonicalize_name(r.name) == name]
        operators = {spec.operator for spec in requirement.specifier}
        assert "<" in operators and ">=" in operators and "==" not in operators, requirement


def test_readme_command_1_and_ci_install_the_pinned_versions_and_run_the_readme_test_command(repo: Path):
    readme = (repo / "README.md").read_text()
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    install = next(line for line in block.splitlines() if "pip install" in line)
    assert "-c constraints.txt" in install and "fit --config configs/quickstart.yaml" in install
    test_command = next(line for line in block.splitlines() if "pytest" in line).strip()
    ci = (repo / ".ci" / "run").read_text()
    assert test_command in ci and '-c constraints.txt -e ".[dev]"' in ci
