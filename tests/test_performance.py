"""Speed/memory options: refused early when unusable, and each one's logic checked on tiny models (CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from torch.utils._python_dispatch import TorchDispatchMode

from glance_lightning import performance
from glance_lightning.families.flux import FluxGlance
from glance_lightning.families.sd3 import SD3Glance
from glance_lightning.lora_io import read_glance_metadata
from glance_lightning.settings import OptimizerSettings, PerformanceSettings

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attention_backend": "_native_cudnn"}, "cuDNN attention"),
        ({"attention_backend": "flash_hub"}, "downloads kernels"),
        ({"attention_backend": "fastest"}, "attention_backend='fastest'"),
        ({"attention_backend": "flash"}, "attention_backend='flash'.*flash-attn"),
        ({"gradient_checkpointing": 1.5}, "gradient_checkpointing=1.5"),
        ({"base_quantization": "int3"}, "base_quantization='int3'"),
        ({"base_quantization": "nf4"}, "needs a CUDA GPU"),
        ({"base_quantization": "float8-dynamic"}, "compute capability 8.9"),
        ({"compile_blocks": True, "compile_backend": "turbo"}, "compile_backend='turbo'"),
        ({"compile_blocks": True, "base_quantization": "int8-weight-only"}, "turn one of the two off"),
    ],
)
def test_unusable_settings_are_refused_before_any_model_is_loaded(options: dict, message: str):
    with pytest.raises((ValueError, RuntimeError), match=message):
        FluxGlance(pretrained_model="/no/such/model", performance=PerformanceSettings(**options))


def test_fused_and_8bit_optimizer_conflict_is_named():
    settings = OptimizerSettings(name="adamw8bit", fused=True)
    with pytest.raises(ValueError, match="model.optimizer.fused"):
        performance.build_optimizer(settings, [{"params": [torch.nn.Parameter(torch.ones(2))]}], torch.device("cpu"))


@pytest.mark.parametrize(
    ("count", "fraction", "expected"),
    [(4, 0.0, []), (4, 1.0, [0, 1, 2, 3]), (4, 0.5, [0, 2]), (6, 1 / 3, [0, 3]), (57, 0.5, None)],
)
def test_checkpointed_blocks_are_spread_evenly(count: int, fraction: float, expected: list[int] | None):
    chosen = performance.chosen_for_checkpointing(count, fraction)
    if expected is not None:
        assert chosen == expected
    assert len(chosen) == round(fraction * count) and len(set(chosen)) == len(chosen)
    assert all(0 <= i < count for i in chosen)


def _tiny_flux_with_lora(tiny_flux_path: str) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_path, subfolder="transformer")
    transformer.requires_grad_(False)
    torch.manual_seed(0)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=TARGETS))
    for name, param in transformer.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return transformer.train()


def _flux_inputs(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    config, gen = transformer.config, torch.Generator().manual_seed(0)
    return dict(
        hidden_states=torch.randn(1, 16, config.in_channels, generator=gen, requires_grad=True),
        encoder_hidden_states=torch.randn(1, 8, config.joint_attention_dim, generator=gen),
        pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=gen),
        timestep=torch.tensor([0.7]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([1.0]) if config.guidance_embeds else None, return_dict=False,
    )


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in performance._MATMULS
        return func(*args, **(kwargs or {}))


def _run(transformer: torch.nn.Module) -> tuple[dict[str, torch.Tensor], int, int]:
    """LoRA gradients of one forward/backward, the bytes autograd kept for the backward pass, and the
    number of matmuls the backward pass ran (recomputed forward matmuls included)."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    inputs = _flux_inputs(transformer)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = transformer(**inputs)[0].pow(2).mean()
    with _CountMatmuls() as counter:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}
    return grads, sum(saved), counter.count


@pytest.fixture(scope="module")
def tiny_flux_path() -> str:
    from glance_lightning.tiny import tiny_model_path

    return tiny_model_path("tiny:flux")


def test_checkpointing_keeps_gradients_and_frees_activations(tiny_flux_path: str, monkeypatch):
    reference, kept_plain, matmuls_plain = _run(_tiny_flux_with_lora(tiny_flux_path))
    calls = []
    real = performance.checkpoint
    monkeypatch.setattr(performance, "checkpoint", lambda fn, *a, **k: calls.append(fn) or real(fn, *a, **k))
    kept, matmuls = {}, {}
    for fraction, policy in ((1.0, "full"), (1.0, "save-matmuls"), (0.5, "full")):
        transformer = _tiny_flux_with_lora(tiny_flux_path)
        chosen = performance.enable_checkpointing(transformer, (), fraction, policy)
        calls.clear()
        grads, kept[(fraction, policy)], matmuls[(fraction, policy)] = _run(transformer)
        blocks = performance.repeated_blocks(transformer, ())
        assert len(chosen) == round(fraction * len(blocks)) and len(calls) == len(chosen)
        assert grads.keys() == reference.keys() and reference
        for name, grad in reference.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{policy}: {name}")
    assert kept[(1.0, "full")] < kept[(0.5, "full")] < kept_plain
    # Full recomputation re-runs the blocks' matmuls in the backward pass; "save-matmuls" keeps their
    # outputs and re-runs only the cheap elementwise ops.
    assert matmuls[(1.0, "full")] > matmuls[(0.5, "full")] > matmuls_plain
    assert matmuls[(1.0, "save-matmuls")] == matmuls_plain


def test_save_matmuls_policy_saves_matmuls_and_recomputes_the_rest():
    from torch.utils.checkpoint import CheckpointPolicy

    assert performance._save_matmuls(None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert performance._save_matmuls(None, torch.ops.aten.gelu.default) == CheckpointPolicy.PREFER_RECOMPUTE


def test_regional_compile_compiles_each_repeated_block_and_matches_eager(tiny_flux_path: str):
    eager = _tiny_flux_with_lora(tiny_flux_path)
    compiled = _tiny_flux_with_lora(tiny_flux_path)
    compiled.load_state_dict(eager.state_dict())
    count = performance.compile_blocks(compiled, (), backend="aot_eager")
    blocks = performance.repeated_blocks(compiled, ())
    assert count == len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    assert eager.transformer_blocks[0]._compiled_call_impl is None
    ref, _, _ = _run(eager)
    got, _, _ = _run(compiled)
    assert ref and got.keys() == ref.keys()
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-6)


def test_sd3_blocks_are_found_although_diffusers_declares_none():
    from diffusers import SD3Transformer2DModel

    from glance_lightning.tiny import tiny_model_path

    transformer = SD3Transformer2DModel.from_pretrained(tiny_model_path("tiny:sd3"), subfolder="transformer")
    assert not getattr(transformer, "_repeated_blocks", None)
    blocks = performance.repeated_blocks(transformer, SD3Glance.repeated_blocks)
    assert len(blocks) == transformer.config.num_layers


def test_dispatcher_backend_is_set_on_flux_and_refused_where_attention_bypasses_it():
    flux = FluxGlance(pretrained_model="tiny:flux", performance=PerformanceSettings(attention_backend="native"))
    flux.load_base_model(with_adapters=False)
    backends = {m.processor._attention_backend for m in flux.transformer.modules()
                if hasattr(getattr(m, "processor", None), "_attention_backend")}
    assert backends and {getattr(b, "value", b) for b in backends} == {"native"}
    sd3 = SD3Glance(pretrained_model="tiny:sd3", performance=PerformanceSettings(attention_backend="native"))
    with pytest.raises(ValueError, match="does not go through diffusers' attention dispatcher"):
        sd3.load_base_model(with_adapters=False)


def test_sdpa_kernel_choice_restricts_the_kernels_pytorch_may_pick():
    query = torch.randn(1, 2, 8, 16)
    with performance.attention_context("sdpa-math"):
        math = torch.nn.functional.scaled_dot_product_attention(query, query, query)
    with performance.attention_context("sdpa-efficient"), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(query, query, query)  # no such kernel on CPU
    torch.testing.assert_close(torch.nn.functional.scaled_dot_product_attention(query, query, query), math)


def test_8bit_adamw_state_is_8bit_and_resumes_with_weights_only(tmp_path: Path):
    param = torch.nn.Parameter(torch.randn(64, 128))
    optimizer = performance.build_optimizer(OptimizerSettings(name="adamw8bit"), [{"params": [param]}],
                                            torch.device("cpu"))
    param.grad = torch.randn_like(param)
    optimizer.step()
    state = optimizer.state[param]
    assert {state["state1"].dtype, state["state2"].dtype} == {torch.uint8}
    torch.save(optimizer.state_dict(), tmp_path / "optim.pt")
    restored = performance.build_optimizer(OptimizerSettings(name="adamw8bit"), [{"params": [param]}],
                                           torch.device("cpu"))
    restored.load_state_dict(torch.load(tmp_path / "optim.pt", weights_only=True))
    torch.testing.assert_close(restored.state[param]["state1"], state["state1"])


@pytest.mark.parametrize(
    "options",
    [
        ["--model.performance.base_quantization", "int8-weight-only", "--model.performance.gradient_checkpointing",
         "0.5", "--model.optimizer.name", "adamw8bit"],
        ["--model.performance.compile_blocks", "true", "--model.performance.compile_backend", "aot_eager",
         "--model.performance.gradient_checkpointing", "true", "--model.performance.checkpoint_policy",
         "save-matmuls", "--model.performance.attention_backend", "sdpa-math"],
    ],
    ids=["int8-base+checkpointing+adamw8bit", "compile+save-matmuls+sdpa-math"],
)
def test_fit_through_the_cli_with_the_cpu_options(options: list[str], tmp_path: Path, fit_config):
    run = fit_config(
        "configs/quickstart.yaml", tmp_path, "--model.slow_steps", "3", "--model.fast_steps", "3",
        "--trainer.callbacks", "[]", "--model.torch_dtype", "bfloat16", *options,
    )
    for phase in ("slow", "fast"):
        assert read_glance_metadata(run / phase)["trained_steps"] == 3
    (path,) = (run / "checkpoints").glob("*.ckpt")
    ckpt = torch.load(path, weights_only=True)
    states = ckpt["optimizer_states"][0]["state"].values()
    # bitsandbytes' state (8-bit for tensors of 4096+ elements; the tiny LoRAs are smaller) vs torch's AdamW.
    assert states and all(("__bnb_optimizer_quant_state__" in s) == ("adamw8bit" in options) for s in states)


def test_quantised_base_trains_loras_on_int8_weights(tiny_flux_path: str):
    from peft.tuners.lora.torchao import TorchaoLoraLinear

    module = FluxGlance(pretrained_model="tiny:flux", torch_dtype="bfloat16",
                        performance=PerformanceSettings(base_quantization="int8-weight-only"))
    module.load_base_model()
    layer = module.transformer.transformer_blocks[0].attn.to_q
    assert isinstance(layer, TorchaoLoraLinear) and "Int8" in type(layer.base_layer.weight).__name__
    module.set_phase("slow")
    transformer = module.transformer
    inputs = _flux_inputs(transformer)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in inputs.items()}
    transformer(**inputs)[0].float().pow(2).mean().backward()
    grads = [p.grad for p in module.adapter_parameters("slow") if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in module.adapter_parameters("fast"))



def test_fit_reports_where_its_time_went(repo: Path, tmp_path: Path):
    from glance_lightning.callbacks.monitor import TrainingMonitor
    from glance_lightning.callbacks.samples import ChainedSampleCallback
    from test_faults import data, make, trainer

    module = make(tmp_path / "out")
    run = trainer(tmp_path, callbacks=[ChainedSampleCallback(every_n_steps=3)])
    run.fit(module, datamodule=data(repo))
    # a fit from Python: no "start" (the command line marks the process start); "fetch" is prepare_data
    assert set(module.fit_timings) == {"fetch", "load", "encode", "to device", "samples", "save"}
    assert all(seconds > 0 for seconds in module.fit_timings.values())
    (monitor,) = [c for c in run.callbacks if isinstance(c, TrainingMonitor)]
    assert len(monitor.step_times) == 6
    total = float(monitor.summary.split("fit took ")[1].split(" s")[0])
    other = float(monitor.summary.split("other ")[1])
    rounding = 0.05  # the summary prints tenths of a second
    assert total + rounding >= sum(module.fit_timings.values()) + sum(monitor.step_times) and other >= -rounding
    assert "first step" in monitor.summary and "5 more training steps" in monitor.summary


def test_training_step_reads_nothing_back_from_the_device(repo: Path, tmp_path: Path, monkeypatch):
    """The forward/loss/logging part of a step never turns a tensor into a Python value (a device sync on
    GPUs); the one read per optimizer step is the finiteness flag in on_before_optimizer_step."""
    from test_faults import data, make, trainer

    reads: list[str] = []
    steps: list[int] = []
    module = make(tmp_path / "out")
    step = module.training_step

    def guarded(*args, **kwargs):
        steps.append(module.global_step)
        originals = {name: getattr(torch.Tensor, name) for name in ("item", "__bool__", "__float__", "__int__")}

        def recorder(name):
            def read(tensor, *a, **k):
                reads.append(f"{name} of {tuple(tensor.shape)} {tensor.dtype}")
                return originals[name](tensor, *a, **k)
            return read

        for name in originals:
            monkeypatch.setattr(torch.Tensor, name, recorder(name))
        try:
            return step(*args, **kwargs)
        finally:
            for name, original in originals.items():
                monkeypatch.setattr(torch.Tensor, name, original)

    module.training_step = guarded
    trainer(tmp_path, log_every_n_steps=2).fit(module, datamodule=data(repo))
    assert steps == list(range(6))  # every step went through the guard (else the check below is empty)
    assert reads == []


def test_data_is_encoded_before_the_transformer_moves_to_the_device(repo: Path, tmp_path: Path):
    """Encoders and transformer never share the accelerator: the cache is complete when the strategy moves
    the module (with its transformer) to the device, and the encoders have left it by then."""
    from test_faults import data, make, trainer

    module = make(tmp_path / "out")
    run = trainer(tmp_path)
    seen = []
    move = run.strategy.model_to_device

    def recording_move() -> None:
        seen.append((len(module.latent_cache), len(module.cond_cache), module._encoder_depth))
        move()

    run.strategy.model_to_device = recording_move
    run.fit(module, datamodule=data(repo))
    assert seen == [(1, 1, 0)]


def test_a_compile_failure_falls_back_to_eager_blocks_with_one_line(repo: Path, tmp_path: Path, caplog):
    """A backend that cannot compile the blocks (as inductor failed for FLUX on some machines) costs the fit
    nothing: the blocks run eagerly from the first step and the run says so once."""
    import logging

    from test_faults import data, loras, make, trainer

    def failing(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")

    torch._dynamo.reset()
    torch._dynamo.register_backend(failing, name="glance_test_failing")
    module = make(tmp_path / "out", performance={"compile_blocks": True, "compile_backend": "glance_test_failing"})
    with caplog.at_level(logging.INFO):
        trainer(tmp_path).fit(module, datamodule=data(repo))
    said = [r.getMessage() for r in caplog.records if "regional compile failed" in r.getMessage()]
    assert len(said) == 1 and "BackendCompilerFailed" in said[0] and "run eagerly" in said[0]
    assert module.perf.compile_blocks is False
    assert all(b._compiled_call_impl is None for b in performance.repeated_blocks(module.transformer, ()))
    assert all(torch.isfinite(v).all() for v in loras(tmp_path / "out").values())
    torch._dynamo.reset()


def test_a_cuda_fit_reads_the_transformer_straight_onto_its_device(tiny_flux_path: str, monkeypatch):
    """device_map puts the weights where Lightning would have moved them (no full host copy); the path runs here
    on the CPU through diffusers' own device_map loading, and the choice of device is checked for each case."""
    from types import SimpleNamespace

    from glance_lightning import models
    from glance_lightning.families.flux import FluxGlance
    from glance_lightning.models import ResolvedModel, load_transformer

    model = ResolvedModel(tiny_flux_path, tiny_flux_path)
    placed = load_transformer(model, torch.float32, device="cpu")
    assert all(p.device.type == "cpu" for p in placed.parameters())

    def fit_on(device: str, strategy=None, **performance) -> str | None:
        module = FluxGlance(pretrained_model="tiny:flux", performance=performance)
        root = torch.device(device)
        trainer = SimpleNamespace(strategy=strategy or SimpleNamespace(root_device=root))
        monkeypatch.setattr(FluxGlance, "attached_trainer", lambda self: trainer)
        return module.direct_load_device()

    assert fit_on("cuda:1") == "cuda:1"
    assert fit_on("cpu") is None
    assert fit_on("cuda:0", offload="block", gradient_checkpointing=True) is None  # offload keeps them on the host
    from glance_lightning.sharding import FSDP2Strategy

    sharded = FSDP2Strategy.__new__(FSDP2Strategy)
    monkeypatch.setattr(FSDP2Strategy, "root_device", torch.device("cuda:0"), raising=False)
    assert fit_on("cuda:0", strategy=sharded) is None  # FSDP2 shards from the host
    seen = {}
    monkeypatch.setattr(models, "transformer_class", lambda m: SimpleNamespace(
        from_pretrained=lambda *a, **kw: seen.update(kw)))
    load_transformer(model, torch.bfloat16, device="cuda:1")
    assert seen["device_map"] == "cuda:1"
