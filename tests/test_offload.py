"""Block-level offloading (``performance.offload: block``): same LoRA gradients and updates, weights where they
should be, refused where it cannot train correctly (CPU).

On a CPU the host and the device are the same, so transfers would prove nothing: the ``poisoned`` fixture makes
every offload overwrite the weights with NaN (the real values are kept aside and put back on the next onload).
A block computing with weights that are not onloaded (forward, recomputation or backward) then turns its
gradients into NaN, and the gradient comparisons fail.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from diffusers.hooks.group_offloading import ModuleGroup
from peft import LoraConfig

from glance_lightning import offload, performance
from glance_lightning.families.flux import FluxGlance
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.settings import PerformanceSettings

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out"]


@pytest.fixture(scope="module")
def flux_config() -> dict:
    """The tiny FLUX architecture with 2 double-stream and 3 single-stream blocks (groups span both lists)."""
    from diffusers import FluxTransformer2DModel

    from glance_lightning.tiny import tiny_model_path

    config = FluxTransformer2DModel.load_config(tiny_model_path("tiny:flux"), subfolder="transformer")
    return {**config, "num_layers": 2, "num_single_layers": 3}


def _transformer(config: dict) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel.from_config(config)
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return transformer.train()


def _inputs(transformer: torch.nn.Module) -> dict:
    config, gen = transformer.config, torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, config.in_channels, generator=gen),
        encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.7]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([1.0]) if config.guidance_embeds else None, return_dict=False,
    )


def _grads(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    transformer(**_inputs(transformer))[0].pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    return grads


def _lora(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in transformer.named_parameters() if "lora_" in n}


@pytest.fixture
def poisoned(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Offloaded weights read as NaN until onloaded again; yields the log of transfers."""
    kept: dict[torch.Tensor, torch.Tensor] = {}
    log: list[str] = []
    onload, offload_ = ModuleGroup.onload_, ModuleGroup.offload_

    def poisoning_offload(group: ModuleGroup) -> None:
        offload_(group)
        for tensor in (*group.parameters, *group.buffers):
            if tensor not in kept and tensor.is_floating_point():
                kept[tensor] = tensor.data
                tensor.data = torch.full_like(tensor.data, float("nan"))
        log.append("offload")

    def restoring_onload(group: ModuleGroup) -> None:
        for tensor in (*group.parameters, *group.buffers):
            if tensor in kept:
                tensor.data = kept.pop(tensor)
        onload(group)
        log.append("onload")

    monkeypatch.setattr(ModuleGroup, "offload_", poisoning_offload)
    monkeypatch.setattr(ModuleGroup, "onload_", restoring_onload)
    yield log


@pytest.mark.parametrize(
    ("share", "policy", "per_group", "prefetch"),
    [(1.0, "full", 1, True), (1.0, "full", 2, True), (1.0, "save-matmuls", 3, False), (0.6, "full", 1, True),
     (0.6, "full", 2, False)],
)
def test_lora_gradients_are_unchanged_by_offloading(flux_config: dict, poisoned: list[str], share: float,
                                                    policy: str, per_group: int, prefetch: bool):
    plain = _grads(_transformer(flux_config))
    reference = _transformer(flux_config)
    performance.enable_checkpointing(reference, (), share, policy)
    checkpointed = _grads(reference)

    transformer = _transformer(flux_config)
    recomputed = performance.enable_checkpointing(transformer, (), share, policy)
    offloader = offload.offload_blocks(transformer, recomputed, per_group, prefetch)
    groups = len(offloader.groups)
    assert groups == -(-len(recomputed) // per_group) and offloader.resident == set()
    poisoned.clear()
    grads = _grads(transformer)
    assert grads.keys() == checkpointed.keys() == plain.keys()
    for name, grad in checkpointed.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(grads[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)
    # Each group went to the device once in the forward pass and once for the recomputation; the first group
    # is still there: the next forward pass starts with it.
    assert poisoned.count("onload") == offloader.counts["onload"] + offloader.counts["prefetch"] == 2 * groups
    assert offloader.counts["prefetch"] == (2 * groups - 2 if prefetch else 0)
    assert offloader.resident == {0}


@pytest.mark.parametrize("early_stop", [True, False])
def test_a_group_leaves_only_after_its_backward_pass(flux_config: dict, poisoned: list[str], early_stop: bool):
    """Recomputation saves the frozen weights themselves, not copies: offloading a group right after its
    recomputation (which runs to the block's end without checkpointing's early stop) would poison its backward."""
    from torch.utils.checkpoint import set_checkpoint_early_stop

    reference = _transformer(flux_config)
    performance.enable_checkpointing(reference, (), 1.0, "full")
    expected = _grads(reference)
    transformer = _transformer(flux_config)
    offload.offload_blocks(transformer, performance.enable_checkpointing(transformer, (), 1.0, "full"), 1, True)
    with set_checkpoint_early_stop(early_stop):
        grads = _grads(transformer)
    for name, grad in expected.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=0, msg=name)


def test_an_optimizer_step_with_offloading_gives_the_same_loras(flux_config: dict, poisoned: list[str]):
    trained = {}
    for offloaded in (False, True):
        transformer = _transformer(flux_config)
        recomputed = performance.enable_checkpointing(transformer, (), 1.0, "full")
        if offloaded:
            offloader = offload.offload_blocks(transformer, recomputed, 2, True)
        lora = _lora(transformer)
        optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
        for _ in range(2):  # the second step starts with the first group left on the device
            optimizer.zero_grad()
            _grads(transformer)
            optimizer.step()
        assert _lora(transformer) == lora  # the same parameter objects, updated in place
        trained[offloaded] = {n: p.detach().clone() for n, p in lora.items()}
    for name, weight in trained[False].items():
        torch.testing.assert_close(trained[True][name], weight, rtol=0, atol=0, msg=name)
    # The frozen weights of every group not on the device are offloaded (NaN here); LoRA weights never are.
    for index, (params, _) in enumerate(offloader.tensors):
        assert all(p.isnan().all() != (index in offloader.resident) for p in params)
    assert offloader.resident == {0} and not any(p.isnan().any() for p in _lora(transformer).values())
    assert not any(p.isnan().any() for n, p in transformer.named_parameters() if "blocks" not in n)


def test_sampling_without_grad_runs_on_onloaded_weights_and_returns_them(flux_config: dict, poisoned: list[str]):
    reference = _transformer(flux_config)
    performance.enable_checkpointing(reference, (), 1.0, "full")
    transformer = _transformer(flux_config)
    offloader = offload.offload_blocks(transformer, performance.enable_checkpointing(transformer, (), 1.0, "full"),
                                       1, True)
    with torch.no_grad():
        expected = reference(**_inputs(reference))[0]
        got = transformer(**_inputs(transformer))[0]
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert offloader.resident == set() and offloader.counts["offload"] == len(offloader.groups)


def test_moving_the_module_leaves_offloaded_weights_on_the_host(flux_config: dict):
    transformer = _transformer(flux_config)
    recomputed = performance.enable_checkpointing(transformer, (), 0.6, "full")
    offloader = offload.offload_blocks(transformer, recomputed, 1, True)
    seen: list[int] = []
    transformer._apply(lambda t: seen.append(id(t)) or t)
    frozen = {id(t) for params, buffers in offloader.tensors for t in (*params, *buffers)}
    lora = {id(p) for p in _lora(transformer).values()}
    assert frozen and not frozen & set(seen)
    assert lora <= set(seen)  # LoRA parameters (and every other module) move with the module
    resident = [p for b in performance.repeated_blocks(transformer, ()) if b not in recomputed for p in b.parameters()]
    assert resident and {id(p) for p in resident} <= set(seen)
    with pytest.raises(ValueError, match="offload=block: the offloaded blocks keep their dtype"):
        transformer.to(torch.float64)
    # DDP must not broadcast what stays on the host.
    names = offload.offloaded_names(transformer)
    assert len(names) == len(frozen) and all("lora_" not in n and "blocks." in n for n in names)


def test_a_device_move_retargets_the_groups_instead_of_moving_their_weights(flux_config: dict, monkeypatch):
    """What Lightning's ``module.to(device)`` does, with "meta" standing in for a GPU (diffusers' transfer groups
    need a real device, so the retarget is recorded rather than run)."""
    transformer = _transformer(flux_config)
    offloader = offload.offload_blocks(transformer, performance.enable_checkpointing(transformer, (), 1.0, "full"),
                                       2, True)
    targets: list[torch.device] = []
    monkeypatch.setattr(offloader, "retarget", lambda device: targets.append(device) or setattr(
        offloader, "device", device))
    transformer.to("meta")
    assert targets == [torch.device("meta")]  # once, although every offloaded block saw the move
    assert {p.device.type for params, _ in offloader.tensors for p in params} == {"cpu"}
    assert {p.device.type for p in _lora(transformer).values()} == {"meta"}
    assert transformer.x_embedder.weight.is_meta and transformer.proj_out.weight.is_meta


def test_without_recomputation_the_backward_pass_would_read_offloaded_weights(flux_config: dict,
                                                                               poisoned: list[str]):
    """Why ``offload=block`` needs ``gradient_checkpointing``: a block that is not recomputed leaves references to
    its parameters in autograd, which read whatever ``param.data`` holds at backward time (here: NaN)."""
    transformer = _transformer(flux_config)
    offload.offload_blocks(transformer, performance.repeated_blocks(transformer, ()), 1, True)
    assert any(grad.isnan().any() for grad in _grads(transformer).values())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"offload": "disk"}, "offload='disk'"),
        ({"offload": "block"}, "offload=block needs gradient_checkpointing > 0"),
        ({"offload": "block", "gradient_checkpointing": True, "offload_blocks_per_group": 0},
         "offload_blocks_per_group=0"),
        ({"offload": "block", "gradient_checkpointing": True, "compile_blocks": True},
         "offload=block with compile_blocks=true"),
        ({"offload": "block", "gradient_checkpointing": True, "base_quantization": "int8-weight-only"},
         "offload=block with base_quantization=int8-weight-only"),
    ],
)
def test_offload_settings_that_cannot_train_are_refused_before_loading(options: dict, message: str):
    with pytest.raises(ValueError, match=message):
        FluxGlance(pretrained_model="/no/such/model", performance=PerformanceSettings(**options))


def test_a_share_that_recomputes_no_block_is_refused():
    module = FluxGlance(pretrained_model="tiny:flux",
                        performance=PerformanceSettings(offload="block", gradient_checkpointing=0.1))
    with pytest.raises(ValueError, match="recomputes none of the transformer's blocks"):
        module.load_base_model()


@pytest.mark.parametrize("config", ["configs/quickstart.yaml", "configs/quickstart-qwen-image.yaml",
                                    "configs/quickstart-sd3.yaml", "configs/quickstart-qwen-image-edit.yaml"])
def test_fit_through_the_cli_with_offloading_and_samples(config: str, tmp_path: Path, fit_config,
                                                         poisoned: list[str]):
    """Any use of a weight that is not onloaded makes a loss or LoRA weight NaN (fit stops on a non-finite loss)."""
    from safetensors.torch import load_file

    callbacks = ('[{"class_path": "glance_lightning.callbacks.samples.ChainedSampleCallback", '
                 '"init_args": {"every_n_steps": 3, "seeds": [0]}}]')
    run = fit_config(
        config, tmp_path, "--model.slow_steps", "3", "--model.fast_steps", "3",
        "--trainer.callbacks", callbacks, "--model.performance.offload", "block",
        "--model.performance.gradient_checkpointing", "true", "--model.performance.offload_blocks_per_group", "1",
    )
    for phase in ("slow", "fast"):
        assert read_glance_metadata(run / phase)["trained_steps"] == 3
        weights = load_file(run / phase / "pytorch_lora_weights.safetensors")
        assert weights and all(w.isfinite().all() for w in weights.values())
    assert sorted(run.rglob("step*.png"))  # samples rendered from offloaded blocks during training
    # Every tiny model has 2 or more blocks, one per group: each of the 6 steps onloads them in the forward pass
    # and for the recomputation, the first one excepted (still on the device from the previous backward pass).
    assert poisoned.count("onload") >= 6 * 3


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])  # real transfers,
# the side stream and the peak memory on a GPU
@pytest.mark.parametrize("prefetch", [True, False])
def test_installed_on_the_host_then_moved_like_lightning_does(flux_config: dict, device: str, prefetch: bool):
    """The fit order: offloading installed on the loaded (host) transformer, then ``.to(device)`` by the
    strategy, then training steps; on a GPU the offloaded weights never reach the device wholesale."""
    wide = {**flux_config, "num_layers": 2, "num_single_layers": 4, "num_attention_heads": 4,
            "attention_head_dim": 64, "axes_dims_rope": (16, 24, 24)}

    def steps(offloaded: bool) -> tuple[dict[str, torch.Tensor], float]:
        transformer = _transformer(wide)
        recomputed = performance.enable_checkpointing(transformer, (), 1.0, "full")
        if offloaded:
            offloader = offload.offload_blocks(transformer, recomputed, 1, prefetch)
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        transformer.to(device)
        lora = _lora(transformer)
        optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
        for _ in range(2):
            optimizer.zero_grad()
            inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in _inputs(transformer).items()}
            transformer(**inputs)[0].pow(2).mean().backward()
            optimizer.step()
        assert {p.device.type for p in lora.values()} == {device}
        if offloaded:
            assert offloader.device.type == device and offloader.resident == {0}
            host = [p for params, _ in offloader.tensors[1:] for p in params]
            assert host and {p.device.type for p in host} == {"cpu"}
            assert all(p.is_pinned() for p in host) == (device == "cuda" and prefetch)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else 0.0
        return {n: p.detach().cpu() for n, p in lora.items()}, peak

    expected, peak_resident = steps(False)
    got, peak_offloaded = steps(True)
    for name, weight in expected.items():
        torch.testing.assert_close(got[name], weight, rtol=1e-5, atol=1e-6, msg=name)
    if device == "cuda":  # two blocks of six on the device at a time, plus the small modules around them
        assert peak_offloaded < 0.6 * peak_resident, (peak_offloaded, peak_resident)
