"""Benchmark a compiled UNet step, optionally side by side with torch eager.

Honest timing: inputs are uploaded once, warm-up calls are excluded, each
IREE call is synchronised by reading its result back, and with `vs_eager`
the IREE and torch calls alternate in the same process with the same inputs,
dtype and thread count.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import host
from ..signature import make_inputs
from . import Session, set_threads


@dataclass
class Stats:
    samples_ms: list[float]

    @property
    def min(self) -> float:
        return min(self.samples_ms)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms)

    @property
    def p90(self) -> float:
        s = sorted(self.samples_ms)
        return s[min(len(s) - 1, int(round(0.9 * (len(s) - 1))))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_ms": self.min,
            "median_ms": self.median,
            "p90_ms": self.p90,
            "mean_ms": self.mean,
            "samples_ms": self.samples_ms,
        }


@dataclass
class BenchResult:
    vmfb: str
    irpa: str
    target: str
    device: str
    threads: int
    entry: str
    inputs: list[dict]
    dtype: str
    iree: Stats
    eager: Stats | None = None
    host: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    scheduled: bool = False  # the figure is one denoising step (run_forward), not one UNet call
    weights: str = "mapped"  # how the weights reached the module (punet.fileio.WEIGHTS)

    @property
    def speedup_vs_eager(self) -> float | None:
        return self.eager.median / self.iree.median if self.eager else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["iree"] = self.iree.to_dict()
        d["eager"] = self.eager.to_dict() if self.eager else None
        d["speedup_vs_eager"] = self.speedup_vs_eager
        return d


def benchmark_command(session: Session, threads: int | None) -> str:
    """The equivalent iree-benchmark-module command line."""
    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    parts = [
        "iree-benchmark-module",
        f"--module={session.vmfb}",
        *(f"--parameters={scope}={path}" for scope, path in session.parameters),
        *[f"--device={session.device}"] * session.signature.devices,
        f"--function={session.info['entry']}",
    ]
    entry = session.signature.entries(session.config)[-1]
    for spec in entry.inputs:
        if spec.dtype == "int64":  # a step count or index: a value, not a random tensor
            parts.append(f"--input={'x'.join(map(str, spec.shape))}xi64=1")
        else:
            parts.append(f"--input={'x'.join(map(str, spec.shape))}x{short[spec.dtype]}")
    if threads and session.device == "local-task":
        parts.append(f"--task_topology_max_group_count={threads}")
    return " ".join(parts)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _step_runners(session: Session, irpa, seed: int, vs_eager: bool):
    """One UNet (or CFG) call, IREE and optionally torch eager, on the same inputs."""
    tensors = make_inputs(session.config, session.signature, seed)
    args = session.to_device(tensors)
    eager = None
    if vs_eager:
        from ..eager import call_model
        from ..weights import load_model

        model, _ = load_model(irpa, dtype=session.signature.dtype)
        eager = lambda: _timed(lambda: call_model(model, tensors))  # noqa: E731
    return (lambda: _timed(lambda: session.to_torch(session.call(args)))), eager


# The step a scheduled module's figure is taken at: the first of a 20-step schedule, on the latents
# run_initialize made for it (every step does the same work; the first one's inputs are the ones a
# real loop feeds it).
_BENCH_STEPS, _BENCH_INDEX = 20, 0


def _scheduled_runners(session: Session, irpa, seed: int, vs_eager: bool):
    """One denoising step of a scheduled module (run_forward: CFG UNet call + Euler step), IREE and eager."""
    from ..scheduled.euler import SchedulerConfig
    from ..scheduled.generate import CompiledStepper, EagerStepper, eager_scheduled, make_loop_inputs

    sig = session.signature
    tensors = make_loop_inputs(session.config, sig, seed)
    stepper = CompiledStepper(session)
    state = stepper.initialize(tensors["sample"], _BENCH_STEPS)

    def iree() -> float:
        return _timed(lambda: stepper.latents(stepper.forward(state, tensors, 7.5, _BENCH_INDEX)))

    eager = None
    if vs_eager:
        model, _ = eager_scheduled(irpa, sig, SchedulerConfig.from_dict(session.info["scheduler"]))
        eager_stepper = EagerStepper(model)
        eager_state = eager_stepper.initialize(tensors["sample"], _BENCH_STEPS)
        eager = lambda: _timed(lambda: eager_stepper.forward(eager_state, tensors, 7.5, _BENCH_INDEX))  # noqa: E731
    return iree, eager


def host_info() -> dict[str, Any]:
    return {**host.info(), "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def benchmark(
    vmfb: str | Path,
    irpa: str | Path,
    *,
    device: str = "local-task",
    warmup: int = 1,
    repeat: int = 5,
    threads: int | None = None,
    vs_eager: bool = False,
    seed: int = 0,
    exact_weights: bool = False,
    progress=None,
    say=None,
    weights: str = "mapped",
) -> BenchResult:
    if warmup < 0 or repeat < 1:
        raise ValueError(f"benchmark needs warmup >= 0 and repeat >= 1 (got {warmup}, {repeat})")
    threads = threads or os.cpu_count() or 1
    set_threads(threads)
    session = Session.load(vmfb, irpa, device, exact_weights=exact_weights, progress=say, weights=weights)
    if vs_eager:
        torch.set_num_threads(threads)
    # torch cannot read packed weights: eager loads the archive they were packed from
    eager_irpa = session.eager_archive() if vs_eager else irpa
    runners = _scheduled_runners if session.signature.scheduled else _step_runners
    iree_once, eager_once = runners(session, eager_irpa, seed, vs_eager)

    for i in range(warmup):
        if progress:
            progress(f"warm-up {i + 1}/{warmup}")
        iree_once()
        if eager_once is not None:
            eager_once()
    iree_ms, eager_ms = [], []
    for i in range(repeat):
        if progress:
            progress(f"call {i + 1}/{repeat}")
        iree_ms.append(iree_once())
        if eager_once is not None:
            eager_ms.append(eager_once())
    return BenchResult(
        vmfb=str(vmfb),
        irpa=str(irpa),
        target=session.info["target"],
        device=device,
        threads=threads,
        entry=session.info["entry"],
        inputs=session.info["inputs"],
        scheduled=session.signature.scheduled,
        dtype=session.signature.dtype + (f", weights {session.signature.quant}" if session.signature.quant else ""),
        iree=Stats(iree_ms),
        eager=Stats(eager_ms) if eager_ms else None,
        host=host_info(),
        command=benchmark_command(session, threads),
        weights=weights,
    )
