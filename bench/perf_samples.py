"""IREE's CPU dispatch code under `perf record`: find it in a .vmfb and in a process, read perf's samples, share
wall time among the functions sampled (bench/cpu_profile.py's `--iree-profiler perf`).

IREE's llvm-cpu modules embed their code as an ELF, which the runtime's own loader maps into anonymous memory:
perf sees addresses it cannot name. The ELF carries DWARF with one subprogram per dispatch, so an address,
less the mapping's start, plus the executable segment's address in the ELF, names its dispatch through
`addr2line`.
"""

from __future__ import annotations

import re
import struct
import subprocess
from collections import defaultdict
from pathlib import Path


def vmfb_elfs(data: bytes) -> list[bytes]:
    """The ELF images a llvm-cpu .vmfb embeds (its executables' code), each cut at its section headers' end."""
    out, i = [], 0
    while (i := data.find(b"\x7fELF\x02\x01", i)) >= 0:
        shoff, = struct.unpack_from("<Q", data, i + 0x28)
        shentsize, shnum = struct.unpack_from("<HH", data, i + 0x3A)
        end = i + shoff + shentsize * shnum
        if shoff == 0 or end > len(data):
            i += 4
            continue
        out.append(data[i:end])
        i = end
    return out


def elf_exec_span(elf: bytes) -> tuple[int, int]:
    """(start, end) of an ELF's executable PT_LOAD segment, widened to whole 4 KiB pages: the part of the
    image a loader maps r-x, as /proc/<pid>/maps shows it."""
    phoff, = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for k in range(phnum):
        p_type, p_flags, _, p_vaddr, _, _, p_memsz = struct.unpack_from("<IIQQQQQ", elf, phoff + k * phentsize)
        if p_type == 1 and p_flags & 1:  # PT_LOAD, PF_X
            return p_vaddr & ~0xFFF, (p_vaddr + p_memsz + 0xFFF) & ~0xFFF
    raise ValueError("no executable PT_LOAD segment")


def anonymous_exec_regions(maps: str) -> list[tuple[int, int]]:
    """(start, end) of the anonymous r-x mappings in a /proc/<pid>/maps text: where IREE's embedded ELF
    loader put dispatch code (it maps the image into memory it reserved itself, not from a file)."""
    out = []
    for line in maps.splitlines():
        parts = line.split()
        if len(parts) == 5 and parts[1].startswith("r-x"):
            lo, hi = (int(v, 16) for v in parts[0].split("-"))
            out.append((lo, hi))
    return out


def parse_perf_samples(text: str) -> list[tuple[int, int, int]]:
    """(tid, time ns, ip) per line of `perf script -F tid,time,ip --ns`."""
    out = []
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s+(\d+)\.(\d{9}):\s+([0-9a-f]+)", line)
        if m:
            out.append((int(m.group(1)), int(m.group(2)) * 10**9 + int(m.group(3)), int(m.group(4), 16)))
    return out


def attribute_bins(samples: list[tuple[int, str]], start: int, end: int, bin_ns: int,
                   idle: str) -> dict[str, float]:
    """Wall nanoseconds of [start, end) per key from (time ns, key) samples of every thread: the span is cut
    into bins of one sampling period, and each bin's time goes to the keys sampled in it, in proportion
    (one thread busy and the other idle: the busy one's key takes the whole bin, as a node's wall time
    does in OpenVINO's counters); bins with no sample go to `idle`. The keys add up to end - start."""
    per_bin: dict[int, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for t, key in samples:
        if start <= t < end:
            per_bin[(t - start) // bin_ns][key] += 1
    out: dict[str, float] = defaultdict(float)
    nbins = -(-(end - start) // bin_ns)
    for b in range(nbins):
        width = min(bin_ns, end - start - b * bin_ns)
        keys = per_bin.get(b)
        if not keys:
            out[idle] += width
            continue
        n = sum(keys.values())
        for key, c in keys.items():
            out[key] += width * c / n
    return dict(out)


def symbolize(elf_path: Path, offsets: set[int]) -> dict[int, str]:
    """Function name of each offset in the ELF, from its DWARF (IREE embeds it: one subprogram per dispatch)."""
    offs = sorted(offsets)
    r = subprocess.run(["addr2line", "-f", "-e", str(elf_path)], input="".join(f"{o:#x}\n" for o in offs),
                       capture_output=True, text=True, check=True)
    names = r.stdout.splitlines()[0::2]
    return dict(zip(offs, names))
