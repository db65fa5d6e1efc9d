"""Generation with a Glance module: a sampling plan (``glance_lightning.sampling``) walked with the family's
velocity, and the base model's own sample for comparison. Mixed into GlanceModule; uses only the family hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from glance_lightning.sampling import Step, StepCallback, base_plan, build_plan, noise_draw, sample


class GenerationMixin:
    """Sampling methods of GlanceModule (``self`` is the module)."""

    def sampling_prompts(self, prompts: Sequence[str], negative_prompt: str | None,
                         guidance_scale: float) -> list[str]:
        """Every prompt sampling with these settings encodes (to register before the text encoders are freed)."""
        if negative_prompt is not None:
            return [*prompts, negative_prompt]
        guided = guidance_scale > 1.0 and self.default_negative_prompt is not None
        return [*prompts, *([self.default_negative_prompt] if guided else [])]

    def initial_noise(self, height: int, width: int, seed: int, batch_size: int = 1,
                      mode: str = "exact") -> torch.Tensor:
        """The seeded starting latents [B, C, h, w], float32 on the module's device, drawn as ``mode`` draws them
        (``sampling.NOISE``): by a CPU generator in float32 (the same on every device), or, for the official mode,
        as the official pipelines' ``prepare_latents`` with ``torch.Generator(device=<its device>)``: shape
        [B, 1, C, h, w], on the pipeline's device, in the model's dtype."""
        from diffusers.utils.torch_utils import randn_tensor

        device, dtype = noise_draw(mode, self.device, getattr(torch, self.dtype_name))
        generator = torch.Generator(device=device).manual_seed(seed)
        channels, *size = self.latent_shape(height, width)
        noise = randn_tensor((batch_size, 1, channels, *size), generator=generator, device=device, dtype=dtype)
        return noise.squeeze(1).to(self.device, torch.float32)

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
        plan = build_plan(mode, self.glance_timesteps, self.family, (width, height), dict(self.model_schedule.config))
        velocity = self._guided(prompt, negative_prompt, controls, guidance_scale)
        previous, was_training = self._active_adapter, self.transformer.training
        self.transformer.eval()
        try:
            return sample(velocity, self.initial_noise(height, width, seed, mode=mode), plan, on_step)
        finally:
            self.transformer.train(was_training)
            if previous is not None:
                self.set_phase(previous)

    @torch.no_grad()
    def generate_base_latents(
        self, prompt: str, seed: int, height: int, width: int, num_steps: int, guidance_scale: float = 1.0,
        negative_prompt: str | None = None, controls: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """The base model without adapters on its own shifted ``num_steps`` schedule (for comparison): the loaded
        model's scheduler, and the grid its pipeline declares instead of ``num_steps`` if it declares one."""
        from glance_lightning.schedules import full_schedule_sigmas

        schedule = self.model_schedule
        steps = None if schedule.sample_sigmas is not None else num_steps
        plan = base_plan(full_schedule_sigmas(self.family, scheduler_config=dict(schedule.config), resolution=(
            width, height), num_steps=steps, sample_sigmas=schedule.sample_sigmas))
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
