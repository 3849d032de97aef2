# Copyright 2026 the punet authors. Apache-2.0.
"""Classifier-free guidance around the UNet: the step SDXL pipelines take."""

from __future__ import annotations

import torch
from torch import nn

from .unet import UNet2DConditionModel


class GuidedUNet(nn.Module):
    """Runs the UNet on [negative, positive] conditioning and applies CFG.

    Mirrors diffusers' `StableDiffusionXLPipeline` step: the batch-B latents
    are duplicated, the 2B text rows are negative then positive prompts, and
    `noise = uncond + guidance_scale * (text - uncond)`.
    """

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        self.unet = unet

    def forward(
        self,
        *,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        guidance_scale: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b = sample.shape[0]
        timestep = timestep.reshape(-1).expand(b)
        noise = self.unet(
            sample=torch.cat([sample, sample], dim=0),  # (2B, C, H, W)
            timestep=torch.cat([timestep, timestep], dim=0),  # (2B,)
            encoder_hidden_states=encoder_hidden_states,
            text_embeds=text_embeds,
            time_ids=time_ids,
        )
        uncond, text = noise.chunk(2, dim=0)
        scale = guidance_scale.reshape(()).to(noise.dtype)
        return uncond + scale * (text - uncond)
