"""The forward data path: what a DataModule hands a Glance module, and each step's random draws.

``GlanceData`` is the protocol a DataModule meets: typed ``train_samples`` (each encoded once by the module) and
a ``train_dataloader`` whose batches carry that step's draws. ``StepDraws`` is that loader: one batch per
micro-batch, holding for each sample of it the training-sample index, the index into the phase's timestep list,
the caption-dropout flag and a noise seed, as plain Python lists (host data: Lightning moves no tensor to the
device for them and the training step reads them without a device sync). Every draw is a pure function of
(seed, optimizer step, micro-batch, position in the global micro-batch): each step draws the whole global
micro-batch (``world_size`` x ``batch_size`` samples) and each rank takes its slice, so a resumed run draws
exactly what the uninterrupted run drew, ranks draw differently, and N ranks at batch size B draw what one device
at batch size N x B draws (a run resumed on another number of devices continues the same stream, and keeps the
same steps if the global batch is kept). The stream starts at the trainer's step when it is iterated, so a
resumed fit continues it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class TrainSample:
    """One training pair loaded at training resolution; pixels in [-1, 1], [3, H, W]."""

    image: Path
    caption: str
    pixels: torch.Tensor
    controls: tuple[torch.Tensor, ...] = ()
    control_paths: tuple[Path, ...] = ()  # the control images' files, where they come from files


Draws = dict[str, Any]  # "step": int; "index", "choice", "noise_seed": list[int]; "drop": list[bool]


@runtime_checkable
class GlanceData(Protocol):
    """What a Glance module reads of its DataModule."""

    train_samples: Sequence[TrainSample]
    resolution: int

    def train_dataloader(self) -> Iterable[Draws]: ...


@dataclass(frozen=True)
class DrawSpec:
    """What the module's settings fix about the draws (``GlanceModule.draw_spec()``)."""

    seed: int
    phase_steps: tuple[int, int]  # optimizer steps of the Slow and the Fast phase
    list_lengths: tuple[int, int]  # entries of the Slow and the Fast timestep list
    caption_dropout: float

    def list_length(self, step: int) -> int:
        return self.list_lengths[0] if step < self.phase_steps[0] else self.list_lengths[1]

    @property
    def total_steps(self) -> int:
        return sum(self.phase_steps)


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    """The generator of one global micro-batch: a pure function of (seed, optimizer step, micro-batch)."""
    key = (seed * 1_000_003 + step) * 4099 + micro * 131
    return torch.Generator(device="cpu").manual_seed(key % (2**63 - 1))


def draw_micro_batch(spec: DrawSpec, step: int, micro: int, rank: int, size: int, num_samples: int,
                     world: int = 1) -> Draws:
    """The draws of rank ``rank``'s ``size`` samples of one global micro-batch of ``world`` x ``size``."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} of a world of {world}")
    gen, total = step_generator(spec.seed, step, micro), world * size
    mine = slice(rank * size, (rank + 1) * size)
    return {
        "step": step,
        "index": torch.randint(num_samples, (total,), generator=gen)[mine].tolist(),
        "drop": (torch.rand(total, generator=gen) < spec.caption_dropout)[mine].tolist(),
        "choice": torch.randint(spec.list_length(step), (total,), generator=gen)[mine].tolist(),
        "noise_seed": torch.randint(2**62, (total,), generator=gen)[mine].tolist(),
    }


class StepDraws:
    """The draws of every remaining micro-batch of the run on one rank, from the step ``start()`` returns.

    A plain iterable, not a DataLoader: Lightning then adds no sampler (each rank draws its own) and moves
    nothing; its length is the whole run's, as Lightning counts the batches a resumed epoch already had."""

    def __init__(self, spec: DrawSpec, num_samples: int, batch_size: int, accumulate: int = 1, rank: int = 0,
                 start: Callable[[], int] = lambda: 0, world: int = 1) -> None:
        self.spec, self.num_samples, self.batch_size = spec, num_samples, batch_size
        self.accumulate, self.rank, self.start, self.world = accumulate, rank, start, world

    def __len__(self) -> int:
        return self.spec.total_steps * self.accumulate

    def __iter__(self) -> Iterator[Draws]:
        for step in range(self.start(), self.spec.total_steps):
            for micro in range(self.accumulate):
                yield draw_micro_batch(self.spec, step, micro, self.rank, self.batch_size, self.num_samples,
                                       self.world)


def draws_dataloader(trainer: Any, num_samples: int, batch_size: int) -> StepDraws:
    """The training loader any ``GlanceData`` DataModule can return: the module's draws, batched already."""
    spec = trainer.lightning_module.draw_spec()
    return StepDraws(spec, num_samples, batch_size, trainer.accumulate_grad_batches, trainer.global_rank,
                     start=lambda: trainer.global_step, world=trainer.world_size)
