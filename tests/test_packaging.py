"""datamodules/ and callbacks/ ship as glance_lightning.datamodules / .callbacks; nothing generic at top level."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import glance_lightning.callbacks
import glance_lightning.datamodules


def test_editable_install_maps_the_root_folders(repo: Path):
    assert Path(glance_lightning.datamodules.__file__).parent == repo / "datamodules"
    assert Path(glance_lightning.callbacks.__file__).parent == repo / "callbacks"


def test_wheel_contains_only_the_glance_lightning_package(repo: Path, tmp_path: Path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(repo)],
                   check=True, capture_output=True)
    (wheel,) = tmp_path.glob("glance_lightning-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if ".dist-info/" not in n]
    assert code and all(n.startswith("glance_lightning/") for n in code)
    for expected in ("glance_lightning/datamodules/glance.py", "glance_lightning/callbacks/samples.py",
                     "glance_lightning/assets/samples/t2i/red_ball.png", "glance_lightning/families/flux.py",
                     "glance_lightning/commands/sample.py", "glance_lightning/tiny/builders.py"):
        assert expected in names
