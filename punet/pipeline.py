"""`punet demo`: every stage in order, each output checked, ending in one summary.

import -> export -> compile -> run (IREE) -> compare with torch eager fp32
(and diffusers when installed) -> bench. Each stage is the same function its
own CLI verb calls, and re-running with unchanged inputs reuses artifacts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import irpa_name
from .compare import TOLERANCE, Comparison, compare_tensors
from .errors import PunetError, UsageError
from .signature import Signature, make_inputs

DEFAULT_SOURCE = "builtin:tiny-sdxl"


@dataclass
class StageRow:
    stage: str
    seconds: float
    artifact: str = ""
    size_bytes: int | None = None
    note: str = ""


@dataclass
class DemoResult:
    stages: list[StageRow] = field(default_factory=list)
    checks: list[tuple[str, Comparison, float]] = field(default_factory=list)  # (name, comparison, tolerance)
    bench: Any = None
    compile_only: str = ""  # why run, compare and bench were skipped (the target's device is not here)

    @property
    def ok(self) -> bool:
        return all(c.ok(tol) for _, c, tol in self.checks)


def import_if_needed(
    source: str, output: Path, *, dtype: str, force: bool, revision=None, variant=None, progress=None, on_tensor=None
) -> tuple[dict, bool]:
    """Import unless `output` already holds this source in this dtype."""
    from .weights import import_checkpoint, read_metadata

    if output.is_file() and not force:
        try:
            meta = read_metadata(output)
            if meta["source"] == source and meta["dtype"] == dtype and meta.get("revision") == revision:
                return meta, True
        except PunetError:
            pass
    meta = import_checkpoint(
        source, output, dtype=dtype, revision=revision, variant=variant, progress=progress, on_tensor=on_tensor
    )
    return meta, False


def demo(
    source: str = DEFAULT_SOURCE,
    *,
    target: str = "cpu",
    out_dir: str | Path = "artifacts/demo",
    batch: int = 1,
    height: int = 256,
    width: int = 256,
    dtype: str = "float32",
    cfg: bool = False,
    force: bool = False,
    repeat: int = 3,
    threads: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    working: Callable[[str], Any] | None = None,
) -> DemoResult:
    """Every stage on `source`; `working(text)` is a context manager shown while a long stage runs."""
    from .compile import compile_vmfb, get_target, plan_compile
    from .eager import call_model, cast_inputs
    from .export import export_mlir
    from .fileio import check_output
    from .runtime import Session, set_threads
    from .runtime.bench import benchmark
    from .weights import load_model

    say = progress or (lambda _m: None)
    busy = working or (lambda _text: contextlib.nullcontext())
    # Everything that can be refused is refused before the first file is written.
    try:
        t = get_target(target)
    except ValueError as e:
        raise UsageError(f"--target: {e}") from None
    sig = Signature(batch=batch, height=height, width=width, dtype=dtype, cfg=cfg)
    config = _source_config(source)
    if config is not None:  # a size or dtype the target cannot take: refused now, not after the import
        plan_compile(t, sig, config, tuned=True, decomposed=False)
    out_dir = Path(out_dir)
    check_output(out_dir / irpa_name(dtype), "--out-dir")
    result = DemoResult()

    def row(stage: str, t0: float, path: Path | None = None, note: str = "") -> None:
        result.stages.append(
            StageRow(stage, time.perf_counter() - t0, str(path or ""), path.stat().st_size if path else None, note)
        )

    # 1. import
    t0 = time.perf_counter()
    irpa = out_dir / irpa_name(dtype)
    say(f"[1/6] import {source} -> {irpa}")
    meta, reused = import_if_needed(source, irpa, dtype=dtype, force=force, progress=say)
    row("import", t0, irpa, "reused" if reused else f"{meta['num_parameters']:,} parameters")

    # 2. export
    t0 = time.perf_counter()
    say("[2/6] export (iree-turbine, weights external)")
    with busy("exporting with iree-turbine"):
        exp = export_mlir(irpa, sig=sig, force=force, progress=say)
    row("export", t0, exp.mlir, "reused" if exp.reused else "")

    # 3. compile
    t0 = time.perf_counter()
    say(f"[3/6] compile for {t.name}")
    pack = t.driver == "local-task"  # CPU: weights packed once ahead of time, used in place at every load
    with busy(f"iree-compile for {t.name}"):
        comp = compile_vmfb(exp.mlir, t.name, force=force, pack_weights=pack, progress=say)
    row("compile", t0, comp.vmfb, "reused" if comp.reused else t.backend)
    weights = irpa
    if pack:
        from .runtime.pack import pack_weights

        t0 = time.perf_counter()
        with busy("packing weights"):
            packed = pack_weights(comp.vmfb, irpa, force=force, progress=say)
        weights = packed.path
        row("pack", t0, weights, "reused" if packed.reused else "data-tiled layout")

    if t.driver != "local-task":
        result.compile_only = (
            f"target {t.name} runs on the {t.driver} device, not on this host's CPU, so the module was not run, "
            "compared or benchmarked"
        )
        say(result.compile_only)
        return result

    # 4. run the compiled module
    t0 = time.perf_counter()
    say(f"[4/6] run {comp.vmfb.name} on local-task")
    set_threads(threads)
    session = Session.load(comp.vmfb, weights, "local-task", progress=say)
    tensors = make_inputs(session.config, sig, seed)
    compiled = session(tensors)
    row("run (IREE)", t0, None, f"output {list(compiled.shape)} {dtype}")

    # 5. compare with torch eager fp32 and with diffusers
    t0 = time.perf_counter()
    say("[5/6] compare with torch eager fp32" + (" and diffusers" if _has_diffusers() else ""))
    model, _ = load_model(irpa, dtype="float32")
    fp32_inputs = cast_inputs(tensors, sig, "float32")
    eager = call_model(model, fp32_inputs)
    result.checks.append((f"IREE {dtype} vs torch eager fp32", compare_tensors(compiled, eager), TOLERANCE[dtype]))
    if _has_diffusers():
        from .eager import diffusers_call, diffusers_model

        ref = diffusers_call(diffusers_model(irpa, "float32"), fp32_inputs)
        result.checks.append(("torch eager fp32 vs diffusers fp32", compare_tensors(eager, ref), TOLERANCE["float32"]))
        result.checks.append((f"IREE {dtype} vs diffusers fp32", compare_tensors(compiled, ref), TOLERANCE[dtype]))
    row("compare", t0)
    del model, session

    # 6. bench
    t0 = time.perf_counter()
    say(f"[6/6] bench ({repeat} calls after warm-up, side by side with torch eager)")
    with busy("benchmarking"):
        result.bench = benchmark(comp.vmfb, weights, warmup=1, repeat=repeat, threads=threads, vs_eager=True, seed=seed)
    row("bench", t0)
    return result


def _source_config(source: str):
    """The config of a builtin or local source without importing it (None for a hub id: known after download)."""
    from . import builtin
    from .config import UNetConfig

    if source.startswith(builtin.PREFIX):
        return UNetConfig.from_dict(builtin.config_dict(source[len(builtin.PREFIX):]))
    for d in (Path(source), Path(source) / "unet"):
        if (d / "config.json").is_file():
            return UNetConfig.from_json(d / "config.json")
    return None


def _has_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None
