"""Compile: .mlir -> .vmfb per target with iree-compile (targets are data: targets.py).

Beside every .vmfb go the exact command (`X.vmfb.compile.sh`, replayable by
hand), the compiler's full log on failure (`X.vmfb.compile.log`), and a
build record (`X.vmfb.json`: target, flags, compiler version, the MLIR's
digest and the signature the runtime checks against).
"""

from __future__ import annotations

import json
import resource
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .. import __version__
from ..artifacts import (
    build_info_path,
    build_key,
    compile_script_path,
    sha256_file,
    signature_path,
    up_to_date,
    vmfb_name,
)
from ..errors import PunetError, UsageError
from ..fileio import atomic_path, write_json_atomic, write_text_atomic
from .targets import TARGETS, Target, compile_flags, get_target

__all__ = ["CompileResult", "TARGETS", "Target", "compile_vmfb", "compiler_version", "get_target", "iree_compile"]


@dataclass(frozen=True)
class CompileResult:
    vmfb: Path
    target: str
    reused: bool
    seconds: float
    command: list[str]
    peak_rss_mib: float | None = None


@lru_cache(maxsize=1)
def iree_compile() -> str:
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


@lru_cache(maxsize=1)
def compiler_version() -> str:
    """e.g. "IREE compiler version 3.13.0rc20261016 @ 89ece87b..." (not the "IREE (https://iree.dev):" header)."""
    out = subprocess.run([iree_compile(), "--version"], capture_output=True, text=True, check=False)
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    for line in lines:
        if "compiler version" in line:
            return line
    return lines[0] if lines else "unknown"


def _first_error(log: str) -> str:
    for line in log.splitlines():
        if "error:" in line:
            return line.strip()[:300]
    lines = [ln for ln in log.splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else "no output"


def compile_vmfb(
    mlir: str | Path,
    target: str,
    output: str | Path | None = None,
    *,
    tuned: bool = True,
    extra_flags: Sequence[str] = (),
    force: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CompileResult:
    """Compile `mlir` for `target` (a name in TARGETS)."""
    mlir = Path(mlir)
    try:
        t = get_target(target)
    except ValueError as e:
        raise UsageError(f"--target: {e}") from None
    if not mlir.is_file():
        raise PunetError(f"{mlir}: file not found")
    sig_file = signature_path(mlir)
    if not sig_file.is_file():
        raise PunetError(f"{mlir}: no signature {sig_file.name} beside it (export it with `punet export`)")
    signature = json.loads(sig_file.read_text())
    if t.decompose_attention and not signature["decompose_attention"]:
        raise PunetError(
            f"target {t.name} cannot compile fused attention: export with `punet export ... --decompose-attention`"
        )
    output = Path(output) if output else mlir.parent / vmfb_name(mlir, t.name, tuned)
    flags = compile_flags(t, tuned=tuned) + list(extra_flags)
    mlir_digest = sha256_file(mlir)
    key = build_key(mlir=mlir_digest, flags=flags, compiler=compiler_version(), target=t.name)
    info_path = build_info_path(output)
    if not force and up_to_date(output, info_path, key):
        info = json.loads(info_path.read_text())
        return CompileResult(output, t.name, True, 0.0, info["command"])

    log_path = Path(str(output) + ".compile.log")
    if progress:
        progress(f"compiling {mlir.name} for {t.name} ({t.description}){'' if tuned else ' with plain flags'}")
    t0 = time.perf_counter()
    with atomic_path(output) as tmp:
        cmd = [iree_compile(), str(mlir), "-o", str(tmp), *flags]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            write_text_atomic(log_path, f"$ {shlex.join(cmd)}\n\n{proc.stdout}{proc.stderr}")
            raise PunetError(
                f"iree-compile failed for target {t.name}: {_first_error(proc.stderr)} (full log: {log_path})"
            )
    log_path.unlink(missing_ok=True)
    command = [iree_compile(), str(mlir.resolve()), "-o", str(output.resolve()), *flags]
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    write_text_atomic(
        compile_script_path(output),
        f"#!/bin/sh\n# {compiler_version()}; punet {__version__}; target {t.name} "
        f"({'tuned' if tuned else 'plain'} flags)\n{shlex.join(command)}\n",
    )
    write_json_atomic(
        info_path,
        {
            "format": "punet-build-1",
            "punet_version": __version__,
            "compiler_version": compiler_version(),
            "target": t.name,
            "backend": t.backend,
            "driver": t.driver,
            "tuned": tuned,
            "flags": flags,
            "command": command,
            "compile_seconds": round(seconds, 2),
            "mlir": {"path": str(mlir), "sha256": mlir_digest},
            "entry": signature["entry"],
            "signature": signature["signature"],
            "inputs": signature["inputs"],
            "outputs": signature["outputs"],
            "parameter_scope": signature["parameter_scope"],
            "irpa": signature["irpa"],
            "config": signature["config"],
            "build_key": key,
        },
    )
    return CompileResult(output, t.name, False, seconds, command, peak)
