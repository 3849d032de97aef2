"""Compile: .mlir -> .vmfb per target with iree-compile (targets are data: targets.py).

Beside every .vmfb go the exact command (`X.vmfb.compile.sh`, replayable by
hand), the compiler's full log on failure (`X.vmfb.compile.log`), and a
build record (`X.vmfb.json`: target, flags, compiler version, the MLIR's
digest and the signature the runtime checks against).
"""

from __future__ import annotations

import json
import re
import resource
import shlex
import subprocess
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import __version__
from ..artifacts import (
    build_info_path,
    build_key,
    compile_script_path,
    sha256_file,
    signature_path,
    up_to_date,
    encoder_path,
    vmfb_name,
)
from ..config import UNetConfig
from ..errors import PunetError, UsageError
from ..fileio import atomic_path, check_output, write_json_atomic, write_text_atomic
from ..signature import Signature, attention_key_lengths, check_fits, deepest_latent
from .targets import (
    MULTI_DEVICE_DROPPED,
    TARGETS,
    Target,
    compile_flags,
    get_target,
    module_flags,
)

__all__ = [
    "CompilePlan", "CompileResult", "TARGETS", "Target", "compile_flags", "compile_vmfb", "compiler_version", "get_target",
    "iree_compile", "module_flags", "plan_compile",
]


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
    """The compiler's version line, e.g. 'IREE compiler version 3.13.0rc20261016 @ 89ece87b...'."""
    out = subprocess.run([iree_compile(), "--version"], capture_output=True, text=True, check=False)
    lines = [ln.strip() for ln in out.stdout.splitlines() if ln.strip()]
    for line in lines:
        if "compiler version" in line.lower():
            return line
    return " ".join(lines) or "unknown"


def _first_error(log: str) -> str:
    """The line of an iree-compile log that says what went wrong."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for pattern in ("Unknown command line argument", "error:"):
        for line in lines:
            if pattern in line:
                return line[:300]
    if re.search(r"Stack dump|Please report issues|PLEASE submit a bug report|^\s*#\d+ 0x", log, re.M):
        # A compiler crash: name the innermost IREE function of the backtrace.
        frame = re.search(r"#\d+ 0x[0-9a-f]+ (mlir::iree_compiler::[\w:]+)", log)
        return "iree-compile crashed" + (f" in {frame.group(1)}" if frame else "") + " (a compiler bug)"
    return lines[-1][:300] if lines else "no output"


def keeps_fused_attention(t: Target, sig: Signature, config: UNetConfig) -> bool:
    """Whether `t` compiles this module's attention fused although its set decomposes attention: every key
    length is a multiple of `t.fused_attention_key_multiple` (CUDA: 64 text tokens at 1024x1024, not 77)."""
    m = t.fused_attention_key_multiple
    return bool(m) and sig.dtype in t.fused_attention_dtypes and not sig.quant and all(
        n % m == 0 for n in attention_key_lengths(config, sig)
    )


def module_sliced(signature: dict[str, Any]) -> bool:
    """Whether a module's decomposed attention runs by (row, head) slices (signature files before the
    field was written were exported sliced when decomposed)."""
    return bool(signature.get("attention_slices", signature["decompose_attention"]))


@dataclass(frozen=True)
class CompilePlan:
    """What compile does with a module for a target, decided before iree-compile runs."""

    tuned: bool  # the flag set used (the tuned set may not apply to the module's dtype)
    derive_decomposed: bool  # re-export the module with attention as matmul + softmax first
    attention_reason: str = ""
    note: str = ""  # one line for the user and the build record, when the plan differs from the request
    attention_slices: bool = True  # decomposed by slices of (row, head) pairs (the CPU's form), or all at once
    fused_kept: bool = False  # the set decomposes attention, but this module's keys are aligned: kept fused


def plan_compile(
    t: Target, sig: Signature, config: UNetConfig, *, tuned: bool, decomposed: bool, sliced: bool = True
) -> CompilePlan:
    """Refuse what cannot compile (one line naming target, dtype or size), else say how to compile it.

    `decomposed`, `sliced`: the module's attention form. A target whose set needs attention decomposed
    gets its own form (`Target.slice_attention`): a fused module, or a decomposed one sliced the other
    way, is re-exported from its signature."""
    if sig.dtype not in t.dtypes:
        others = [n for n, o in TARGETS.items() if o.driver == t.driver and sig.dtype in o.dtypes]
        raise PunetError(
            f"target {t.name} takes {' or '.join(t.dtypes)}, not {sig.dtype}"
            + (f" ({t.dtype_reason})" if t.dtype_reason else "")
            + f"; export {t.dtypes[0]}" + (f", or use {', '.join(others)}" if others else "")
        )
    check_fits(config, sig)
    if sig.quant and sig.quant not in t.quant_schemes:
        others = [n for n, o in TARGETS.items() if o.driver == t.driver and sig.quant in o.quant_schemes]
        raise PunetError(
            f"target {t.name} does not take {sig.quant} modules"
            + (f" ({t.quant_reason})" if t.quant_reason else "")
            + (f"; use {', '.join(others)}" if others else "")
        )
    if sig.fp8 and sig.fp8 not in t.fp8_dtypes:
        others = [n for n, o in TARGETS.items() if sig.fp8 in o.fp8_dtypes and o.driver != "local-task"]
        raise PunetError(
            f"target {t.name} does not compute {sig.fp8} (fp8 attention)"
            + (f": it takes {' or '.join(t.fp8_dtypes)}; quantize with --fp8-dtype {t.fp8_dtypes[0]}" if t.fp8_dtypes else "")
            + (f"; {sig.fp8} GPU targets: {', '.join(others)}" if others else "")
        )
    if not tuned and t.plain_refused:
        raise PunetError(f"target {t.name} --plain: {t.plain_refused}")
    note = ""
    if tuned and sig.dtype not in t.tuned_dtypes:
        note = (
            f"the tuned flag set of {t.name} is for {' and '.join(t.tuned_dtypes)} ({t.tuned_dtype_reason}); "
            f"compiling {sig.dtype} with the plain set"
        )
        tuned = False
    needs = t.decompose_attention if tuned else t.decompose_attention_plain
    fused_kept = needs and not decomposed and keeps_fused_attention(t, sig, config)
    needs = needs and not fused_kept
    # fp8 attention is matmul + softmax already: nothing to decompose.
    derive = needs and not sig.fp8 and (not decomposed or sliced != t.slice_attention)
    return CompilePlan(tuned, derive, t.attention_reason, note, attention_slices=t.slice_attention, fused_kept=fused_kept)


def _run_compile(cmd: list[str], target: str, log_path: Path) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        write_text_atomic(log_path, f"$ {shlex.join(cmd)}\n\n{proc.stdout}{proc.stderr}")
        raise PunetError(f"iree-compile failed for target {target}: {_first_error(proc.stderr)} (full log: {log_path})")


# The parameter scope a module compiled with --pack-weights reads its packed weights from.
PACKED_SCOPE = "encoded"


def check_packable(t: Target, tuned: bool, devices: int) -> None:
    """--pack-weights: refuse, in one line, what it cannot apply to."""
    if devices > 1:
        raise UsageError(f"--pack-weights: a {devices}-device module is not data-tiled ({MULTI_DEVICE_DROPPED['--iree-opt-data-tiling']})")
    if t.driver != "local-task":
        raise UsageError(f"--pack-weights: CPU targets only (target {t.name} runs on {t.driver}; not verified there)")
    if not tuned:
        raise UsageError("--pack-weights packs weights for data tiling, which --plain leaves out (its weights are used in place)")


def compile_vmfb(
    mlir: str | Path,
    target: str,
    output: str | Path | None = None,
    *,
    tuned: bool = True,
    extra_flags: Sequence[str] = (),
    force: bool = False,
    pack_weights: bool = False,
    progress: Callable[[str], None] | None = None,
) -> CompileResult:
    """Compile `mlir` for `target` (a name in TARGETS).

    `pack_weights`: also write the module's parameter encoder (X.encoder.vmfb); the module then reads
    weights that `punet pack` laid out ahead of time, instead of repacking them at every load.
    """
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
    sig = Signature(**signature["signature"])
    config = UNetConfig.from_dict(signature["config"])
    plan = plan_compile(t, sig, config, tuned=tuned,
                        decomposed=signature["decompose_attention"], sliced=module_sliced(signature))
    for flag in extra_flags:
        if not flag.startswith("-"):
            raise UsageError(f"--flags-extra {flag!r}: expected an iree-compile flag starting with '-'")
    if pack_weights:
        check_packable(t, plan.tuned, sig.devices)
    output = Path(output) if output else mlir.parent / vmfb_name(mlir, t.name, tuned, packed=pack_weights)
    check_output(output)
    source = mlir
    if plan.derive_decomposed:
        from ..export import derive_decomposed

        if progress:
            form = "by slices of (row, head) pairs" if plan.attention_slices else "all (row, head) pairs at once"
            progress(
                f"target {t.name} compiles attention as matmul + softmax, {form} ({plan.attention_reason}): "
                f"re-exporting {mlir.name} decomposed from its signature (no weights needed)"
            )
        source = derive_decomposed(mlir, signature, sliced=plan.attention_slices, progress=progress).mlir
        signature = json.loads(signature_path(source).read_text())
    if plan.fused_kept and progress:
        keys = ", ".join(map(str, sorted(attention_key_lengths(config, sig))))
        progress(
            f"target {t.name} keeps attention fused: every key length ({keys}) is a multiple of "
            f"{t.fused_attention_key_multiple}, where IREE's fused attention is the faster form (docs/benchmarks.md)"
        )
    if plan.note and progress:
        progress(plan.note)
    # A module that writes its convolutions by rows (punet.export.conv_rows) has one-row convolutions.
    h, w = deepest_latent(config, sig)
    flags = module_flags(t, tuned=plan.tuned, dtype=sig.dtype, rows=sig.rows,
                         conv_rows=1 if signature.get("conv_rows") else sig.rows, min_tokens=h * w,
                         quant=sig.quant, packed=pack_weights, devices=sig.devices)
    flags += list(extra_flags)
    encoder = encoder_path(output) if pack_weights else None
    if encoder:
        flags += [f"--iree-parameter-encoder-output-scope={PACKED_SCOPE}"]
    mlir_digest = sha256_file(source)
    key = build_key(mlir=mlir_digest, flags=flags, compiler=compiler_version(), target=t.name)
    info_path = build_info_path(output)
    if not force and up_to_date(output, info_path, key) and (encoder is None or encoder.is_file()):
        info = json.loads(info_path.read_text())
        return CompileResult(output, t.name, True, 0.0, info["command"])

    log_path = Path(str(output) + ".compile.log")
    if progress:
        progress(f"compiling {source.name} for {t.name} ({t.description}){'' if plan.tuned else ' with plain flags'}")
    def commands(src: Path, out: Path, enc_out: Path | None, enc_mlir: Path | None) -> tuple[list[str], list[str]]:
        """The module's iree-compile command and its parameter encoder's ([] without --pack-weights)."""
        cmd = [iree_compile(), str(src), "-o", str(out), *flags]
        if enc_out is None:
            return cmd, []
        cmd.append(f"--iree-parameter-encoder-output-file={enc_mlir}")
        return cmd, [iree_compile(), str(enc_mlir), "-o", str(enc_out), *t.flags]

    t0 = time.perf_counter()
    with ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(output))
        enc_tmp = enc_mlir = None
        if encoder:
            enc_tmp = stack.enter_context(atomic_path(encoder))
            enc_mlir = enc_tmp.with_name(enc_tmp.name + ".mlir")  # iree-compile writes it; removed on the way out
            stack.callback(enc_mlir.unlink, missing_ok=True)
        cmd, enc_cmd = commands(source, tmp, enc_tmp, enc_mlir)
        _run_compile(cmd, t.name, log_path)
        if enc_cmd:
            if progress:
                progress(f"compiling its parameter encoder ({encoder.name})")
            _run_compile(enc_cmd, t.name, log_path)
        seconds = time.perf_counter() - t0
    log_path.unlink(missing_ok=True)
    # The record and the script name the final paths; the script writes the encoder's .mlir beside it.
    command, encoder_command = commands(source.resolve(), output.resolve(), encoder and encoder.resolve(),
                                        encoder and encoder.with_suffix(".mlir").resolve())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    script = f"#!/bin/sh\n# {compiler_version()}; punet {__version__}; target {t.name} " \
             f"({'tuned' if plan.tuned else 'plain'} flags{', packed weights' if encoder else ''})\n{shlex.join(command)}\n"
    if encoder_command:
        script += shlex.join(encoder_command) + "\n"
    write_text_atomic(compile_script_path(output), script)
    write_json_atomic(
        info_path,
        {
            "format": "punet-build-1",
            "punet_version": __version__,
            "compiler_version": compiler_version(),
            "target": t.name,
            "backend": t.backend,
            "driver": t.driver,
            "tuned": plan.tuned,
            "flags": flags,
            "flag_set_note": plan.note,
            "attention": "decomposed" if signature["decompose_attention"] else "fused",
            "attention_slices": module_sliced(signature),
            "conv_rows": bool(signature.get("conv_rows")),
            # Absolute paths: the record is read from other folders (punet pack, bench/cpu_profile.py).
            "exported_from": str(mlir.resolve()) if source != mlir else None,
            "command": command,
            "compile_seconds": round(seconds, 2),
            "mlir": {"path": str(source.resolve()), "sha256": mlir_digest},
            "module_name": signature.get("module_name", "module"),
            "entry": signature["entry"],
            "entries": signature.get("entries"),
            "signature": signature["signature"],
            "inputs": signature["inputs"],
            "outputs": signature["outputs"],
            "parameter_scope": signature["parameter_scope"],
            "irpa": signature["irpa"],
            "config": signature["config"],
            "scheduler": signature.get("scheduler"),
            "packed": {"encoder": encoder.name, "scope": PACKED_SCOPE, "encoder_sha256": sha256_file(encoder)}
            if encoder else None,
            "build_key": key,
        },
    )
    return CompileResult(output, t.name, False, seconds, command, peak)
