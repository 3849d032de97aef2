# Copyright 2026 the punet authors. Apache-2.0.
# The math mirrors diffusers' EulerDiscreteScheduler (Apache-2.0).
"""diffusers' `EulerDiscreteScheduler`, in torch alone: config, step tables, scaling and the Euler step.

Everything a denoising loop needs is two tables per step count, built once
in float32 exactly as diffusers builds them: `timesteps[i]` (what the UNet
is told) and `sigmas[i]` (the noise level, with a trailing 0). The step
itself is pure tensor math on table entries, so it exports into the same
module as the UNet.

Dtypes follow diffusers' SDXL pipeline run by torch on CPU: the latents
live in the model's dtype, each float32 sigma meets them as torch's CPU
kernels combine a 0-dim float32 tensor with a low-precision one (see
`_tensor_times`), and the Euler update runs in float32 before rounding
back. In float32 all of this is plain float32 math.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ..errors import PunetError
from ..fileio import read_json_object

__all__ = [
    "MAX_STEPS",
    "SchedulerConfig",
    "SDXL_SCHEDULER_CONFIG",
    "init_noise_sigma",
    "scale_latents",
    "scale_model_input",
    "step",
    "step_tables",
    "tables",
]

# Tables are built at export for every step count 1..MAX_STEPS; row 0 is unused.
MAX_STEPS = 99
# The real scheduler/scheduler_config.json of stabilityai/stable-diffusion-xl-base-1.0.
SDXL_SCHEDULER_CONFIG = "sdxl-base-1.0-scheduler.json"

# Keys scheduler configs carry for other schedulers (PNDM, DDIM) that diffusers' Euler ignores.
_IGNORED = ("clip_sample", "clip_sample_range", "sample_max_value", "set_alpha_to_one", "skip_prk_steps")
_META = ("_class_name", "_diffusers_version", "_use_default_values", "_name_or_path")


class SchedulerConfigError(PunetError, ValueError):
    """A scheduler_config.json key or value punet does not implement."""


@dataclass(frozen=True)
class SchedulerConfig:
    """diffusers `EulerDiscreteScheduler` config; defaults are diffusers' defaults."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: None = None
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    sigma_min: None = None
    sigma_max: None = None
    timestep_spacing: str = "linspace"
    timestep_type: str = "discrete"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    final_sigmas_type: str = "zero"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SchedulerConfig":
        d = dict(d)
        name = d.get("_class_name", "EulerDiscreteScheduler")
        if name != "EulerDiscreteScheduler":
            raise SchedulerConfigError(
                f"unsupported scheduler {name!r}: punet runs EulerDiscreteScheduler (SDXL base's scheduler)"
            )
        for k in _META + _IGNORED:
            d.pop(k, None)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise SchedulerConfigError(f"unknown scheduler config key {unknown[0]!r} (not an EulerDiscreteScheduler argument)")
        cfg = cls(**d)
        cfg._check()
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "SchedulerConfig":
        path = Path(path)
        data = read_json_object(path, "a diffusers scheduler_config.json", SchedulerConfigError)
        try:
            return cls.from_dict(data)
        except SchedulerConfigError as e:
            raise SchedulerConfigError(f"{path}: {e}") from None

    @classmethod
    def sdxl(cls) -> "SchedulerConfig":
        """SDXL base's scheduler, shipped with punet."""
        text = resources.files(__package__).joinpath("configs", SDXL_SCHEDULER_CONFIG).read_text()
        return cls.from_dict(json.loads(text))

    def _check(self) -> None:
        only = {
            "beta_schedule": ("linear", "scaled_linear"),
            "trained_betas": (None,),
            "prediction_type": ("epsilon",),
            "interpolation_type": ("linear",),
            "use_karras_sigmas": (False,),
            "use_exponential_sigmas": (False,),
            "use_beta_sigmas": (False,),
            "sigma_min": (None,),
            "sigma_max": (None,),
            "timestep_spacing": ("leading", "linspace", "trailing"),
            "timestep_type": ("discrete",),
            "rescale_betas_zero_snr": (False,),
            "final_sigmas_type": ("zero",),
        }
        for key, allowed in only.items():
            value = getattr(self, key)
            if value not in allowed or type(value) is not type(allowed[allowed.index(value)]):
                raise SchedulerConfigError(
                    f"unsupported scheduler config: {key}={value!r} (punet implements {', '.join(map(repr, allowed))})"
                )
        if not (isinstance(self.num_train_timesteps, int) and self.num_train_timesteps >= 2):
            raise SchedulerConfigError(f"num_train_timesteps must be an integer >= 2, got {self.num_train_timesteps!r}")
        if not isinstance(self.steps_offset, int) or self.steps_offset < 0:
            raise SchedulerConfigError(f"steps_offset must be a non-negative integer, got {self.steps_offset!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "EulerDiscreteScheduler", **dataclasses.asdict(self)}


def _train_sigmas(cfg: SchedulerConfig) -> torch.Tensor:
    """sqrt((1 - alpha_bar) / alpha_bar) per training timestep, float32 as diffusers computes it."""
    if cfg.beta_schedule == "scaled_linear":
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, cfg.num_train_timesteps, dtype=torch.float32) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.num_train_timesteps, dtype=torch.float32)
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def tables(cfg: SchedulerConfig, num_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(timesteps float32[num_steps], sigmas float32[num_steps + 1]) of `set_timesteps(num_steps)`."""
    n, train = num_steps, cfg.num_train_timesteps
    if not (isinstance(n, int) and 1 <= n <= train):
        raise PunetError(f"number of steps must be an integer from 1 to {train}, got {n!r}")
    if cfg.timestep_spacing == "linspace":
        timesteps = torch.linspace(0, train - 1, n, dtype=torch.float64).to(torch.float32).flip(0)
    elif cfg.timestep_spacing == "leading":
        ratio = train // n
        timesteps = (torch.arange(n, dtype=torch.float64) * ratio).flip(0).to(torch.float32) + cfg.steps_offset
    else:  # trailing
        ratio = train / n
        timesteps = _arange_down(train, ratio).round().to(torch.float32) - 1
    # Linear interpolation of the training sigmas at the timesteps, in float64 as numpy's interp.
    train_sigmas = _train_sigmas(cfg).to(torch.float64)
    t = timesteps.to(torch.float64).clamp(0, train - 1)
    lo = t.floor().long().clamp(max=train - 2)
    w = t - lo
    sigmas = train_sigmas[lo] * (1 - w) + train_sigmas[lo + 1] * w
    sigmas = torch.where(w == 0, train_sigmas[lo], sigmas)  # interp is exact at the knots
    return timesteps, torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def _arange_down(start: int, step: float) -> torch.Tensor:
    """numpy's arange(start, 0, -step) in float64, bit for bit.

    numpy fills `start + i * delta` with delta = (start - step) - start, not -step: the two differ
    in the last bit, and "trailing" rounds the result (48 steps: 937.4999... -> 937, not 938).
    """
    import math

    n = math.ceil(start / step)
    delta = (start - step) - start
    return start + torch.arange(n, dtype=torch.float64) * delta


def step_tables(cfg: SchedulerConfig, max_steps: int = MAX_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Row n holds the tables of n steps, zero-padded: (timesteps [max+1, max+1], sigmas [max+1, max+1]).

    The layout shark-ai's scheduled UNet uses (100 x 100 for max_steps 99):
    `run_initialize` picks a row by the run-time step count.
    """
    width = max_steps + 1
    ts = torch.zeros(width, width, dtype=torch.float32)
    ss = torch.zeros(width, width, dtype=torch.float32)
    for n in range(1, max_steps + 1):
        t, s = tables(cfg, n)
        ts[n, :n] = t
        ss[n, : n + 1] = s
    return ts, ss


def init_noise_sigma(cfg: SchedulerConfig, sigmas: torch.Tensor) -> torch.Tensor:
    """The initial noise's standard deviation, float32: the largest sigma, or sqrt(max^2 + 1) for "leading"."""
    top = sigmas.max()
    return top if cfg.timestep_spacing in ("linspace", "trailing") else (top**2 + 1) ** 0.5


def scale_latents(noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The first latents: the initial noise times `init_noise_sigma` (diffusers' `prepare_latents`)."""
    return _tensor_times(noise, sigma)


# How torch's CPU kernels (2.13, measured) combine a float16/bfloat16 tensor with a 0-dim float32
# tensor: `tensor * scalar` and `tensor / scalar` compute in float32 with the scalar unrounded, then
# round; `scalar * tensor` rounds the scalar to the tensor's dtype first. diffusers writes both
# orders; these two helpers spell each out so that the exported module computes the same.


def _tensor_times(x: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
    """`x * scalar` with x first: float32 math, unrounded scalar, result rounded to x's dtype."""
    return (x.to(torch.float32) * scalar.reshape(())).to(x.dtype)


def _scalar_times(scalar: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`scalar * x` with the scalar first: the scalar is rounded to x's dtype."""
    return scalar.reshape(()).to(x.dtype) * x


def scale_model_input(sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """sample / sqrt(sigma^2 + 1), in the sample's dtype (diffusers' `scale_model_input`)."""
    return (sample.to(torch.float32) / ((sigma.reshape(()) ** 2 + 1) ** 0.5)).to(sample.dtype)


def step(noise: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor, next_sigma: torch.Tensor) -> torch.Tensor:
    """One Euler step (s_churn 0, epsilon prediction), as diffusers' `step` computes it.

    `sigma * noise` is rounded to the noise's dtype (a 0-dim float32 times
    a low-precision tensor), everything after is float32, and the result
    is rounded to the noise's dtype.
    """
    sigma = sigma.reshape(())
    x = sample.to(torch.float32)
    pred_original = x - _scalar_times(sigma, noise)
    derivative = (x - pred_original) / sigma
    dt = next_sigma.reshape(()) - sigma
    return (x + derivative * dt).to(noise.dtype)
