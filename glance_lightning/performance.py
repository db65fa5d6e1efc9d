"""Speed and memory switches of the training step, applied to a loaded diffusers transformer.

Each function here takes the plain transformer plus one ``PerformanceSettings`` field, and every setting is
checked by ``check_performance_settings`` before any model is loaded:

- attention: PyTorch SDPA with a chosen kernel (any family), or a diffusers attention-dispatcher backend
  (``flash``, ``_flash_3``, ``sage``, ``flex``, ...) where the family's attention goes through the dispatcher.
  cuDNN attention is never used: its backward fails for FLUX-sized shapes on H100.
- regional ``torch.compile`` of the repeated blocks (diffusers' ``compile_repeated_blocks``).
- selective activation checkpointing: a fraction of the repeated blocks, and either full recomputation or
  recomputing everything but the matmuls (PyTorch's selective checkpoint contexts).
- a quantised frozen base through diffusers' quantisation configs (torchao int8 / float8, bitsandbytes NF4).
- 8-bit AdamW states (bitsandbytes) for the LoRA optimizer.
- block-level offloading of the recomputed blocks' frozen weights to host memory (``glance_lightning.offload``).
"""

from __future__ import annotations

import functools
import importlib.util
from contextlib import nullcontext
from typing import Any, get_args

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from glance_lightning.errors import ConfigError, MissingPackageError, SetupError
from glance_lightning.settings import BaseQuantization, Offload, OptimizerSettings, PerformanceSettings

SDPA_KERNELS: dict[str, list[SDPBackend]] = {
    "sdpa": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "sdpa-flash": [SDPBackend.FLASH_ATTENTION],
    "sdpa-efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "sdpa-math": [SDPBackend.MATH],
}
QUANTIZATIONS: tuple[str, ...] = get_args(BaseQuantization)
OFFLOADS: tuple[str, ...] = get_args(Offload)
_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default, torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._scaled_dot_product_efficient_attention.default}


def check_performance_settings(settings: PerformanceSettings, optimizer: OptimizerSettings) -> None:
    """Refuse an unusable combination with the setting's name, before anything is loaded."""
    _check_attention(settings.attention_backend)  # unset (None) switches are checked once performance.auto chose
    if settings.gradient_checkpointing is not None and not 0.0 <= float(settings.gradient_checkpointing) <= 1.0:
        raise ConfigError(
            f"model.performance.gradient_checkpointing={settings.gradient_checkpointing}: give the share of "
            "transformer blocks to recompute, from 0 (none) to 1 (all), or true/false"
        )
    if settings.base_quantization is not None:
        _check_quantization(settings.base_quantization)
    if settings.compile_blocks and settings.compile_backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise ConfigError(f"model.performance.compile_backend={settings.compile_backend!r} is not a torch.compile "
                         f"backend; use one of {torch._dynamo.list_backends()}")
    if settings.compile_blocks and settings.base_quantization not in (None, "none", "nf4"):
        raise ConfigError(
            f"model.performance.compile_blocks=true with base_quantization={settings.base_quantization}: "
            "torch.compile cannot yet differentiate through torchao's quantised weights (AOTAutograd refuses "
            "tensor-subclass outputs that alias); turn one of the two off"
        )
    _check_offload(settings)
    if optimizer.name == "adamw8bit":
        _require("bitsandbytes", "model.optimizer.name=adamw8bit")


def _check_offload(settings: PerformanceSettings) -> None:
    if settings.offload is not None and settings.offload not in OFFLOADS:
        raise ConfigError(f"model.performance.offload={settings.offload!r}: use one of {', '.join(OFFLOADS)}")
    if isinstance(settings.offload_blocks_per_group, bool) or int(settings.offload_blocks_per_group) < 1:
        raise ConfigError(f"model.performance.offload_blocks_per_group={settings.offload_blocks_per_group!r}: give "
                          "a whole number of blocks, 1 or more")
    if settings.offload in (None, "none"):
        return
    if settings.gradient_checkpointing is not None and not float(settings.gradient_checkpointing):
        raise ConfigError("model.performance.offload=block needs gradient_checkpointing > 0: only recomputed blocks "
                          "can leave the device (autograd keeps a block's weights for its backward pass otherwise)")
    if settings.compile_blocks:
        raise ConfigError("model.performance.offload=block with compile_blocks=true: the compiled blocks would "
                          "guard on weights that move every step; turn one of the two off")
    if settings.base_quantization not in (None, "none"):
        raise ConfigError(f"model.performance.offload=block with base_quantization={settings.base_quantization}: "
                          "moving quantised weights (torchao subclasses, bitsandbytes 4-bit states) in training is "
                          "not supported yet; turn one of the two off")


def _require(package: str, setting: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise MissingPackageError(f"{setting} needs the `{package}` package: pip install 'glance-lightning[lowmem]'")


def _check_attention(name: str) -> None:
    if name in SDPA_KERNELS:
        return
    from diffusers.models.attention_dispatch import AttentionBackendName

    known = {b.value for b in AttentionBackendName}
    if "cudnn" in name:
        raise ConfigError(f"model.performance.attention_backend={name!r}: cuDNN attention's backward fails for "
                         "FLUX-sized shapes on H100, so it is not offered; use sdpa (the default) or sdpa-flash")
    if name.endswith("_hub"):
        raise ConfigError(f"model.performance.attention_backend={name!r} downloads kernels from the Hugging Face Hub "
                         "at run time; install the kernel package instead (e.g. flash-attn: 'flash')")
    if name not in known:
        raise ConfigError(f"model.performance.attention_backend={name!r}: use one of {sorted(SDPA_KERNELS)} or a "
                         f"diffusers attention backend ({', '.join(sorted(k for k in known if 'hub' not in k))})")
    from diffusers.models.attention_dispatch import _check_attention_backend_requirements

    try:  # the kernel package (flash-attn, sageattention, xformers, ...) is there
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as err:
        raise SetupError(f"model.performance.attention_backend={name!r}: {err}") from err


def _check_quantization(name: str) -> None:
    if name not in QUANTIZATIONS:
        raise ConfigError(f"model.performance.base_quantization={name!r}: use one of {', '.join(QUANTIZATIONS)}")
    setting = f"model.performance.base_quantization={name}"
    if name in ("int8-weight-only", "float8-weight-only", "float8-dynamic"):
        _require("torchao", setting)
    if name == "nf4":
        _require("bitsandbytes", setting)
        if not torch.cuda.is_available():
            raise SetupError(f"{setting} needs a CUDA GPU (bitsandbytes quantises on the GPU); use "
                               "int8-weight-only on this machine")
    if name == "float8-dynamic" and (not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9)):
        raise SetupError(f"{setting} needs float8 matmuls (an NVIDIA GPU of compute capability 8.9+: Ada, "
                           "Hopper); use float8-weight-only or int8-weight-only here")


def quantization_config(name: str, compute_dtype: torch.dtype) -> Any:
    """diffusers' quantisation config for the transformer, given to its ``from_pretrained`` (None for ``none``)."""
    if name == "none":
        return None
    from diffusers import BitsAndBytesConfig, TorchAoConfig

    if name == "nf4":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=compute_dtype)
    else:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int8WeightOnlyConfig,
        )

        kinds = {"int8-weight-only": Int8WeightOnlyConfig, "float8-weight-only": Float8WeightOnlyConfig,
                 "float8-dynamic": Float8DynamicActivationFloat8WeightConfig}
        config = TorchAoConfig(kinds[name]())
    return config


def attention_context(name: str) -> Any:
    """Context a forward pass runs in: restricts SDPA to the chosen kernels (cuDNN never among them)."""
    return sdpa_kernel(SDPA_KERNELS[name]) if name in SDPA_KERNELS else nullcontext()


def set_dispatcher_backend(transformer: torch.nn.Module, name: str) -> None:
    """Route the transformer's attention through a diffusers dispatcher backend (non-SDPA names only)."""
    if name in SDPA_KERNELS:
        return
    routed = [m for m in transformer.modules() if hasattr(getattr(m, "processor", None), "_attention_backend")]
    if not routed:
        raise ConfigError(
            f"model.performance.attention_backend={name!r}: {type(transformer).__name__}'s attention does not go "
            f"through diffusers' attention dispatcher; use one of {sorted(SDPA_KERNELS)} for this family"
        )
    transformer.set_attention_backend(name)


def repeated_blocks(transformer: torch.nn.Module, names: tuple[str, ...]) -> list[torch.nn.Module]:
    """The transformer's repeated blocks, in order (class names from the family or diffusers' ``_repeated_blocks``;
    also once FSDP2 has wrapped them, in a subclass of their own)."""
    wanted = set(names or getattr(transformer, "_repeated_blocks", ()))
    blocks = [m for m in transformer.modules() if any(c.__name__ in wanted for c in type(m).__mro__)]
    if not blocks:
        raise ConfigError(f"{type(transformer).__name__} has no blocks named {sorted(wanted)}")
    return blocks


def compile_blocks(transformer: torch.nn.Module, names: tuple[str, ...], backend: str = "inductor") -> int:
    """Regional compilation: each repeated block is compiled once and the compiled code is reused by all."""
    blocks = repeated_blocks(transformer, names)
    for block in blocks:
        block.compile(backend=backend, fullgraph=False)
    return len(blocks)


def uncompile_blocks(transformer: torch.nn.Module, names: tuple[str, ...]) -> None:
    """Undo ``compile_blocks``: the repeated blocks run eagerly again."""
    for block in repeated_blocks(transformer, names):
        block._compiled_call_impl = None


def is_compile_failure(err: BaseException) -> bool:
    """An error of torch.compile itself (tracing, the backend, the generated code's compiler), not of the model."""
    from torch._dynamo.exc import BackendCompilerFailed, InternalTorchDynamoError
    from torch._inductor.exc import CppCompileError, CUDACompileError, InductorError

    return isinstance(err, (BackendCompilerFailed, InternalTorchDynamoError, InductorError, CppCompileError,
                            CUDACompileError))


def _save_matmuls(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _MATMULS else CheckpointPolicy.PREFER_RECOMPUTE


def chosen_for_checkpointing(count: int, fraction: float) -> list[int]:
    """Indices of ``round(fraction * count)`` blocks spread evenly over ``count``."""
    chosen = round(fraction * count)
    return sorted({int(i * count / chosen) for i in range(chosen)}) if chosen else []


def enable_checkpointing(
    transformer: torch.nn.Module, names: tuple[str, ...], fraction: float, policy: str
) -> list[torch.nn.Module]:
    """Recompute a share of the repeated blocks in the backward pass; returns the checkpointed blocks.

    ``policy="full"`` keeps only each block's inputs; ``"save-matmuls"`` also keeps matmul and attention
    outputs and recomputes just the cheap elementwise ops (norms, activations, modulation).
    """
    blocks = repeated_blocks(transformer, names)
    selected = [blocks[i] for i in chosen_for_checkpointing(len(blocks), fraction)]
    if not selected:
        return []
    ids = {id(b) for b in selected}
    extra: dict[str, Any] = {}
    if policy == "save-matmuls":
        extra["context_fn"] = functools.partial(create_selective_checkpoint_contexts, _save_matmuls)

    def run_block(block: torch.nn.Module, *args: Any) -> Any:
        if id(block) in ids:
            return checkpoint(block.__call__, *args, use_reentrant=False, **extra)
        return block(*args)

    transformer.enable_gradient_checkpointing(run_block)
    return selected


def build_optimizer(
    settings: OptimizerSettings, groups: list[dict[str, Any]], device: torch.device
) -> torch.optim.Optimizer:
    """AdamW (fused on GPUs unless told otherwise) or bitsandbytes' 8-bit AdamW with the same hyper-parameters."""
    common = dict(lr=settings.lr, betas=tuple(settings.betas), weight_decay=settings.weight_decay, eps=settings.eps)
    if settings.name == "adamw8bit":
        if settings.fused:
            raise ConfigError("model.optimizer.fused=true is for name=adamw; bitsandbytes' adamw8bit has its own "
                             "kernels, leave fused unset")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **common)
    fused = device.type == "cuda" if settings.fused is None else settings.fused
    return torch.optim.AdamW(groups, fused=fused or None, **common)
