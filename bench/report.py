"""Render bench/suite.py results into docs/benchmarks.md (its own section) and a PNG chart.

Only the text between BEGIN and END is the suite's: `write_report` replaces it and keeps the rest of the
file (the hand-written sections of earlier machines). No torch, OpenVINO or matplotlib needed (the chart is
skipped without matplotlib).
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from punet.host import cpuinfo_fields

BEGIN = "<!-- suite:begin -->"
END = "<!-- suite:end -->"
BASE = "eager float32"
KIND_LABEL = {"eager": "torch eager", "iree": "IREE", "compile": "torch.compile", "openvino": "OpenVINO"}
KIND_COLOR = {"iree": "#4c72b0", "eager": "#dd8452", "compile": "#55a868", "openvino": "#8172b3"}
SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8"}
# OpenVINO's CPU plugin computes in the precision hint; the IR itself is float32 (bench/worker.py).
OV_PRECISION = {"float32": "f32", "bfloat16": "bf16"}
ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx")


def fp32_flop_per_cycle(cpuinfo: str | None = None) -> tuple[int, str]:
    """Peak fp32 FLOP per cycle per core, and why: 2 FMA pipes x fp32 lanes x 2. AVX-512 has 16 lanes,
    except on AMD Zen 4 (family 25), which runs 512-bit FMAs on its two 256-bit pipes (8 lanes each)."""
    fields = cpuinfo_fields(cpuinfo)
    flags = set(fields.get("flags", "").split())
    if "avx512f" in flags:
        if fields.get("vendor_id") == "AuthenticAMD" and fields.get("cpu family") == "25":
            return 32, "AVX-512 on Zen 4: 2 FMA pipes x 8 fp32 lanes (256-bit) x 2"
        return 64, "AVX-512: 2 FMA units x 16 fp32 lanes x 2"
    if "avx2" in flags and "fma" in flags:
        return 32, "AVX2+FMA: 2 FMA units x 8 fp32 lanes x 2"
    return 16, "SSE: 2 units x 4 lanes x 2"


def cpu_label(host: dict, bold: bool = False) -> str:
    """The suite host's CPU as the report names it: model name, then family and model where recorded."""
    name = f"**{host['cpu']}**" if bold else host["cpu"]
    return name + (f" ({host['cpu_id']})" if host.get("cpu_id") else "")


def cpu_ghz() -> float | None:
    mhz = cpuinfo_fields().get("cpu MHz")
    return float(mhz) / 1000 if mhz else None


def label(name: str) -> str:
    """'openvino bfloat16' -> 'OpenVINO bf16'."""
    kind, _, dtype = name.partition(" ")
    return f"{KIND_LABEL.get(kind, kind)} {SHORT.get(dtype, dtype)}"


def pooled(timings: list[dict]) -> list[dict]:
    """`timings` with each alone runner's rounds (bench/suite.py --rounds) merged into one entry, where its
    first round was: the calls of every round pooled (median and min over all of them), each round's own
    median kept in `round_medians_s`, the processes' largest peak RSS. Entries without a round are kept as
    they are."""
    out: list[dict] = []
    merged: dict[tuple, dict] = {}
    for t in timings:
        if "round" not in t or len(t["runners"]) != 1:
            out.append(t)
            continue
        (name, r), = t["runners"].items()
        m = merged.get((t["size"], name))
        if m is None:
            m = merged[(t["size"], name)] = dict(t, rounds=0, runners={name: dict(r, samples_s=[], round_medians_s=[])})
            out.append(m)
        mr = m["runners"][name]
        mr["samples_s"] += r["samples_s"]
        mr["round_medians_s"].append(r["median_s"])
        mr["median_s"], mr["min_s"] = statistics.median(mr["samples_s"]), min(mr["samples_s"])
        m["rounds"] += 1
        rss = [x for x in (m.get("peak_rss_gib"), t.get("peak_rss_gib")) if x is not None]
        m["peak_rss_gib"] = max(rss) if rss else None
    return out


def rows(results: dict, tflop: dict, peak_tflops: float | None) -> list[dict]:
    """One row per runner and size, eager fp32 first in each size.

    A paired row's ratio is against the eager fp32 of its own process; an alone row's against the eager fp32
    process timed alone at that size (blank without one). Eager fp32 is shown once per size: from its
    alone process if there is one, else from the first process that holds it.
    """
    probes = {(p["size"], p["runner"]): p for p in results["probes"]}
    builds: dict[tuple, float] = {}
    for s in results["stages"]:
        if s["stage"] in ("export", "compile"):
            key = (s["size"], "iree " + s["dtype"])
            builds[key] = builds.get(key, 0.0) + s.get("built_s", s["seconds"])
        elif s["stage"] == "openvino convert":
            for dtype in SHORT:  # one float32 IR serves every OpenVINO precision
                builds[(s["size"], "openvino " + dtype)] = s["seconds"]
    out = []
    all_timings = pooled(results["timings"])
    sizes = list(dict.fromkeys(t["size"] for t in all_timings))
    for size in sizes:
        timings = [t for t in all_timings if t["size"] == size]
        base_alone = next((t for t in timings if list(t["runners"]) == [BASE]), None)
        first_base = base_alone or next((t for t in timings if BASE in t["runners"]), None)
        entries = [(first_base, BASE)] if first_base else []
        entries += [(t, name) for t in timings for name in t["runners"] if name != BASE]
        floor = (tflop.get(str(size)) or tflop.get(size) or 0) / peak_tflops if peak_tflops else 0
        for t, name in entries:
            r = t["runners"][name]
            paired = len(t["runners"]) > 1
            ref = t if paired or name == BASE else base_alone
            base = ref["runners"][BASE]["median_s"] if ref else None
            p = probes.get((size, name), {})
            out.append({
                "size": size, "runner": name, "label": label(name), "kind": name.split(" ")[0],
                "timed": "paired" if paired else "alone" + (f" x{t['rounds']}" if t.get("rounds", 1) > 1 else ""),
                "round_medians_s": r.get("round_medians_s"), "process_rss_gib": t.get("peak_rss_gib"),
                "median_s": r["median_s"], "min_s": r["min_s"],
                "ratio": base / r["median_s"] if base else None,
                "floor_fraction": floor / r["median_s"] if floor else None,
                "rel_l2": p.get("rel_l2_vs_eager_fp32"), "peak_rss_gib": p.get("peak_rss_gib"),
                "build_s": builds.get((size, name)), "load_s": p.get("load_s"), "first_call_s": p.get("first_call_s"),
                "source": r.get("source"),
            })
    return out


PEER_KINDS = ("eager", "compile", "openvino")


def versus(table: list[dict]) -> list[dict]:
    """IREE's speed relative to each peer row of its size and dtype (>1: IREE faster), one entry per IREE row.

    The ratio of the two rows' ratios to their own torch eager fp32, so a paired peer and an alone IREE
    compare through their baselines (for two alone rows it is the peer's median / IREE's); the medians'
    quotient where a row has no ratio. Where both ran alone over the same number of rounds, `rounds` holds
    each round's peer median / IREE median.
    """
    out = []
    for r in table:
        if r["kind"] != "iree":
            continue
        dtype = r["runner"].split(" ", 1)[1]
        entry: dict = {"size": r["size"], "dtype": dtype, "peers": {}, "rounds": {}}
        for peer in table:
            if peer["size"] != r["size"] or peer["kind"] not in PEER_KINDS or peer["runner"].split(" ", 1)[1] != dtype:
                continue
            if r["ratio"] and peer["ratio"]:
                entry["peers"][peer["kind"]] = r["ratio"] / peer["ratio"]
            else:
                entry["peers"][peer["kind"]] = peer["median_s"] / r["median_s"]
            mine, theirs = r.get("round_medians_s") or [], peer.get("round_medians_s") or []
            if len(mine) > 1 and len(mine) == len(theirs):
                entry["rounds"][peer["kind"]] = [b / a for a, b in zip(mine, theirs)]
        if entry["peers"]:
            out.append(entry)
    return out


def _f(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def render(results: dict, chart: Path | None = None) -> str:
    """The suite's section (without its markers); `chart`: the PNG it links, written beside the markdown."""
    host = results["host"]
    threads = results.get("threads") or host["cores"]
    ghz = host.get("ghz", cpu_ghz())
    per_cycle = host.get("fp32_flop_per_cycle") or fp32_flop_per_cycle()[0]
    peak_tflops = ghz * per_cycle * threads / 1e3 if ghz else None
    tflop = results.get("tflop_per_call", {})
    model = results.get("model", {})
    flags = host.get("flags") or {"avx512_bf16": host.get("avx512_bf16"), "amx": host.get("amx")}
    isa = ", ".join(f"{f} {'yes' if flags.get(f) else 'no'}" for f in ISA_FLAGS if f in flags)
    versions = [f"torch {host['torch']}", str(host["iree_compiler"])]
    if host.get("openvino"):
        versions.append(f"OpenVINO {host['openvino']}")
    versions.append(f"Python {host['python']}")
    params = model.get("parameters")
    config = Path(model.get("config", "")).name or "the real SDXL base config"
    lines = [
        "## CPU: `bench/suite.py` (generated)",
        "",
        f"Generated {host['date']} by `{results.get('command', 'python bench/suite.py')}`. "
        "This section is rewritten by each run; the rest of this file is not.",
        "",
        f"- CPU: {cpu_label(host, bold=True)}, {host['cores']} cores; ISA flags: {isa}.",
        f"- Threads: {threads} for every runner (torch, IREE, OpenVINO); {', '.join(versions)}.",
        f"- Model: `{config}` with random weights"
        + (f" ({params:,} parameters)" if params else "")
        + (", the real SDXL base config" if model.get("full_size_sdxl") else "")
        + "; batch 1, no CFG; IREE: `punet compile --target cpu --pack-weights` + `punet pack` (the tuned flags with "
        "weights packed once and used in place; docs/cpu-tuning.md)"
        + {"memory": ", the packed archive read into memory at load (`punet bench --weights memory`)",
           "mapped": ", the packed archive mapped from its file"}.get(model.get("iree_weights"), "") + ".",
    ]
    shapes = {}
    for p in results["probes"]:
        if p.get("inputs") and p.get("runner") == BASE:
            shapes[p["size"]] = p["inputs"]
    for size, inputs in shapes.items():
        lines.append(f"- Inputs at {size}x{size} (eager fp32; other dtypes cast the float inputs): "
                     + ", ".join(f"`{k}` {list(s)} {d}" for k, (s, d) in inputs.items()) + ".")
    table = rows(results, tflop, peak_tflops)
    lines += [
        "",
        "### Latency",
        "",
        "Median and min of the timed calls (warm-up excluded). **Timed**: `paired` rows come from a process "
        "that alternates the runner with torch eager fp32 on the same inputs, and their ratio is that "
        "process's eager fp32 median / this median (>1 is faster); `alone` rows ran in a process of their "
        "own (`--alone`, for a pair that does not fit in memory), their ratio is against an eager fp32 "
        "process timed alone. "
        "Floor / time: the call's FLOPs / this CPU's fp32 peak"
        + (f" ({peak_tflops:.3f} TFLOP/s = {ghz:.2f} GHz x {per_cycle} FLOP/cycle x {threads} threads)"
           if peak_tflops else "")
        + ", the fraction of that peak reached (blank where the FLOP count is not known: full-size SDXL "
        "config only). Rel L2, peak RSS, load and first call: one probe process per runner (load + one "
        "call; ru_maxrss, memory-mapped weights count). Build: IREE export + iree-compile (a reused up-to-date "
        "module counts its own compile time, from its build record), OpenVINO "
        "`convert_model` + `save_model` (stages below); load: the .vmfb + .irpa, `compile_model` of the IR, "
        "or the torch model; first call: torch.compile compiles there.",
        "",
        "| size | runner | timed | median s | min s | vs eager fp32 | floor / time | rel L2 vs eager fp32 "
        "| peak RSS GiB | build s | load s | first call s |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in table:
        lines.append(
            f"| {r['size']}x{r['size']} | {r['label']} | {r['timed']} | {r['median_s']:#.3g} | {r['min_s']:#.3g} | "
            f"{_f(r['ratio'], '.2f')}{'x' if r['ratio'] else ''} | {_f(r['floor_fraction'], '.0%')} | "
            f"{'0' if r['rel_l2'] == 0 else _f(r['rel_l2'], '.1e')} | {_f(r['peak_rss_gib'], '.2f')} | {_f(r['build_s'], '.1f')} | "
            f"{_f(r['load_s'], '.2f')} | {_f(r['first_call_s'], '.2f')} |"
        )
    pairs = [f"{r['size']} {r['label']}" for r in table if r["timed"] == "paired" and r["runner"] != BASE]
    alone = [f"{r['size']} {r['label']}" for r in table if r["timed"].startswith("alone")]
    lines += [
        "",
        "Paired with torch eager fp32: " + (", ".join(pairs) or "none") + ". Alone: " + (", ".join(alone) or "none")
        + ". Timing processes' peak RSS (GiB): "
        + ", ".join(f"{t['size']} {' + '.join(label(n) for n in t['runners'])} {t['peak_rss_gib']:.2f}"
                    for t in pooled(results["timings"]) if t.get("peak_rss_gib") is not None) + ".",
        "",
        "Runners: torch eager = punet's torch model (SDPA attention) under `torch.inference_mode()`; "
        "torch.compile = `torch.compile(model)` of that model (inductor, default mode) on the same inputs; "
        "OpenVINO = `ov.convert_model` of that float32 model, saved as an IR once per size and compiled by the "
        "CPU plugin (`INFERENCE_PRECISION_HINT` f32, or bf16 for the bf16 row: the same float32 IR; "
        "`PERFORMANCE_HINT` LATENCY, `INFERENCE_NUM_THREADS` as above). A paired OpenVINO runner is "
        "converted in its timing process from the eager fp32 model it alternates with, sharing its weights, "
        "and a paired torch.compile fp32 runner compiles that same model: the weights are read once.",
    ]
    head = versus(table)
    if head:
        kinds = [k for k in PEER_KINDS if any(k in e["peers"] for e in head)]
        lines += [
            "", "### IREE against each runner", "",
            "IREE's speed relative to the runner in the same dtype at the same size (>1: IREE is faster): the "
            "quotient of the two rows' ratios to torch eager fp32, so paired and alone rows compare through "
            "their own baselines; *by round*: where both ran alone in every round (`--rounds`), the quotient "
            "of their medians in each round (a round's processes run one after another).",
            "",
            "| size | dtype | " + " | ".join(f"vs {KIND_LABEL[k]}" for k in kinds) + " | by round |",
            "| --- | --- | " + " | ".join("---:" for _ in kinds) + " | --- |",
        ]
        for e in head:
            by_round = "; ".join(f"{KIND_LABEL[k]}: " + ", ".join(f"{x:.2f}x" for x in v) for k, v in e["rounds"].items())
            lines.append(f"| {e['size']}x{e['size']} | {SHORT.get(e['dtype'], e['dtype'])} | "
                         + " | ".join(_f(e["peers"].get(k), ".2f") + ("x" if k in e["peers"] else "") for k in kinds)
                         + f" | {by_round} |")
    lines += ["", "### Stages", "", "| stage | size | dtype | seconds | peak RSS GiB |",
              "| --- | --- | --- | ---: | ---: |"]
    for s in results["stages"]:
        note = ""
        if s.get("reused"):
            note = f" (reused: up to date{'; built in %.1f s' % s['built_s'] if 'built_s' in s else ''})"
        lines.append(f"| {s['stage']} | {s.get('size', '')} | {s['dtype']} | {s['seconds']:.1f}{note} | "
                     f"{s['peak_rss_gib']:.2f} |")
    if chart:
        lines += ["", f"![latency per runner and size]({chart.name})"]
    return "\n".join(lines) + "\n"


def splice(existing: str, section: str) -> str:
    """`existing` with the text between the markers replaced by `section`; markers added after the title."""
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if existing.count(BEGIN) > 1 or existing.count(END) > 1:
        raise ValueError(f"more than one {BEGIN} or {END}: fix the file by hand")
    if BEGIN in existing and END in existing:
        i, j = existing.index(BEGIN), existing.index(END) + len(END)
        if j < i:
            raise ValueError(f"{END} before {BEGIN}")
        return existing[:i] + block + existing[j:]
    if BEGIN in existing or END in existing:
        raise ValueError(f"only one of {BEGIN} and {END}: fix the file by hand")
    title = re.search(r"^# .*\n", existing, flags=re.M)
    if title is None:
        return block + "\n\n" + existing
    k = title.end()
    return existing[:k] + "\n" + block + "\n" + existing[k:]


def write_report(results: dict, out: Path, chart: bool = True) -> Path | None:
    """Write the suite's section into `out` (created with a title if missing) and the chart beside it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    path = _chart(results, out.with_suffix(".png")) if chart else None
    existing = out.read_text() if out.is_file() else "# Benchmarks\n"
    out.write_text(splice(existing, render(results, path)))
    return path


def _chart(results: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    table = rows(results, {}, None)
    sizes = list(dict.fromkeys(r["size"] for r in table))
    if not sizes:
        return None
    counts = [sum(r["size"] == s for r in table) for s in sizes]
    fig, axes = plt.subplots(len(sizes), 1, figsize=(8, 0.4 * sum(counts) + 1.2 * len(sizes)),
                             gridspec_kw={"height_ratios": counts}, squeeze=False)
    for ax, size in zip(axes[:, 0], sizes):
        group = [r for r in table if r["size"] == size][::-1]
        names = [r["label"] + (" (alone)" if r["timed"].startswith("alone") else "") for r in group]
        values = [r["median_s"] for r in group]
        ax.barh(names, values, color=[KIND_COLOR.get(r["kind"], "#999999") for r in group])
        for i, r in enumerate(group):
            text = f" {r['median_s']:#.3g} s" + (f"  {r['ratio']:.2f}x" if r["ratio"] else "")
            ax.text(r["median_s"], i, text, va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.3)
        ax.set_title(f"{size}x{size}", fontsize=10, loc="left")
    axes[-1, 0].set_xlabel("seconds per UNet call (median, lower is better; ratio: vs torch eager fp32)")
    kinds = [k for k in KIND_LABEL if any(r["kind"] == k for r in table)]
    fig.legend(handles=[Patch(color=KIND_COLOR[k], label=KIND_LABEL[k]) for k in kinds],
               loc="upper right", fontsize=8, ncol=len(kinds))
    fig.suptitle(f"UNet, batch 1, {cpu_label(results['host'])}", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
