"""A toy module with the entry points of a scheduled UNet, to check the shortfin path on its own.

`run_initialize(sample, num_steps i64[1]) -> (latents, time_ids [2B,6], timesteps f32[100],
sigmas f32[100])` picks a row of tables built at export; `run_forward(latents, prompt_embeds,
text_embeds, time_ids, guidance_scale [1], step_index i64[1], timesteps, sigmas) -> latents`
does a CFG "denoiser" call (two small Linear layers, external under scope "model") and an
Euler-style update. Same names, argument order, dtypes and ranks as shark-ai's
`compiled_spunet` and punet's `export --scheduled`; the arithmetic is made up. Runs in
punet's environment (torch, iree-turbine, iree.runtime).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

B, C, H, W = 1, 4, 8, 8  # latents
TOKENS, HIDDEN, TEXT = 64, 32, 8  # prompt_embeds [2B, TOKENS, HIDDEN], text_embeds [2B, TEXT]
MAX_STEPS = 100


class ToyScheduledUNet(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.proj = nn.Linear(HIDDEN, C, dtype=dtype)
        self.tproj = nn.Linear(TEXT + 6, C, dtype=dtype)
        ts = torch.zeros(MAX_STEPS, MAX_STEPS)
        sg = torch.zeros(MAX_STEPS, MAX_STEPS)
        for n in range(1, MAX_STEPS):
            ts[n, :n] = torch.linspace(999, 0, n)
            sg[n, : n + 1] = torch.cat([torch.linspace(14.6, 0.03, n), torch.zeros(1)])
        # Constants of the module, not parameters: they end up inlined in the .mlir.
        self.register_buffer("timestep_table", ts, persistent=False)
        self.register_buffer("sigma_table", sg, persistent=False)

    def run_initialize(self, sample, num_steps):
        timesteps = self.timestep_table[num_steps[0]]
        sigmas = self.sigma_table[num_steps[0]]
        latents = sample * torch.sqrt(sigmas[0] ** 2 + 1).to(sample.dtype)
        time_ids = torch.tensor([[8.0 * H, 8.0 * W, 0, 0, 8.0 * H, 8.0 * W]], dtype=sample.dtype).repeat(2 * B, 1)
        return latents, time_ids, timesteps, sigmas

    def run_forward(self, latents, prompt_embeds, text_embeds, time_ids, guidance_scale, step_index, timesteps, sigmas):
        i = step_index[0]
        sigma, next_sigma = sigmas[i].to(latents.dtype), sigmas[i + 1].to(latents.dtype)
        x = torch.cat([latents] * 2) / torch.sqrt(sigma * sigma + 1)
        cond = self.proj(prompt_embeds.mean(1)) + self.tproj(torch.cat([text_embeds, time_ids], 1))
        eps = torch.tanh(x * (timesteps[i].to(latents.dtype) / 1000) + cond[:, :, None, None])
        uncond, text = eps.chunk(2)  # rows: negative then positive
        eps = uncond + guidance_scale * (text - uncond)
        return latents + (next_sigma - sigma) * eps


def build(dtype: torch.dtype, seed: int = 0) -> ToyScheduledUNet:
    torch.manual_seed(seed)
    model = ToyScheduledUNet(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def make_inputs(dtype: torch.dtype, seed: int = 1) -> dict[str, torch.Tensor]:
    """Inputs under `punet generate`'s keys: initial noise, then 2B text rows (negative, positive)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(B, C, H, W, generator=g).to(dtype),
        "encoder_hidden_states": torch.randn(2 * B, TOKENS, HIDDEN, generator=g).to(dtype),
        "text_embeds": torch.randn(2 * B, TEXT, generator=g).to(dtype),
    }


@torch.no_grad()
def generate(model: ToyScheduledUNet, inputs: dict[str, torch.Tensor], steps: int, guidance: float) -> torch.Tensor:
    """The denoising loop in torch eager: what `punet generate` is to the real module."""
    dtype = inputs["sample"].dtype
    latents, time_ids, timesteps, sigmas = model.run_initialize(inputs["sample"], torch.tensor([steps]))
    g = torch.tensor([guidance], dtype=dtype)
    for i in range(steps):
        latents = model.run_forward(
            latents, inputs["encoder_hidden_states"], inputs["text_embeds"], time_ids, g, torch.tensor([i]),
            timesteps, sigmas,
        )
    return latents


def export(model: ToyScheduledUNet, mlir: Path, irpa: Path, module_name: str = "compiled_spunet") -> None:
    """Both entry points into one .mlir (weights external under "model") and the weights into an .irpa."""
    import iree.runtime as rt
    from iree.turbine import aot

    dtype = model.proj.weight.dtype
    state = {k: v.detach().clone() for k, v in model.named_parameters()}
    aot.externalize_module_parameters(model, external_scope="model")
    fxb = aot.FxProgramsBuilder(model)

    def e(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt)

    @fxb.export_program(name="run_initialize", args=(e(B, C, H, W), e(1, dt=torch.int64)), strict=False)
    def _initialize(module, sample, num_steps):
        return module.run_initialize(sample, num_steps)

    forward_args = (
        e(B, C, H, W), e(2 * B, TOKENS, HIDDEN), e(2 * B, TEXT), e(2 * B, 6), e(1),
        e(1, dt=torch.int64), e(MAX_STEPS, dt=torch.float32), e(MAX_STEPS, dt=torch.float32),
    )

    @fxb.export_program(name="run_forward", args=forward_args, strict=False)
    def _forward(module, *args):
        return module.run_forward(*args)

    aot.export(fxb, module_name=module_name).save_mlir(str(mlir))

    index = rt.ParameterIndex()
    for key, t in state.items():
        # Raw bytes under the parameter's name, as punet's .irpa stores them.
        index.add_buffer(key, t.contiguous().view(torch.uint8).numpy().copy())
    index.create_archive_file(str(irpa))


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()
