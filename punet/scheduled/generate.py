# Copyright 2026 the punet authors. Apache-2.0.
"""A whole denoising loop: eager from an .irpa, compiled from a scheduled .vmfb.

Inputs (a safetensors file, or made from a seed): `sample`, the initial
noise (B, 4, h, w) before scaling; `encoder_hidden_states` (2B, T, D) and
`text_embeds` (2B, W), negative rows then positive; optionally `time_ids`
(2B, n), by default [h, w, 0, 0, h, w] in pixels. Output: `sample`, the
final latents.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import UNetConfig
from ..errors import PunetError
from ..signature import (
    LATENT_SCALE,
    Signature,
    TensorSpec,
    check_tensors,
    default_time_ids,
    num_time_ids,
    shape_of_inputs,
    text_embeds_width,
)
from . import euler

def input_specs(config: UNetConfig, sig: Signature) -> list[TensorSpec]:
    """The loop's input tensors for a signature (time_ids optional)."""
    b, rows = sig.batch, 2 * sig.batch
    latent = (config.in_channels, sig.height // LATENT_SCALE, sig.width // LATENT_SCALE)
    return [
        TensorSpec("sample", (b, *latent), sig.dtype),
        TensorSpec("encoder_hidden_states", (rows, sig.tokens, config.cross_attention_dim), sig.dtype),
        TensorSpec("text_embeds", (rows, text_embeds_width(config)), sig.dtype),
        TensorSpec("time_ids", (rows, num_time_ids(config)), "float32"),
    ]


def make_loop_inputs(config: UNetConfig, sig: Signature, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic loop inputs: unit-normal noise and text, the default time ids."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for spec in input_specs(config, sig):
        if spec.name == "time_ids":
            out[spec.name] = default_time_ids(sig, *spec.shape)
        else:
            out[spec.name] = torch.randn(spec.shape, generator=g, dtype=torch.float32).to(spec.torch_dtype)
    return out


def loop_signature(config: UNetConfig, tensors: dict[str, torch.Tensor], where: str) -> Signature:
    """The signature an inputs file implies (batch, size, dtype, tokens), every tensor checked against it."""
    sig = Signature(**shape_of_inputs(tensors, where, rows="2B"), scheduled=True)
    check_tensors(
        input_specs(config, sig), tensors, where, optional=("time_ids",), paired=("encoder_hidden_states", "text_embeds", "time_ids")
    )
    return sig


@dataclass
class LoopResult:
    latents: torch.Tensor
    signature: Signature
    runner: str  # "torch eager (cpu)" or "IREE <target> (<device>)"
    steps: int
    guidance: float
    step_ms: list[float] = field(default_factory=list)
    initialize_ms: float = 0.0


class _Stepper:
    """run_initialize / run_forward on some backend; tensors stay wherever the backend keeps them.

    A stepper serves one loop's text inputs and guidance: they are moved to the device on the
    first step and reused (a warm-up loop on the same inputs may come first).
    """

    def initialize(self, sample: torch.Tensor, steps: int) -> tuple:
        raise NotImplementedError

    def forward(self, state: tuple, tensors: dict, guidance: float, i: int) -> tuple:
        raise NotImplementedError

    def latents(self, state: tuple) -> torch.Tensor:
        raise NotImplementedError


class EagerStepper(_Stepper):
    def __init__(self, model: torch.nn.Module, device: str = "cpu"):
        self.model = model
        self.device = device
        self._text: list | None = None

    def initialize(self, sample, steps):
        with torch.inference_mode():
            n = torch.tensor([steps], dtype=torch.int64, device=self.device)
            return self.model.initialize(sample.to(self.device), n)

    def forward(self, state, tensors, guidance, i):
        latents, time_ids, timesteps, sigmas = state
        if self._text is None:  # on the device once for the whole loop, as CompiledStepper uploads them
            self._text = [
                tensors["encoder_hidden_states"].to(self.device),
                tensors["text_embeds"].to(self.device),
                tensors.get("time_ids", time_ids).to(self.device),
                torch.tensor([guidance], dtype=latents.dtype, device=self.device),
            ]
        with torch.inference_mode():
            step = torch.tensor([i], dtype=torch.int64, device=self.device)
            latents = self.model(latents, *self._text, step, timesteps, sigmas)
        return (latents, time_ids, timesteps, sigmas)

    def latents(self, state):
        return state[0].cpu()


class CompiledStepper(_Stepper):
    """A scheduled .vmfb through punet's runtime Session: the latents stay on the device between steps."""

    def __init__(self, session):
        self.session = session
        self.init, self.fwd = session.signature.entries(session.config)
        self._text: list | None = None

    def _spec(self, name: str) -> TensorSpec:
        return next(s for s in self.fwd.inputs if s.name == name)

    def initialize(self, sample, steps):
        s = self.session
        args = [s.upload(self.init.inputs[0], sample), s.upload(self.init.inputs[1], torch.tensor([steps]))]
        return s.invoke(self.init.name, args)

    def forward(self, state, tensors, guidance, i):
        s = self.session
        latents, time_ids, timesteps, sigmas = state
        if self._text is None:  # uploaded once for the whole loop
            ids = s.upload(self._spec("time_ids"), tensors["time_ids"]) if "time_ids" in tensors else time_ids
            self._text = [
                s.upload(self._spec("prompt_embeds"), tensors["encoder_hidden_states"]),
                s.upload(self._spec("text_embeds"), tensors["text_embeds"]),
                ids,
                s.upload(self._spec("guidance_scale"), torch.tensor([guidance], dtype=self._spec("guidance_scale").torch_dtype)),
            ]
        step = s.upload(self._spec("step_index"), torch.tensor([i]))
        (latents,) = s.invoke(self.fwd.name, [latents, *self._text, step, timesteps, sigmas])
        return (latents, time_ids, timesteps, sigmas)

    def latents(self, state):
        return self.session.download(state[0], self.init.outputs[0])


def run_loop(
    stepper: _Stepper,
    tensors: dict[str, torch.Tensor],
    sig: Signature,
    *,
    steps: int,
    guidance: float,
    runner: str,
    on_step: Callable[[int, float], None] | None = None,
) -> LoopResult:
    """Initialize, then `steps` forward calls; each step timed to its result being ready."""
    if not 1 <= steps <= euler.MAX_STEPS:
        raise PunetError(f"--steps {steps}: a scheduled module holds the tables of 1 to {euler.MAX_STEPS} steps")
    t0 = time.perf_counter()
    state = stepper.initialize(tensors["sample"], steps)
    _ready(state[0])
    result = LoopResult(torch.empty(0), sig, runner, steps, guidance, initialize_ms=(time.perf_counter() - t0) * 1e3)
    for i in range(steps):
        t0 = time.perf_counter()
        state = stepper.forward(state, tensors, guidance, i)
        _ready(state[0])
        ms = (time.perf_counter() - t0) * 1e3
        result.step_ms.append(ms)
        if on_step:
            on_step(i, ms)
    result.latents = stepper.latents(state)
    return result


def _ready(x: Any) -> None:
    """Wait for a step's result: torch CUDA work is asynchronous; IREE's synchronous calls return ready."""
    if isinstance(x, torch.Tensor) and x.is_cuda:
        torch.cuda.synchronize(x.device)


def eager_scheduled(irpa: str | Path, sig: Signature, scheduler: euler.SchedulerConfig, device: str = "cpu"):
    """punet's ScheduledUNet on an .irpa's weights (in the archive's dtype) on a torch device."""
    from ..weights import load_model
    from .model import ScheduledUNet

    unet, config = load_model(irpa, dtype=sig.dtype, device=device)
    time_ids = default_time_ids(sig, 2 * sig.batch, num_time_ids(config))
    return ScheduledUNet(unet, scheduler, time_ids).to(device).eval(), config


def generate(
    artifact: str | Path,
    output: str | Path,
    *,
    steps: int,
    guidance: float,
    irpa: str | Path | None = None,
    inputs: str | Path | None = None,
    seed: int = 0,
    save_inputs: str | Path | None = None,
    sig: Signature | None = None,
    scheduler: str | Path | None = None,
    device: str | None = None,
    exact_weights: bool = False,
    progress: Callable[[str], None] | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> LoopResult:
    """The whole loop on a scheduled .vmfb (with `irpa`) or eagerly on an .irpa; writes {"sample": latents}.

    An .irpa runs punet's ScheduledUNet in torch at the shapes of `sig` (or
    of the inputs file) with the scheduler of `scheduler` (default SDXL
    base's); a .vmfb runs its own tables at its own shapes.
    """
    from ..tensors import load_tensors, save_tensors

    artifact = Path(artifact)
    loaded = load_tensors(inputs) if inputs is not None else None
    if artifact.suffix == ".vmfb":
        from ..runtime import Session, load_build_info

        if irpa is None:
            raise PunetError("a .vmfb needs --irpa PARAMS.irpa")
        if scheduler is not None:
            raise PunetError("--scheduler-config: a compiled module runs the tables it was exported with")
        info = load_build_info(artifact)
        module_sig = Signature(**info["signature"])
        if not module_sig.scheduled:
            raise PunetError(
                f"{artifact.name} is not a scheduled module (entry {info['entry']}); "
                "export with `punet export X.irpa --scheduled`, or run this one step with `punet run`"
            )
        session = Session.load(artifact, irpa, device or "local-task", exact_weights=exact_weights, progress=progress)
        config, sig = session.config, module_sig
        if loaded is not None:
            _check_same_shapes(loop_signature(config, loaded, str(inputs)), sig, str(inputs), artifact.name)
        stepper: _Stepper = CompiledStepper(session)
        runner = f"IREE {info['target']} ({session.device})"
    elif artifact.suffix == ".irpa":
        from ..weights import read_metadata

        meta = read_metadata(artifact)
        config = UNetConfig.from_dict(meta["config"])
        if loaded is not None:
            sig = loop_signature(config, loaded, str(inputs))
        elif sig is None:
            raise PunetError("an .irpa needs the shapes to run at (or an inputs file)")
        if sig.dtype != meta["dtype"]:
            asked = f"{inputs}: the inputs are {sig.dtype}" if loaded is not None else f"the loop asked for {sig.dtype}"
            raise PunetError(
                f"{asked}, but {artifact.name} holds {meta['dtype']} weights "
                f"(the loop runs in the archive's dtype: re-import with --dtype {sig.dtype}, or cast the inputs)"
            )
        cfg = euler.SchedulerConfig.from_json(scheduler) if scheduler else euler.SchedulerConfig.sdxl()
        device = device or "cpu"
        model, config = eager_scheduled(artifact, sig, cfg, device)
        stepper = EagerStepper(model, device)
        runner = f"torch eager ({device})"
    else:
        raise PunetError(f"{artifact}: expected a scheduled .vmfb or an .irpa")
    tensors = loaded if loaded is not None else make_loop_inputs(config, sig, seed)
    if save_inputs is not None:
        save_tensors(save_inputs, tensors)
    if progress:
        progress(f"{steps} steps, guidance {guidance:g}, batch {sig.batch}, {sig.height}x{sig.width}, {sig.dtype}: {runner}")
    result = run_loop(stepper, tensors, sig, steps=steps, guidance=guidance, runner=runner, on_step=on_step)
    save_tensors(
        output,
        {"sample": result.latents},
        metadata={"producer": "punet-generate", "runner": runner, "steps": str(steps), "guidance": f"{guidance:g}"},
    )
    return result


def _check_same_shapes(have: Signature, want: Signature, where: str, module: str) -> None:
    for key in ("batch", "height", "width", "dtype", "tokens"):
        if getattr(have, key) != getattr(want, key):
            raise PunetError(
                f"{where}: {key} {getattr(have, key)}, but {module} was compiled for {key} {getattr(want, key)} "
                "(a compiled module has static shapes)"
            )
