"""The host CPU as every figure names it: model name, vendor family and model, and the vector ISA
flags that decide which CPU kernels IREE, torch and OpenVINO run.

One model name covers several machines ("AMD EPYC": Zen 3, Zen 4 and Zen 5 in docs/benchmarks.md),
so a figure records the family and model and the ISA flags beside it. Torch-free: `punet bench`
prints it, and the bench/ scripts record it.
"""

from __future__ import annotations

import platform
from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")

# The flags that pick a code path: fp32 vector width and FMA, the int8 and bf16 dot products, AMX.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16",
             "amx_int8")


def read_cpuinfo() -> str:
    """/proc/cpuinfo's text, or "" where it cannot be read. The functions below take it as `cpuinfo` (None:
    read it), so that a caller asking for several of them reads the file once."""
    try:
        return CPUINFO.read_text()
    except OSError:
        return ""


def cpuinfo_fields(cpuinfo: str | None = None) -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (or of `cpuinfo`'s text); {} where it cannot be read."""
    if cpuinfo is None:
        cpuinfo = read_cpuinfo()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, val = line.partition(":")
        fields.setdefault(key.strip(), val.strip())
    return fields


def cpu_model(cpuinfo: str | None = None) -> str:
    """The model name ("AMD EPYC"), or the platform's processor or machine name where /proc has none."""
    return cpuinfo_fields(cpuinfo).get("model name") or platform.processor() or platform.machine()


def cpu_id(cpuinfo: str | None = None) -> str | None:
    """The vendor family and model ("family 26, model 2": AMD Zen 5), which tell apart machines that
    share a model name; None if absent."""
    fields = cpuinfo_fields(cpuinfo)
    if "cpu family" not in fields or "model" not in fields:
        return None
    return f"family {fields['cpu family']}, model {fields['model']}"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    return set(cpuinfo_fields(cpuinfo).get("flags", "").split())


def isa(cpuinfo: str | None = None) -> list[str]:
    """The ISA_FLAGS this CPU has, in ISA_FLAGS' order."""
    flags = cpu_flags(cpuinfo)
    return [f for f in ISA_FLAGS if f in flags]


def info(cpuinfo: str | None = None) -> dict:
    """What a figure records of its CPU: {"cpu": model name, "cpu_id": family and model, "isa": flags}."""
    cpuinfo = read_cpuinfo() if cpuinfo is None else cpuinfo
    return {"cpu": cpu_model(cpuinfo), "cpu_id": cpu_id(cpuinfo), "isa": isa(cpuinfo)}


def describe(recorded: dict | None = None) -> str:
    """'AMD EPYC (family 25, model 17; avx2 fma avx512f avx512_vnni avx512_bf16)': this host, or one
    `info()` recorded (a figure's JSON; records older than the ISA list give the model name alone)."""
    recorded = info() if recorded is None else recorded
    isa_text = (" ".join(recorded["isa"]) or "no AVX2 or AVX-512") if "isa" in recorded else None
    detail = "; ".join(p for p in (recorded.get("cpu_id"), isa_text) if p)
    return recorded["cpu"] + (f" ({detail})" if detail else "")
