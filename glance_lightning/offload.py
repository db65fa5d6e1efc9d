"""Block-level offloading of the frozen transformer for training, on diffusers' group-offloading machinery.

``performance.offload: block`` keeps the frozen base weights of the recomputed (gradient-checkpointed) blocks in
host memory and brings them to the device one group of ``offload_blocks_per_group`` blocks at a time, in the
forward pass and again in the backward pass's recomputation; with ``offload_stream`` the next group in the
pass's direction is copied on a side CUDA stream while the current one computes. The transfers are diffusers'
``ModuleGroup`` (pinned host copies, side stream, ``record_stream``) and the hooks go through diffusers'
``HookRegistry``.

diffusers' own ``apply_group_offloading`` is written for inference and trains wrongly when used as is:

- its groups hold whole blocks, LoRA layers included. With a stream, offloading restores every parameter from
  the pinned copy taken when the hooks were installed, so each step's LoRA update is thrown away; without one
  the LoRA weights are moved to the host after every forward, away from their gradients and optimizer state.
  Here a group holds only the frozen weights; LoRA parameters never move.
- its top-level group (embeddings, final norm and projection) is offloaded after the forward pass, but the
  backward pass needs those weights. Here everything outside the offloaded blocks stays on the device.
- a group is onloaded by its first block's forward and offloaded by its last one's. The backward pass recomputes
  blocks last to first, so a group of several blocks would run its later blocks on host weights, and the
  prefetch of the *next* forward group leaves each group on the device after the backward pass: every block
  ends up resident. Here the direction is read from autograd (recomputation runs inside the backward pass) and
  groups are onloaded and prefetched in that direction.
- autograd saves frozen parameters as they are, so a saved weight reads whatever ``param.data`` holds when the
  backward pass runs: host memory once offloaded. A block that is not recomputed would compute its backward pass
  on offloaded weights, so only recomputed blocks are offloaded here, and a recomputed group is offloaded when
  the recomputation of the preceding group starts, once its own backward pass is done (the first group stays
  on the device for the next forward pass), never right after its recomputation.

Lightning moves the module with ``.to(device)``; the offloaded blocks take part in that move without sending
their frozen weights to the device: LoRA parameters move, and the device becomes the one groups are onloaded to.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.group_offloading import ModuleGroup

from glance_lightning.errors import ConfigError

HOOK_NAME = "glance_block_offload"  # not diffusers' "group_offloading": ModelMixin.to() must still move the rest
HOST = torch.device("cpu")


def _frozen_tensors(blocks: Sequence[torch.nn.Module]) -> tuple[list[torch.nn.Parameter], list[torch.Tensor]]:
    """The base weights and buffers of ``blocks``: every parameter but the peft LoRA ones (``lora_`` names)."""
    params = [p for b in blocks for n, p in b.named_parameters() if "lora_" not in n]
    buffers = [t for b in blocks for n, t in b.named_buffers() if "lora_" not in n]
    return params, buffers


def _in_backward() -> bool:
    """Whether autograd's engine is running: a checkpointed block's forward is then its recomputation."""
    return torch._C._current_graph_task_id() != -1


class BlockOffloader:
    """Host-resident frozen weights of ``blocks`` (in execution order), onloaded a group at a time around each
    block's forward call. ``counts`` tallies the onloads, prefetches and offloads (tests, benchmarks)."""

    def __init__(self, blocks: Sequence[torch.nn.Module], blocks_per_group: int, prefetch: bool) -> None:
        if not blocks:
            raise ValueError("block offloading needs at least one block")
        self.block_groups = [list(blocks[i:i + blocks_per_group]) for i in range(0, len(blocks), blocks_per_group)]
        self.tensors = [_frozen_tensors(group) for group in self.block_groups]
        self.offloaded_ids = {id(t) for params, buffers in self.tensors for t in (*params, *buffers)}
        floats = [p for params, _ in self.tensors for p in params if p.is_floating_point()]
        self.dtype = floats[0].dtype if floats else torch.float32
        self.prefetch = prefetch
        self.device = HOST
        self.stream: torch.cuda.Stream | None = None
        self.groups: list[ModuleGroup] = []
        self.resident: set[int] = set()
        self.ready: dict[int, torch.cuda.Event] = {}  # onloads queued on the side stream, not yet waited for
        self.counts: Counter[str] = Counter()
        self.retarget(HOST)
        for index, group in enumerate(self.block_groups):
            for position, block in enumerate(group):
                HookRegistry.check_if_exists_or_initialize(block).register_hook(
                    _BlockHook(self, index, position), HOOK_NAME)
                block._apply = functools.partial(_apply_leaving_weights_on_host, self, block)

    # ------------------------------------------------------------------ placement
    def retarget(self, device: torch.device) -> None:
        """Make ``device`` the one groups are onloaded to (all groups go back to the host first)."""
        for index in sorted(self.resident):
            self._offload(index)
        for params, buffers in self.tensors:  # host copies; a no-op unless the weights were on a device
            for tensor in (*params, *buffers):
                if tensor.device != HOST:
                    tensor.data = tensor.data.to(HOST)
        self.device = device
        self.stream = torch.cuda.Stream(device) if self.prefetch and device.type == "cuda" else None
        self.groups = []
        for blocks, (params, buffers) in zip(self.block_groups, self.tensors):
            group = ModuleGroup(
                modules=[], offload_device=HOST, onload_device=device, offload_leader=blocks[-1],
                onload_leader=blocks[0], parameters=params, buffers=buffers, non_blocking=self.stream is not None,
                stream=self.stream, record_stream=self.stream is not None, low_cpu_mem_usage=False,
            )
            with torch.inference_mode(False):
                group.offload_()  # with a stream: the weights become the pinned copies, the unpinned ones are freed
            self.groups.append(group)

    def follow(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply a module-wide ``_apply(fn)`` (``.to``, ``.cuda``, ``.half``, ...) to the offloaded weights: a new
        device becomes the onload device; a dtype change is refused (the host copies keep their dtype)."""
        probe = fn(torch.empty(0, dtype=self.dtype))
        if probe.dtype != self.dtype:
            raise ConfigError(
                f"model.performance.offload=block: the offloaded blocks keep their dtype ({self.dtype}) and cannot "
                f"be cast to {probe.dtype}; load the transformer in the training dtype (model.torch_dtype) instead "
                "of converting it (trainer.precision *-true)"
            )
        if probe.device != self.device:
            self.retarget(probe.device)

    # ------------------------------------------------------------------ hooks
    def entering(self, index: int, position: int) -> None:
        """Before a block of group ``index`` runs: its group on the device, the next one in this pass's direction
        (forward: the following group; backward recomputation: the preceding one) prefetched."""
        backward = _in_backward()
        if position == (len(self.block_groups[index]) - 1 if backward else 0):
            # In the backward pass: the group whose backward pass is done (see ``leaving``).
            for other in sorted(self.resident - {index}):
                self._offload(other)
            self._onload(index, "onload")
            self._wait(index)
            ahead = index + (-1 if backward else 1)
            if self.prefetch and 0 <= ahead < len(self.groups):
                self._onload(ahead, "prefetch")
        else:
            self._onload(index, "onload")
            self._wait(index)

    def leaving(self, index: int, position: int) -> None:
        """After a block's forward pass: the group goes back to the host after its last block. Not after a
        recomputation: its saved tensors include parameters themselves (autograd keeps frozen tensors as they are),
        which read ``param.data`` when the block's backward pass runs; the group leaves when the recomputation of
        the preceding group starts (``entering``), after this group's backward pass."""
        if not _in_backward() and position == len(self.block_groups[index]) - 1:
            self._offload(index)

    def _onload(self, index: int, kind: str) -> None:
        if index in self.resident:
            return
        with torch.inference_mode(False):
            self.groups[index].onload_()
        if self.stream is not None:
            event = torch.cuda.Event()
            event.record(self.stream)
            self.ready[index] = event
        self.resident.add(index)
        self.counts[kind] += 1

    def _wait(self, index: int) -> None:
        event = self.ready.pop(index, None)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def _offload(self, index: int) -> None:
        if index not in self.resident:
            return
        self._wait(index)  # a prefetch never waited for must land before its memory can be released
        with torch.inference_mode(False):
            self.groups[index].offload_()
        self.resident.discard(index)
        self.counts["offload"] += 1


class _BlockHook(ModelHook):
    """Calls the offloader around one block's forward (and its recomputation in the backward pass)."""

    _is_stateful = False

    def __init__(self, offloader: BlockOffloader, index: int, position: int) -> None:
        super().__init__()
        self.offloader, self.index, self.position = offloader, index, position

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple[Any], dict[str, Any]]:
        self.offloader.entering(self.index, self.position)
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        self.offloader.leaving(self.index, self.position)
        return output


def _apply_leaving_weights_on_host(offloader: BlockOffloader, block: torch.nn.Module,
                                   fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> torch.nn.Module:
    """``block._apply``: the module's own ``_apply`` with the offloaded weights hidden from it (LoRA parameters
    move as usual), then the offloader follows the move."""
    hidden = []
    for module in block.modules():
        for slots in (module._parameters, module._buffers):
            for key, tensor in slots.items():
                if tensor is not None and id(tensor) in offloader.offloaded_ids:
                    hidden.append((slots, key, tensor))
                    slots[key] = None
    try:
        type(block)._apply(block, fn, recurse)
    finally:
        for slots, key, tensor in hidden:
            slots[key] = tensor
    offloader.follow(fn)
    return block


def offload_blocks(transformer: torch.nn.Module, blocks: Sequence[torch.nn.Module], blocks_per_group: int,
                   prefetch: bool) -> BlockOffloader:
    """Offload the frozen weights of ``blocks`` (recomputed blocks of ``transformer``, in execution order)."""
    offloader = BlockOffloader(blocks, blocks_per_group, prefetch)
    transformer._glance_offloader = offloader
    return offloader


def offloaded_names(module: torch.nn.Module) -> list[str]:
    """Names (relative to ``module``) of the parameters and buffers left on the host: DDP must not broadcast them
    (its ``_ddp_params_and_buffers_to_ignore``); every rank loads the same frozen weights."""
    ids = set().union(*(o.offloaded_ids for o in _offloaders(module)))
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return [name for name, tensor in named if id(tensor) in ids]


def _offloaders(module: torch.nn.Module) -> list[BlockOffloader]:
    return [m._glance_offloader for m in module.modules() if isinstance(getattr(m, "_glance_offloader", None),
                                                                       BlockOffloader)]
