"""Render bench/suite.py results as docs/benchmarks.md and a PNG chart."""

from __future__ import annotations

from pathlib import Path

def fp32_flop_per_cycle() -> int:
    """Peak fp32 FLOP per cycle per core: 2 FMA pipes x lanes x 2 (AVX-512: 16 lanes, AVX2: 8)."""
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line
                break
    except OSError:
        pass
    if "avx512f" in flags:
        return 64
    return 32 if "fma" in flags else 8


def cpu_ghz() -> float | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return None


def render(results: dict, threads: int, tflop: dict, outdir: Path) -> tuple[str, Path | None]:
    host = results["host"]
    ghz = cpu_ghz()
    per_cycle = fp32_flop_per_cycle()
    peak_tflops = ghz * per_cycle * threads / 1e3 if ghz else None
    lines = [
        "# Benchmarks: full-size SDXL UNet on this CPU",
        "",
        f"Measured {host['date']} by `python bench/suite.py` on {host['cpu']}, {host['cores']} cores "
        f"({threads} threads for IREE and torch), AVX-512 BF16: {'yes' if host['avx512_bf16'] else 'no'}; "
        f"torch {host['torch']}, {host['iree_compiler']}, Python {host['python']}.",
        "Random weights with the real SDXL base config (2,567,463,684 parameters), batch 1, 77 tokens; "
        "IREE target `cpu` (tuned flags, see `punet compile --list-targets`).",
        "",
        "## Latency, side by side",
        "",
        "Each row is the median of the timed calls of one process that alternates the runner with torch eager "
        "fp32 on the same inputs (warm-up excluded). Ratio: that process's torch eager fp32 median / this "
        "median (>1 is faster). "
        "FLOP floor: the call's FLOPs / this CPU's fp32 peak"
        + (f" ({peak_tflops:.3f} TFLOP/s = {ghz:.2f} GHz x {per_cycle} FLOP/cycle x {threads} cores)"
           if peak_tflops else "")
        + "; `floor / time` is the fraction of that peak reached.",
        "",
        "| size | runner | median s | min s | vs eager fp32 | floor / time | rel L2 vs eager fp32 | peak RSS GiB | .irpa GiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    probes = {(p["size"], p["runner"]): p for p in results["probes"]}
    chart_rows = []
    seen = set()
    for t in results["timings"]:
        size = t["size"]
        base = t["runners"].get("eager float32", {}).get("median_s")
        floor = tflop.get(size, 0) / peak_tflops if peak_tflops else None
        for name, r in t["runners"].items():
            if (size, name) in seen and name == "eager float32":
                continue  # each timing process pairs a runner with eager fp32: show eager once per size
            seen.add((size, name))
            p = probes.get((size, name), {})
            ratio = f"{base / r['median_s']:.2f}x" if base else ""
            frac = f"{floor / r['median_s']:.0%}" if floor else ""
            lines.append(
                f"| {size}x{size} | {name} | {r['median_s']:.2f} | {r['min_s']:.2f} | {ratio} | {frac} | "
                f"{p.get('rel_l2_vs_eager_fp32', float('nan')):.1e} | {p.get('peak_rss_gib', float('nan')):.1f} | "
                f"{p.get('irpa_gib', float('nan')):.1f} |"
            )
            chart_rows.append((f"{size} {name}", r["median_s"]))
    lines += ["", "## Stages", "", "| stage | size | dtype | seconds | peak RSS GiB |", "| --- | --- | --- | ---: | ---: |"]
    for s in results["stages"]:
        lines.append(f"| {s['stage']} | {s.get('size', '')} | {s['dtype']} | {s['seconds']:.0f} | {s['peak_rss_gib']:.2f} |")
    chart = _chart(chart_rows, outdir / "benchmarks.png")
    if chart:
        lines += ["", f"![latency]({chart.name})"]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        "pip install -e '.[test,bench]'",
        f"python bench/suite.py --threads {threads}",
        "```",
        "",
        "CPU flag experiments, including the misses, are in [cpu-tuning.md](cpu-tuning.md).",
        "",
    ]
    return "\n".join(lines), chart


def _chart(rows: list[tuple[str, float]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1))
    names = [r[0] for r in rows][::-1]
    ax.barh(names, [r[1] for r in rows][::-1], color=["#4c72b0" if "iree" in n else "#dd8452" for n in names])
    ax.set_xlabel("seconds per UNet call (median, lower is better)")
    ax.set_title("SDXL UNet, batch 1: IREE (blue) vs torch eager (orange)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
