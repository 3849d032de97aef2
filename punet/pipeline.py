"""`punet demo`: every stage in order, each output checked, ending in one summary.

import -> export -> compile -> run (IREE) -> compare with torch eager fp32
(and diffusers when installed) -> bench. Each stage is the same function its
own CLI verb calls, and re-running with unchanged inputs reuses artifacts.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .artifacts import irpa_name
from .compare import TOLERANCE, Comparison, compare_tensors
from .errors import PunetError
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
) -> DemoResult:
    from .compile import compile_vmfb, get_target
    from .eager import call_model, cast_inputs
    from .export import export_mlir
    from .runtime import Session, set_threads
    from .runtime.bench import benchmark
    from .weights import load_model

    say = progress or (lambda _m: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t = get_target(target)
    sig = Signature(batch=batch, height=height, width=width, dtype=dtype, cfg=cfg)
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
    exp = export_mlir(irpa, sig=sig, decompose_attention=t.decompose_attention, force=force, progress=say)
    row("export", t0, exp.mlir, "reused" if exp.reused else "")

    # 3. compile
    t0 = time.perf_counter()
    say(f"[3/6] compile for {t.name}")
    comp = compile_vmfb(exp.mlir, t.name, force=force, progress=say)
    row("compile", t0, comp.vmfb, "reused" if comp.reused else t.backend)

    if t.driver != "local-task":
        say(f"target {t.name} runs on {t.driver}: skipping run, compare and bench on this host")
        return result

    # 4. run the compiled module
    t0 = time.perf_counter()
    say(f"[4/6] run {comp.vmfb.name} on local-task")
    set_threads(threads)
    session = Session.load(comp.vmfb, irpa, "local-task")
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
    result.bench = benchmark(comp.vmfb, irpa, warmup=1, repeat=repeat, threads=threads, vs_eager=True, seed=seed)
    row("bench", t0)
    return result


def _has_diffusers() -> bool:
    return importlib.util.find_spec("diffusers") is not None
