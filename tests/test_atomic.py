"""Nothing half-written: a full disk mid-write leaves the previous file intact and loadable, no temporary file
behind, and the disk-full error is the one reported; written files honour the umask; the free-space check
counts checkpoints; a failed save in the keep-LoRAs handler never hides the error that ended the run."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import pytest
import torch
from glance_lightning.callbacks.samples import save_png_atomic
from glance_lightning.datamodules.glance import GlanceDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from PIL import Image
from safetensors.torch import load_file

from glance_lightning import atomic
from glance_lightning.atomic import AtomicCheckpointIO, atomic_write, install_checkpoint_io, write_bytes
from glance_lightning.encode_store import EncodeStore
from glance_lightning.errors import DiskSpaceError
from glance_lightning.families.flux import FluxGlance
from glance_lightning.families.preflight import SpaceNeed, check_free_space, checkpoint_needs
from glance_lightning.lora_io import LORA_WEIGHT_NAME, read_glance_metadata, save_lora
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings

pytestmark = pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="finds a write's file in /proc")

SLOW = [1000.0, 986.9786, 973.2042, 958.6094, 943.1188]
FAST = [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]


def make(out: Path, steps: int = 3) -> FluxGlance:
    return FluxGlance(
        pretrained_model="tiny:flux", timesteps=TimestepSettings(slow=SLOW, fast=FAST), slow_steps=steps,
        fast_steps=steps, lora=LoraSettings(rank=4, alpha=8), optimizer=OptimizerSettings(lr=1e-2, warmup_steps=2),
        max_sequence_length=16, output_dir=str(out),
    )


def data(repo: Path) -> GlanceDataModule:
    return GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=64, batch_size=1)


def trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=root, enable_checkpointing=False, max_epochs=-1)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


class StopAt(L.Callback):
    def __init__(self, step: int, exception: type[BaseException]) -> None:
        self.step, self.exception = step, exception

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            raise self.exception()


class FullDisk:
    """``os.write`` fails with ENOSPC once ``after`` bytes went to a temporary file (``.<name>.*.tmp``) whose
    target name starts with ``prefix``, while ``armed``: the disk fills up in the middle of that file."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, prefix: str = "", after: int = 100,
                 armed: bool = True) -> None:
        self.real, self.prefix, self.after, self.armed = os.write, prefix, after, armed
        self.written: dict[str, int] = {}
        self.failures = 0
        monkeypatch.setattr(os, "write", self)

    def __call__(self, fd: int, data: bytes) -> int:
        if self.armed:
            try:
                name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                name = ""
            if name.startswith(f".{self.prefix}") and name.endswith(".tmp"):
                done = self.written.get(name, 0)
                if done + len(data) > self.after:
                    self.failures += 1
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                self.written[name] = done + len(data)
        return self.real(fd, data)


def temporaries(*folders: Path) -> list[Path]:
    return [p for folder in folders if folder.exists() for p in folder.rglob("*.tmp")]


def assert_disk_full(err: BaseException, name: str) -> None:
    assert isinstance(err, DiskSpaceError) and err.errno == errno.ENOSPC
    assert name in str(err) and "disk full" in str(err)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    previous = os.umask(mask)
    try:
        yield
    finally:
        os.umask(previous)


def lora_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"blocks.0.to_q.lora_A.weight": torch.randn(4, 32, generator=g),
            "blocks.0.to_q.lora_B.weight": torch.randn(32, 4, generator=g)}


LORA_CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q"]}


# ---------------------------------------------------------------------------------------------- the writer


def test_a_failed_write_keeps_the_previous_file_and_reports_the_disk_full(tmp_path: Path, monkeypatch):
    target = tmp_path / "file.bin"
    write_bytes(target, b"old" * 100)
    FullDisk(monkeypatch, "file.bin")
    with pytest.raises(DiskSpaceError) as info:
        write_bytes(target, b"new" * 1000)
    assert_disk_full(info.value, str(target))
    assert target.read_bytes() == b"old" * 100
    assert temporaries(tmp_path) == []


def test_an_interrupted_write_keeps_the_previous_file_and_propagates_as_it_is(tmp_path: Path):
    target = tmp_path / "file.txt"
    target.write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_write(target, "w") as f:
        f.write("half")
        raise KeyboardInterrupt
    assert target.read_text() == "old" and temporaries(tmp_path) == []


def test_a_folder_that_cannot_be_written_names_the_file(tmp_path: Path, monkeypatch):
    from glance_lightning.errors import UnwritableError

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(UnwritableError, match=r"cannot write .*x\.bin: permission denied"):
        write_bytes(tmp_path / "x.bin", b"x")


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_honour_the_umask(tmp_path: Path, mask: int, mode: int):
    with umask(mask):
        files = [write_bytes(tmp_path / "plain.bin", b"x"),
                 save_lora(tmp_path / "lora", lora_state(0), LORA_CONFIG, {"phase": "slow"})]
        save_png_atomic(Image.new("RGB", (8, 8)), tmp_path / "sample.png")
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "ckpt" / "last.ckpt")
        store = EncodeStore(tmp_path / "cache", {"model": "m"})
        store.put(store.key("latents", image="a"), {"x": torch.zeros(3)})
    files += [tmp_path / "sample.png", tmp_path / "ckpt" / "last.ckpt", *(tmp_path / "cache").iterdir()]
    assert len(files) == 5
    assert {oct(f.stat().st_mode & 0o777) for f in files} == {oct(mode)}


# ---------------------------------------------------------------------------------------------- each kind of file


def test_a_full_disk_while_saving_a_lora_keeps_the_previous_one(tmp_path: Path, monkeypatch):
    path = save_lora(tmp_path / "slow", lora_state(0), LORA_CONFIG, {"phase": "slow"})
    before = load_file(path)
    FullDisk(monkeypatch, LORA_WEIGHT_NAME)
    with pytest.raises(DiskSpaceError) as info:
        save_lora(tmp_path / "slow", lora_state(1), LORA_CONFIG, {"phase": "slow"})
    assert_disk_full(info.value, str(path))
    after = load_file(path)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert read_glance_metadata(path)["phase"] == "slow"
    assert temporaries(tmp_path) == []


def test_a_full_disk_while_saving_a_sample_keeps_the_previous_png(tmp_path: Path, monkeypatch):
    path = tmp_path / "samples" / "step000010_p0_s0.png"
    old = Image.new("RGB", (64, 64), (10, 20, 30))
    save_png_atomic(old, path, {"glance": "{}"})
    FullDisk(monkeypatch, path.name)
    noise = Image.frombytes("RGB", (64, 64), os.urandom(64 * 64 * 3))
    with pytest.raises(DiskSpaceError) as info:
        save_png_atomic(noise, path, {"glance": "{}"})
    assert_disk_full(info.value, path.name)
    with Image.open(path) as img:
        assert img.getpixel((5, 5)) == (10, 20, 30)
    assert temporaries(tmp_path) == []


def test_a_full_disk_while_caching_keeps_the_previous_entry_and_leaves_no_half_entry(tmp_path: Path, monkeypatch):
    store = EncodeStore(tmp_path / "cache", {"model": "m"})
    kept, new = store.key("condition", prompt="a"), store.key("condition", prompt="b")
    store.put(kept, {"embeds": torch.ones(256)})
    disk = FullDisk(monkeypatch)
    for key in (kept, new):
        with pytest.raises(DiskSpaceError):
            store.put(key, {"embeds": torch.zeros(256)})
    assert disk.failures == 2
    assert torch.equal(store.get(kept)["embeds"], torch.ones(256))
    assert not store.has(new) and store.get(new) is None
    assert temporaries(tmp_path) == []


class ArmAt(L.Callback):
    """Arm a FullDisk at the end of step ``step``, before ModelCheckpoint (Lightning runs it last) saves."""

    def __init__(self, step: int, disk: FullDisk) -> None:
        self.step, self.disk = step, disk

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        self.disk.armed = trainer.global_step == self.step


def test_a_full_disk_while_checkpointing_keeps_the_previous_last_ckpt(repo: Path, tmp_path: Path, monkeypatch,
                                                                      capsys):
    ckpt_dir, out = tmp_path / "ckpt", tmp_path / "out"
    disk = FullDisk(monkeypatch, "last.ckpt", after=4096, armed=False)
    t = trainer(tmp_path, enable_checkpointing=True, callbacks=[
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_last=True), ArmAt(4, disk)])
    with pytest.raises(DiskSpaceError) as info:
        t.fit(make(out), data(repo))
    assert_disk_full(info.value, str(ckpt_dir / "last.ckpt"))
    assert disk.failures == 1
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    previous = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=False)
    assert previous["global_step"] == 2 and any("lora_" in k for k in previous["state_dict"])
    assert temporaries(tmp_path) == []
    # the keep-LoRAs handler still saved the LoRAs of the step the checkpoint failed at
    assert read_glance_metadata(out / "fast")["trained_steps"] == 1
    assert "saved the LoRAs of step 4" in capsys.readouterr().out


def test_checkpoint_plugin_removes_a_checkpoint_and_its_leftover_temporaries(tmp_path: Path):
    io = AtomicCheckpointIO()
    path = tmp_path / "epoch=0-step=2.ckpt"
    io.save_checkpoint({"global_step": 2}, path)
    assert io.load_checkpoint(path)["global_step"] == 2
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                           timeout=60, check=True)
    dead = tmp_path / f".{path.name}.{atomic._host_tag()}-{ended.stdout.strip()}-0badc0de.tmp"
    dead.write_bytes(b"half")  # a save killed by SIGKILL (its process is gone)
    keep = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 2}, keep)
    io.remove_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]


# ---------------------------------------------------------------------------------------------- installing the plugin


class OwnCheckpointIO(TorchCheckpointIO):
    pass


def test_the_checkpoint_plugin_replaces_only_lightnings_default():
    single = L.Trainer(accelerator="cpu", logger=False)
    assert install_checkpoint_io(single.strategy) and type(single.strategy.checkpoint_io) is AtomicCheckpointIO
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", logger=False)
    assert install_checkpoint_io(ddp.strategy) and type(ddp.strategy.checkpoint_io) is AtomicCheckpointIO
    wrapped = L.Trainer(accelerator="cpu", logger=False, plugins=[AsyncCheckpointIO()])
    assert install_checkpoint_io(wrapped.strategy)
    assert type(wrapped.strategy.checkpoint_io.checkpoint_io) is AtomicCheckpointIO
    for own in (OwnCheckpointIO(), AsyncCheckpointIO(OwnCheckpointIO())):
        user = L.Trainer(accelerator="cpu", logger=False, plugins=[own])
        assert not install_checkpoint_io(user.strategy) and user.strategy.checkpoint_io is own
    assert type(own.checkpoint_io) is OwnCheckpointIO


# ---------------------------------------------------------------------------------------------- the keep-LoRAs handler


@pytest.mark.parametrize(("raised", "expected"), [(KeyboardInterrupt, SystemExit), (RuntimeError, RuntimeError)])
def test_a_failing_save_on_failure_never_hides_the_error_that_ended_the_run(repo: Path, tmp_path: Path, monkeypatch,
                                                                            capsys, raised, expected):
    def disk_full(self, directory=None):
        raise DiskSpaceError(f"cannot write {self.lora_dir}/slow/{LORA_WEIGHT_NAME}: disk full")

    monkeypatch.setattr(FluxGlance, "save_loras", disk_full)
    with pytest.raises(expected) as info:
        trainer(tmp_path, callbacks=[StopAt(2, raised)]).fit(make(tmp_path / "out"), data(repo))
    assert not isinstance(info.value, DiskSpaceError)
    printed = capsys.readouterr().out
    assert f"{raised.__name__}: could not save the LoRAs of step 2" in printed and "disk full" in printed


# ---------------------------------------------------------------------------------------------- free space


def test_free_space_counts_the_checkpoints_kept(tmp_path: Path, monkeypatch):
    t = L.Trainer(accelerator="cpu", logger=False, default_root_dir=tmp_path, callbacks=[
        ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=10, save_top_k=2, save_last=True,
                        monitor="train/loss_slow"),
        ModelCheckpoint(dirpath=tmp_path / "all", every_n_train_steps=10, save_top_k=-1)])
    size = 3 * 1000 + 64 * 1024
    needs = checkpoint_needs(t, adapter_bytes=1000, total_steps=40)
    assert needs == [SpaceNeed(tmp_path / "ckpt", (2 + 1 + 1) * size, needs[0].what),
                     SpaceNeed(tmp_path / "all", (4 + 1) * size, needs[1].what)]
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=2000 + needs[0].need_bytes))
    check_free_space(tmp_path / "out", 2000, needs[:1])  # the LoRAs and one callback's files fit
    with pytest.raises(DiskSpaceError, match=rf"has .* MiB free but .*checkpoint\(s\).* in {tmp_path / 'all'}"):
        check_free_space(tmp_path / "out", 2000, needs)


def test_a_fit_whose_checkpoints_would_not_fit_is_refused_before_training(repo: Path, tmp_path: Path, monkeypatch):
    real = shutil.disk_usage
    lora_bytes: list[int] = []

    def lora_sized_disk(path):
        return real(path)._replace(free=lora_bytes[0] + 1024 if lora_bytes else 10)

    monkeypatch.setattr(shutil, "disk_usage", lora_sized_disk)
    ckpt_dir = tmp_path / "checkpoints_elsewhere"

    def fit(out: Path) -> FluxGlance:
        module = make(out)
        t = trainer(tmp_path, enable_checkpointing=True,
                    callbacks=[ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=1, save_top_k=-1)])
        with pytest.raises(DiskSpaceError, match=f"checkpoint\\(s\\).* in {ckpt_dir}") as info:
            t.fit(module, data(repo))
        assert t.global_step == 0 and not (out / "slow").exists() and not ckpt_dir.exists()
        return module, info.value

    module, _ = fit(tmp_path / "a")
    lora_bytes.append(2 * sum(p.numel() * p.element_size() for phase in ("slow", "fast")
                              for p in module.adapter_parameters(phase)))
    _, err = fit(tmp_path / "b")  # room for both LoRAs, not for the 6 checkpoints beside them
    assert "6 checkpoint(s)" in str(err)  # one per step; "both LoRAs" alone would fit
