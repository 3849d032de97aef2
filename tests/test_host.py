"""punet.host: the CPU line printed and recorded with every figure (model name, family and model, ISA).

Reference: /proc/cpuinfo texts written by hand in the kernel's format, and this host's own file read
line by line in the test.
"""

from __future__ import annotations

import platform
from pathlib import Path

from punet import host

ZEN4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC\n"
        "flags\t\t: fpu sse avx512_bf16 fma avx2 avx512f avx512_vnni\n\n"
        "processor\t: 1\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\nmodel name\t: Other\n"
        "flags\t\t: fpu amx_tile\n")
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\n"


def test_cpu_id_tells_machines_of_one_name_apart():
    """"AMD EPYC" was a Zen 3, a Zen 4 and a Zen 5 here, so the line names family and model. Catches
    "model name" read for "model", a later processor's fields read over the first's, or an id made up
    where the fields are missing."""
    assert host.cpu_id(ZEN4) == "family 25, model 17"
    assert host.cpu_id(ARM) is None
    assert host.cpu_model(ZEN4) == "AMD EPYC"


def test_isa_and_the_line_printed_with_figures():
    """The ISA flags in a fixed order, whatever /proc lists first; flags that only contain a name
    (avx512_bf16 is not avx512f) do not count; no cpuinfo gives the platform's name and says it has no
    vector ISA. Catches substring matching of flags, the cpuinfo order leaking into records, and a
    describe() that drops the id or the flags."""
    assert host.isa(ZEN4) == ["avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16"]
    assert host.isa("processor\t: 0\nflags\t\t: avx512_bf16\n") == ["avx512_bf16"]
    assert host.describe(host.info(ZEN4)) == "AMD EPYC (family 25, model 17; avx2 fma avx512f avx512_vnni avx512_bf16)"
    assert host.describe(host.info(ARM)) == f"{platform.processor() or platform.machine()} (no AVX2 or AVX-512)"
    assert host.describe({"cpu": "Old record"}) == "Old record"  # a figure recorded before the ISA list


def test_this_host_read_from_proc(monkeypatch):
    """Against this host's /proc/cpuinfo read line by line here, and a host without it. Catches
    info() reading another file or processor, or failing where /proc is absent."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    first = {}
    for line in lines:
        key, _, val = line.partition(":")
        first.setdefault(key.strip(), val.strip())
    assert host.info() == {"cpu": first.get("model name") or platform.processor() or platform.machine(),
                           "cpu_id": f"family {first['cpu family']}, model {first['model']}" if "model" in first else None,
                           "isa": [f for f in host.ISA_FLAGS if f in first.get("flags", "").split()]}

    monkeypatch.setattr(host, "CPUINFO", Path("/nonexistent/cpuinfo"))
    assert host.info() == {"cpu": platform.processor() or platform.machine(), "cpu_id": None, "isa": []}
