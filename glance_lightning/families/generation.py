"""Generation with a Glance module: the exact Slow->Fast chain, the official-Qwen compatibility mode and the
base model's own sample for comparison. Mixed into GlanceModule; uses only the family hooks."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from glance_lightning.sampling import sample, sample_chained

SAMPLING_MODES = ("exact", "official-qwen")
Conditioning = dict[str, torch.Tensor]


class GenerationMixin:
    """Sampling methods of GlanceModule (``self`` is the module)."""

    def initial_noise(self, height: int, width: int, seed: int, batch_size: int = 1) -> torch.Tensor:
        shape = (batch_size, *self.latent_shape(height, width))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    @torch.no_grad()
    def generate_latents(
        self, prompt: str, seed: int, height: int, width: int, guidance_scale: float = 1.0,
        negative_prompt: str | None = None, controls: Sequence[torch.Tensor] = (), mode: str = "exact",
        on_step: Callable[[int, float, torch.Tensor], None] | None = None,
    ) -> torch.Tensor:
        """Slow->Fast generation from seeded noise; returns normalised latents [1, C, h, w].

        ``mode="exact"``: the exact chain. ``mode="official-qwen"``: what the official Qwen Glance pipelines
        compute (two shifted tables, the model conditioned on the trained timesteps), for their released LoRAs.
        """
        if mode not in SAMPLING_MODES:
            raise ValueError(f"mode={mode!r}; expected one of {', '.join(SAMPLING_MODES)}")
        if mode == "official-qwen" and not self.family.startswith("qwen-image"):
            raise ValueError(f"mode 'official-qwen' reproduces the official Qwen pipelines; not for {self.family}")
        cond = self.conditioning_for(prompt, controls)
        negative = self.conditioning_for(negative_prompt, controls) if negative_prompt is not None else None
        previous, was_training = self._active_adapter, self.transformer.training
        self.transformer.eval()

        def velocity(x: torch.Tensor, sigma: float, phase: str) -> torch.Tensor:
            self.set_phase(phase)
            s = torch.full((x.shape[0],), sigma, device=self.device)
            with self.attention():
                return self.guided_velocity(x, s, cond, negative, guidance_scale)

        try:
            x = self.initial_noise(height, width, seed)
            t = self.glance_timesteps
            if mode == "exact":
                return sample_chained(velocity, x, t.slow, t.fast, on_step=on_step)
            return self._official_qwen_chain(velocity, x, (width, height), on_step)
        finally:
            self.transformer.train(was_training)
            if previous is not None:
                self.set_phase(previous)

    @torch.no_grad()
    def generate_base_latents(
        self, prompt: str, seed: int, height: int, width: int, num_steps: int, guidance_scale: float = 1.0,
        negative_prompt: str | None = None, controls: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The base model without adapters on its own shifted ``num_steps`` schedule (for comparison)."""
        from glance_lightning.schedules import full_schedule_sigmas

        sigmas = full_schedule_sigmas(self.family.removesuffix("-plus"), resolution=(width, height),
                                      num_steps=num_steps)
        cond = self.conditioning_for(prompt, controls)
        negative = self.conditioning_for(negative_prompt, controls) if negative_prompt is not None else None
        was_training = self.transformer.training
        self.transformer.eval()
        self.transformer.disable_adapters()
        try:
            def velocity(x: torch.Tensor, sigma: float, i: int) -> torch.Tensor:
                s = torch.full((x.shape[0],), sigma, device=self.device)
                with self.attention():
                    return self.guided_velocity(x, s, cond, negative, guidance_scale)

            return sample(velocity, self.initial_noise(height, width, seed), sigmas)
        finally:
            self.transformer.enable_adapters()
            if self._active_adapter is not None:
                self.transformer.set_adapter(self._active_adapter)
            self.transformer.train(was_training)

    def _official_qwen_chain(self, velocity: Callable, x: torch.Tensor, size: tuple[int, int],
                             on_step: Callable | None) -> torch.Tensor:
        from glance_lightning.schedules import official_qwen_compat_plan

        lists = self.glance_timesteps.as_timesteps()
        plan = official_qwen_compat_plan(lists["slow"], lists["fast"], resolution=size)
        offset = 0
        for phase, phase_plan in (("slow", plan.slow), ("fast", plan.fast)):
            conditioning = [t / 1000.0 for t in phase_plan.condition_timesteps]

            def phase_velocity(x: torch.Tensor, sigma: float, i: int, phase=phase, conditioning=conditioning):
                return velocity(x, conditioning[i], phase)

            def shifted_on_step(i: int, s: float, x: torch.Tensor, offset=offset) -> None:
                if on_step is not None:
                    on_step(i + offset, s, x)

            x = sample(phase_velocity, x, phase_plan.step_sigmas, on_step=shifted_on_step)
            offset += len(conditioning)
        return x

    @torch.no_grad()
    def decode_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images [B, 3, H, W] in [0, 1] (float32, on the CPU)."""
        with self.encoders_on_device():
            pixels = self.decode_latents(latents.to(self.device, self.pipe.vae.dtype))
        return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()

