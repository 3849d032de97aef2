# Copyright 2026 the punet authors. Apache-2.0.
"""The scheduled UNet: classifier-free guidance and the Euler step around the float UNet, as torch modules.

`ScheduledUNet` has the two functions of shark-ai's scheduled UNet
(`amdsharktank/torch_exports/sdxl/unet.py`, v3.9.0), with their argument
order: `initialize` (run_initialize) and `forward` (run_forward).
`ServingUNet` is the CFG call with the argument dtypes that server sends
(`compiled_punet.main`). The float UNet inside is left as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import GuidedUNet, UNet2DConditionModel
from . import euler


class ScheduledUNet(nn.Module):
    """run_initialize + run_forward: the SDXL denoising step in one module.

    The step tables of every step count 1..99 are built here, once, in
    float32 (buffers, exported as constants); `initialize` picks the row of
    the run-time step count, `forward` does scale, CFG UNet call (rows
    negative then positive) and the Euler step for one step index.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        scheduler: euler.SchedulerConfig,
        time_ids: torch.Tensor,
    ):
        super().__init__()
        self.guided = GuidedUNet(unet)
        timesteps, sigmas = euler.step_tables(scheduler)  # 100 x 100: the serving contract's tables
        init_sigma = torch.stack([euler.init_noise_sigma(scheduler, row) for row in sigmas])
        self.register_buffer("timestep_table", timesteps, persistent=False)
        self.register_buffer("sigma_table", sigmas, persistent=False)
        self.register_buffer("init_sigma", init_sigma, persistent=False)  # (100,)
        self.register_buffer("time_ids", time_ids.to(torch.float32), persistent=False)  # (2B, n)

    def initialize(
        self, sample: torch.Tensor, num_steps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, time_ids, timesteps, sigmas) for `num_steps` (int64 [1]) steps from the noise `sample`."""
        n = num_steps.reshape(1)
        latents = euler.scale_latents(sample, self.init_sigma[n])
        return latents, self.time_ids.clone(), self.timestep_table[n].reshape(-1), self.sigma_table[n].reshape(-1)

    def forward(
        self,
        latents: torch.Tensor,
        prompt_embeds: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
        guidance_scale: torch.Tensor,
        step_index: torch.Tensor,
        timesteps: torch.Tensor,
        sigmas: torch.Tensor,
    ) -> torch.Tensor:
        """The latents after step `step_index` (int64 [1]) of the schedule in `timesteps` / `sigmas`."""
        i = step_index.reshape(1)
        sigma, next_sigma = sigmas[i], sigmas[i + 1]
        noise = self.guided(
            sample=euler.scale_model_input(latents, sigma),
            timestep=timesteps[i],
            encoder_hidden_states=prompt_embeds,
            text_embeds=text_embeds,
            time_ids=time_ids,
            guidance_scale=guidance_scale,
        )
        return euler.step(noise, latents, sigma, next_sigma)


class ServingUNet(GuidedUNet):
    """The CFG step as shark-ai's server calls `compiled_punet.main`.

    One timestep, time ids and guidance scale in the model dtype; they are
    widened to float32 before the UNet sees them (float16 holds every
    integer timestep and SDXL size exactly).
    """

    def forward(self, *, timestep: torch.Tensor, time_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return super().forward(
            timestep=timestep.to(torch.float32),
            time_ids=None if time_ids is None else time_ids.to(torch.float32),
            **kwargs,
        )
