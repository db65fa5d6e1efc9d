"""Temporary files of killed saves: removed by the next run that writes in their folder once their writer is gone
(its pid, or on another host its lock and a minute), never while a write is going on, never a file of another
name; a LoRA folder holding only such files is no earlier result."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
from glance_lightning.datamodules.glance import GlanceDataModule

from glance_lightning import atomic
from glance_lightning.atomic import atomic_write, remove_leftovers, writer_gone
from glance_lightning.commands.export import run_export_command
from glance_lightning.commands.sample import run_sample_command
from glance_lightning.encode_store import EncodeStore
from glance_lightning.families.flux import FluxGlance
from glance_lightning.lora_io import LORA_WEIGHT_NAME, read_glance_metadata
from glance_lightning.settings import LoraSettings, TimestepSettings

import reaping

SLOW = [1000.0, 986.9786, 973.2042, 958.6094, 943.1188]
FAST = [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]
# A process that starts a write and then ends without finishing it (as SIGKILL would); prints the temporary file.
KILLED_WRITER = """
import os, sys
from pathlib import Path
from glance_lightning.atomic import _temporary_beside
tmp, fd = _temporary_beside(Path(sys.argv[1]))
os.write(fd, b"half")
print(tmp, flush=True)
if len(sys.argv) > 2:
    import time; time.sleep(120)
os._exit(0)
"""


def killed_write(target: Path) -> Path:
    done = reaping.run_reaped([sys.executable, "-c", KILLED_WRITER, str(target)], timeout=120)
    return Path(done.stdout.strip().splitlines()[-1])


def foreign(folder: Path, name: str, age_s: float) -> Path:
    """A temporary file as another host's writer names it, last written ``age_s`` ago."""
    other = "0123abcd" if atomic._host_tag() != "0123abcd" else "abcd0123"
    path = folder / f".{name}.{other}-1-deadbeef.tmp"
    path.write_bytes(b"half")
    os.utime(path, (time.time() - age_s, time.time() - age_s))
    return path


def test_a_dead_writers_temporary_is_removed_and_the_file_beside_it_kept(tmp_path: Path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"the previous, whole file")
    tmp = killed_write(target)
    assert tmp.parent == tmp_path and tmp.name.startswith(".model.safetensors.") and tmp.exists()
    assert writer_gone(tmp)
    assert remove_leftovers(tmp_path) == [tmp]
    assert not tmp.exists() and target.read_bytes() == b"the previous, whole file"


def test_a_write_going_on_is_never_removed(tmp_path: Path):
    with atomic_write(tmp_path / "mine.bin") as f:  # this process, mid-write
        f.write(b"x")
        f.flush()
        assert remove_leftovers(tmp_path) == [] and len(list(tmp_path.glob(".mine.bin.*.tmp"))) == 1
    assert (tmp_path / "mine.bin").read_bytes() == b"x"
    cmd = [sys.executable, "-c", KILLED_WRITER, str(tmp_path / "theirs.bin"), "wait"]
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, start_new_session=True) as other:
        try:
            tmp = Path(other.stdout.readline().strip())  # another live process, mid-write
            assert tmp.exists() and not writer_gone(tmp) and remove_leftovers(tmp_path) == []
        finally:
            reaping.end(other)
    assert remove_leftovers(tmp_path) == [tmp]  # now its writer is gone


def test_other_hosts_temporaries_go_only_when_unlocked_and_a_minute_old(tmp_path: Path):
    fresh, old, locked = (foreign(tmp_path, n, age) for n, age in (("a", 5), ("b", 120), ("c", 120)))
    fd = os.open(locked, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # its writer, on the other host, still writing
        assert remove_leftovers(tmp_path) == [old]
    finally:
        os.close(fd)
    assert fresh.exists() and locked.exists()
    assert remove_leftovers(tmp_path) == [locked]


def test_files_of_other_names_are_never_touched(tmp_path: Path):
    keep = [tmp_path / ".notes.tmp", tmp_path / ".draft.v2.tmp", tmp_path / "x.tmp", tmp_path / ".a.b.1234abcd.tmp"]
    for path in keep:
        path.write_text("the user's")
        os.utime(path, (0, 0))
    assert remove_leftovers(tmp_path, recursive=True) == []
    assert all(p.exists() for p in keep)


def test_a_lora_folder_holding_only_a_killed_save_is_trained_into(repo: Path, tmp_path: Path):
    out = tmp_path / "out"
    tmp = killed_write(out / "slow" / LORA_WEIGHT_NAME)  # the first save of an earlier run, killed
    module = FluxGlance(pretrained_model="tiny:flux", timesteps=TimestepSettings(slow=SLOW, fast=FAST),
                        slow_steps=1, fast_steps=1, lora=LoraSettings(rank=4, alpha=4), max_sequence_length=16,
                        output_dir=str(out))
    data = GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=64)
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              enable_checkpointing=False, default_root_dir=tmp_path).fit(module, data)
    assert not tmp.exists()
    assert read_glance_metadata(out / "slow")["trained_steps"] == 1


def test_the_encode_cache_export_and_sample_folders_are_cleaned_when_next_used(tmp_path: Path, quickstart_run):
    cache = tmp_path / "cache"
    entry = killed_write(cache / ("0" * 64 + ".safetensors"))
    EncodeStore(cache, {"model": "m"})
    assert not entry.exists()

    run = quickstart_run("configs/quickstart.yaml")  # shared: read only
    hub = tmp_path / "hub"
    leftover = killed_write(hub / "slow" / LORA_WEIGHT_NAME)  # an `export --hub` killed while writing
    assert run_export_command(["--lora", str(run), "--hub", str(hub)]) == 0
    assert not leftover.exists() and (hub / "slow" / LORA_WEIGHT_NAME).is_file()

    out = tmp_path / "images"
    leftover = killed_write(out / "p0_s0.png")  # a `sample` killed while writing its first image
    argv = ["--model", "tiny:flux", "--slow", str(run / "slow"), "--fast", str(run / "fast"), "--prompt", "x",
            "--height", "64", "--width", "64", "--output", str(out)]
    assert run_sample_command(argv) == 0
    assert not leftover.exists() and [p.name for p in out.iterdir()] == ["p0_s0.png"]
