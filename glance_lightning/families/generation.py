"""Generation with a Glance module: a sampling plan (``glance_lightning.sampling``) walked with the family's
velocity, and the base model's own sample for comparison. Mixed into GlanceModule; uses only the family hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glance_lightning.sampling import Step, StepCallback, base_plan, build_plan, sample


class GenerationMixin:
    """Sampling methods of GlanceModule (``self`` is the module)."""

    def sampling_prompts(self, prompts: Sequence[str], negative_prompt: str | None,
                         guidance_scale: float) -> list[str]:
        """Every prompt sampling with these settings encodes (to register before the text encoders are freed)."""
        if negative_prompt is not None:
            return [*prompts, negative_prompt]
        guided = guidance_scale > 1.0 and self.default_negative_prompt is not None
        return [*prompts, *([self.default_negative_prompt] if guided else [])]

    def initial_noise(self, height: int, width: int, seed: int, batch_size: int = 1) -> torch.Tensor:
        shape = (batch_size, *self.latent_shape(height, width))
        generator = torch.Generator(device="cpu").manual_seed(seed)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

    def _guided(self, prompt: str, negative_prompt: str | None, controls: Sequence[torch.Tensor],
                guidance_scale: float):
        cond = self.conditioning_for(prompt, controls)
        negative = self.conditioning_for(negative_prompt, controls) if negative_prompt is not None else None

        def velocity(x: torch.Tensor, step: Step) -> torch.Tensor:
            if step.adapter is not None:
                self.set_phase(step.adapter)
            s = torch.full((x.shape[0],), step.condition, device=self.device)
            with self.attention():
                return self.guided_velocity(x, s, cond, negative, guidance_scale)

        return velocity

    @torch.no_grad()
    def generate_latents(
        self, prompt: str, seed: int, height: int, width: int, guidance_scale: float = 1.0,
        negative_prompt: str | None = None, controls: Sequence[torch.Tensor] = (), mode: str = "exact",
        on_step: StepCallback | None = None,
    ) -> torch.Tensor:
        """Slow->Fast generation from seeded noise along the ``mode`` plan (``sampling.PLANS``); returns
        normalised latents [1, C, h, w]."""
        plan = build_plan(mode, self.glance_timesteps, self.family, (width, height))
        velocity = self._guided(prompt, negative_prompt, controls, guidance_scale)
        previous, was_training = self._active_adapter, self.transformer.training
        self.transformer.eval()
        try:
            return sample(velocity, self.initial_noise(height, width, seed), plan, on_step)
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

        plan = base_plan(full_schedule_sigmas(self.family, resolution=(width, height), num_steps=num_steps))
        velocity = self._guided(prompt, negative_prompt, controls, guidance_scale)
        was_training = self.transformer.training
        self.transformer.eval()
        self.transformer.disable_adapters()
        try:
            return sample(velocity, self.initial_noise(height, width, seed), plan)
        finally:
            self.transformer.enable_adapters()
            if self._active_adapter is not None:
                self.transformer.set_adapter(self._active_adapter)
            self.transformer.train(was_training)

    @torch.no_grad()
    def decode_to_images(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images [B, 3, H, W] in [0, 1] (float32, on the CPU)."""
        with self.encoders_on_device():
            pixels = self.decode_latents(latents.to(self.device, self.pipe.vae.dtype))
        return ((pixels.float() + 1.0) / 2.0).clamp(0.0, 1.0).cpu()
