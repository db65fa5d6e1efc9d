"""Faults and resume: exact resume, NaN stop, Ctrl-C, DDP on two CPU processes, small checkpoints, bad dirs."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import pytest
import torch
from glance_lightning.datamodules.glance import GlanceDataModule
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file

from glance_lightning.families.base import NonFiniteLossError
from glance_lightning.families.flux import FluxGlance
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.settings import LoraSettings, OptimizerSettings, TimestepSettings

SLOW = [1000.0, 986.9786, 973.2042, 958.6094, 943.1188]
FAST = [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]


def make(out: Path, steps: int = 3, **kwargs) -> FluxGlance:
    return FluxGlance(
        pretrained_model="tiny:flux", timesteps=TimestepSettings(slow=SLOW, fast=FAST), slow_steps=steps,
        fast_steps=steps, lora=LoraSettings(rank=4, alpha=8), optimizer=OptimizerSettings(lr=1e-2, warmup_steps=2),
        max_sequence_length=16, output_dir=str(out), **kwargs,
    )


def data(repo: Path, batch_size: int = 1) -> GlanceDataModule:
    return GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=64,
                            batch_size=batch_size)


def trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    default_root_dir=root, enable_checkpointing=False, gradient_clip_val=1.0)
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def loras(out: Path) -> dict[str, torch.Tensor]:
    return {f"{p}/{k}": v for p in ("slow", "fast")
            for k, v in load_file(out / p / "pytorch_lora_weights.safetensors").items()}


class StopAt(L.Callback):
    def __init__(self, step: int, exception: type[BaseException]) -> None:
        self.step, self.exception = step, exception

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if trainer.global_step == self.step:
            raise self.exception()


def test_interrupted_and_resumed_run_ends_with_the_same_loras(repo: Path, tmp_path: Path):
    L.seed_everything(0)
    trainer(tmp_path / "a").fit(make(tmp_path / "a_out"), data(repo, batch_size=2))
    reference = loras(tmp_path / "a_out")

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    with pytest.raises(SystemExit):
        trainer(tmp_path / "b", enable_checkpointing=True, callbacks=[ckpt, StopAt(3, KeyboardInterrupt)]).fit(
            make(tmp_path / "b_out"), data(repo, batch_size=2))
    L.seed_everything(123)  # the resumed process may be seeded differently: the checkpoint decides
    resumed = trainer(tmp_path / "c")
    checkpoint = str(tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    resumed.fit(make(tmp_path / "b_out"), data(repo, batch_size=2), ckpt_path=checkpoint)
    assert resumed.global_step == 6
    result = loras(tmp_path / "b_out")
    assert reference and result.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(result[key], reference[key], atol=1e-5, rtol=1e-4)


def test_ctrl_c_saves_the_current_loras(repo: Path, tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        trainer(tmp_path, callbacks=[StopAt(2, KeyboardInterrupt)]).fit(make(tmp_path / "out"), data(repo))
    meta = read_glance_metadata(tmp_path / "out" / "slow")
    assert meta["trained_steps"] == 2
    assert "saved the LoRAs of step 2" in capsys.readouterr().out


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_loras(repo: Path, tmp_path: Path, monkeypatch):
    module = make(tmp_path / "out")
    original = FluxGlance.predict_velocity

    def poisoned(self, noisy, sigma, cond):
        out = original(self, noisy, sigma, cond)
        return out * float("nan") if self.global_step == 4 else out

    monkeypatch.setattr(FluxGlance, "predict_velocity", poisoned)
    with pytest.raises(NonFiniteLossError, match="step 4 .*fast phase.*last good LoRAs"):
        trainer(tmp_path).fit(module, data(repo))
    saved = loras(tmp_path / "out")
    assert all(torch.isfinite(v).all() for v in saved.values())
    assert read_glance_metadata(tmp_path / "out" / "fast")["trained_steps"] == 1


def test_checkpoint_holds_trainable_weights_and_optimizer_only(repo: Path, tmp_path: Path):
    module = make(tmp_path / "out", steps=1)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    trainer(tmp_path, enable_checkpointing=True, callbacks=[ckpt]).fit(module, data(repo))
    trainable = sum(p.numel() * 4 for phase in ("slow", "fast") for p in module.adapter_parameters(phase))
    frozen = sum(p.numel() * 4 for n, p in module.transformer.named_parameters() if "lora_" not in n)
    size = Path(ckpt.best_model_path).stat().st_size
    assert size < 3 * trainable + 64 * 1024  # weights + two AdamW moments + bookkeeping
    assert size < frozen / 2


def test_output_dir_that_cannot_be_created_fails_before_training(repo: Path, tmp_path: Path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="model.output_dir"):
        trainer(tmp_path).fit(make(blocker / "sub"), data(repo))


def test_full_disk_is_reported_before_training(repo: Path, tmp_path: Path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=10))
    with pytest.raises(OSError, match="MiB free"):
        trainer(tmp_path).fit(make(tmp_path / "out"), data(repo))
    assert not (tmp_path / "out" / "slow").exists()


class RecordRankWeights(L.Callback):
    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        state = {n: p.detach().clone() for n, p in pl_module.transformer.named_parameters() if "lora_" in n}
        torch.save(state, self.folder / f"rank{trainer.global_rank}.pt")


def test_ddp_on_two_cpu_processes_trains_both_adapters_identically_and_saves_once(repo: Path, tmp_path: Path):
    out = tmp_path / "out"
    t = trainer(tmp_path, devices=2, strategy="ddp_spawn_find_unused_parameters_true",
                callbacks=[RecordRankWeights(tmp_path)])
    t.fit(make(out, steps=2), data(repo))
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for name, value in ranks[0].items():
        torch.testing.assert_close(ranks[1][name], value)  # gradients of BOTH phases were all-reduced
    assert any(v.abs().sum() > 0 for n, v in ranks[0].items() if "lora_B.fast" in n)
    assert read_glance_metadata(out / "fast")["trained_steps"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["fast", "slow"]


def test_plain_ddp_without_find_unused_parameters_is_refused(repo: Path, tmp_path: Path):
    from torch.multiprocessing.spawn import ProcessRaisedException

    with pytest.raises((ValueError, ProcessRaisedException), match="ddp_find_unused_parameters_true"):
        trainer(tmp_path, devices=2, strategy="ddp_spawn").fit(make(tmp_path / "out"), data(repo))


def test_sharding_strategies_are_refused_with_the_alternatives(tmp_path: Path):
    from lightning.pytorch.strategies import FSDPStrategy

    from glance_lightning.families.preflight import check_strategy

    with pytest.raises(ValueError, match="FSDPStrategy is not supported.*strategy: fsdp2.*ddp_find_unused_param"):
        check_strategy(FSDPStrategy())  # Lightning allows FSDP on CUDA only, so it is checked directly


def test_missing_model_path_names_the_setting(repo: Path, tmp_path: Path):
    module = FluxGlance(pretrained_model=str(tmp_path / "no-such-model"),
                        timesteps=TimestepSettings(slow=SLOW, fast=FAST), output_dir=str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="model.pretrained_model"):
        trainer(tmp_path).fit(module, data(repo))


def test_a_resolution_the_family_cannot_take_names_the_setting(repo: Path, tmp_path: Path):
    odd = GlanceDataModule(path=str(repo / "glance_lightning/assets/samples/t2i"), resolution=72, size_multiple=8)
    with pytest.raises(ValueError, match="data.size_multiple"):
        trainer(tmp_path).fit(make(tmp_path / "out"), odd)


class RecordingModule:
    def __init__(self) -> None:
        self.moves: list[str] = []

    def to(self, device) -> RecordingModule:
        self.moves.append(str(device))
        return self


@pytest.mark.parametrize("offload", [True, False])
def test_encoders_visit_the_accelerator_once_and_leave_it(tmp_path: Path, monkeypatch, offload: bool):
    module = make(tmp_path / "out", offload_encoders=offload)
    encoders = [RecordingModule(), RecordingModule()]
    monkeypatch.setattr(module, "_encoders", lambda: encoders)
    module._device = torch.device("cuda", 0)  # the placement logic only; nothing is allocated
    with module.encoders_on_device(), module.encoders_on_device():  # nested use (cache miss inside a build)
        assert all(e.moves == ["cuda:0"] for e in encoders)
    assert all(e.moves == (["cuda:0", "cpu"] if offload else ["cuda:0"]) for e in encoders)
