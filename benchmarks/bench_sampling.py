"""Time chained 5+5 Glance generation against the base model's 50 steps and the seeds' two-load recipe.

All three run in ONE process on the same pipeline weights, so ratios are measured in the same run:
- glance-chain: one pipeline load, both LoRAs loaded once, one call over the exact chain (our API);
- base-50: the stock pipeline at its default 50-step schedule, no LoRA;
- seeds-recipe: what the public snippets do: load the pipeline + Slow LoRA, call, load the pipeline again
  + Fast LoRA, call with the latents (two loads per image, counted in its time);
- glance-chain, prompt pre-encoded: the same chain given the prompt embeddings (what remains is sampling);
- 10-transformer-calls: the floor: the chain's transformer called 10 times on inputs captured from one chain
  call (LoRAs active), with no prompt encoding, scheduler or adapter switching.

    python benchmarks/bench_sampling.py                      # tiny FLUX on CPU (default)
    python benchmarks/bench_sampling.py --full-size --device cuda --dtype bfloat16 --size 1024   # GPU

``--full-size``: the registry's FLUX.1-dev transformer (random weights) in the tiny pipeline, given prompt
embeddings of the real widths (512 T5 tokens) instead of a prompt, since the tiny text encoders' do not fit it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from peft.utils import get_peft_model_state_dict

from glance_lightning.inference import chained_call, load_glance_loras
from glance_lightning.lora_io import save_lora
from glance_lightning.tiny import build_tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
import full_size  # noqa: E402

SLOW = [1000.0, 986.9786, 973.2042, 958.6094, 943.1188]
FAST = [926.6473, 825.7017, 677.9868, 441.1997, 60.5503]


def full_size_flux(path: Path, dtype: torch.dtype) -> dict:
    """Replace the tiny transformer with the registry's FLUX.1-dev one with random weights (no hub); returns its
    config."""
    arch = full_size.architecture("flux")
    config = {k: v for k, v in arch.items() if k != "_class_name"}
    FluxTransformer2DModel(**config).to(dtype).save_pretrained(path / "transformer")
    return arch


def write_random_loras(pipe: FluxPipeline, out: Path, rank: int) -> None:
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                        target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    for phase, timesteps in (("slow", SLOW), ("fast", FAST)):
        pipe.transformer.add_adapter(config, adapter_name=phase)
        for name, param in pipe.transformer.named_parameters():
            if f"lora_B.{phase}" in name:
                torch.nn.init.normal_(param, std=1e-3)
        state = get_peft_model_state_dict(pipe.transformer, adapter_name=phase)
        meta = {"family": "flux", "base_model": "bench", "phase": phase, "timesteps": timesteps,
                "schedule": {"slow": SLOW, "fast": FAST}}
        save_lora(out / phase, state, config.to_dict(), meta)
        pipe.transformer.delete_adapters(phase)


def median_time(fn: Callable[[], None], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--full-size", action="store_true", help="FLUX.1-dev-sized random transformer")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch (0: torch's default); 1 keeps CPU timings stable on a busy machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        model, loras = Path(tmp) / "model", Path(tmp) / "loras"
        build_tiny_model("flux", model)
        arch = full_size_flux(model, dtype) if args.full_size else None

        def load() -> FluxPipeline:
            pipe = FluxPipeline.from_pretrained(model, dtype=dtype).to(args.device)
            pipe.set_progress_bar_config(disable=True)
            return pipe

        pipe = load()
        write_random_loras(pipe, loras, rank=32 if args.full_size else 4)
        if arch is None:
            prompt = {"prompt": "a red ball", "max_sequence_length": 32}
        else:  # real-width embeddings (the tiny text encoders' would not fit the full-size transformer)
            made = torch.Generator().manual_seed(0)
            prompt = {"prompt_embeds": torch.randn(1, 512, arch["joint_attention_dim"], generator=made),
                      "pooled_prompt_embeds": torch.randn(1, arch["pooled_projection_dim"], generator=made)}
            prompt = {k: v.to(args.device, dtype) for k, v in prompt.items()}
        common = dict(**prompt, height=args.size, width=args.size, guidance_scale=1.0, output_type="latent")
        base_pipe = load()
        chain_pipe = load()
        chain = load_glance_loras(chain_pipe, loras / "slow", loras / "fast")

        def glance_chain() -> None:
            chained_call(chain_pipe, chain, generator=torch.Generator().manual_seed(0), **common)

        if arch is None:
            embeds, pooled, _ = chain_pipe.encode_prompt(prompt=common["prompt"], prompt_2=None,
                                                         max_sequence_length=common["max_sequence_length"])
        else:
            embeds, pooled = common["prompt_embeds"], common["pooled_prompt_embeds"]
        encoded = {k: v for k, v in common.items() if k not in ("prompt", "max_sequence_length", "prompt_embeds",
                                                                "pooled_prompt_embeds")}

        def glance_chain_encoded() -> None:
            chained_call(chain_pipe, chain, generator=torch.Generator().manual_seed(0), prompt_embeds=embeds,
                         pooled_prompt_embeds=pooled, **encoded)

        def base_50() -> None:
            base_pipe(num_inference_steps=50, generator=torch.Generator().manual_seed(0), **common)

        captured: dict = {}

        def capture(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured.setdefault("kwargs", kwargs)

        hook = chain_pipe.transformer.register_forward_pre_hook(capture, with_kwargs=True)
        glance_chain()
        hook.remove()

        @torch.no_grad()
        def transformer_calls() -> None:
            for _ in range(10):
                chain_pipe.transformer(**captured["kwargs"])

        def seeds_recipe() -> None:
            slow_pipe = load()
            slow_pipe.load_lora_weights(str(loras / "slow"))
            latents = slow_pipe(sigmas=[t / 1000 for t in SLOW], num_inference_steps=5,
                                generator=torch.Generator().manual_seed(0), **common).images
            del slow_pipe
            fast_pipe = load()
            fast_pipe.load_lora_weights(str(loras / "fast"))
            fast_pipe(sigmas=[t / 1000 for t in FAST], num_inference_steps=5, latents=latents, **common)

        rows = [(name, median_time(fn, args.repeats, sync))
                for name, fn in (("glance-chain (5+5, one load)", glance_chain), ("base-50", base_50),
                                 ("seeds-recipe (5+5, two loads)", seeds_recipe),
                                 ("glance-chain, prompt pre-encoded", glance_chain_encoded),
                                 ("10-transformer-calls (floor)", transformer_calls))]
    reference = rows[1][1]
    print(f"FLUX {'full-size random' if args.full_size else 'tiny'}, {args.size}x{args.size}, {args.device}, "
          f"{args.dtype}, median of {args.repeats}")
    print(f"| {'method':32s} | median s/image | vs base-50 |")
    print(f"|{'-' * 34}|----------------|------------|")
    for name, seconds in rows:
        print(f"| {name:32s} | {seconds:14.3f} | {reference / seconds:9.2f}x |")


if __name__ == "__main__":
    main()
