"""bench/report.py writes the suite's section between its markers and keeps the hand-written text around it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import report  # noqa: E402

HAND = "# Benchmarks: full-size SDXL UNet\n\n## CPU (an earlier machine)\n\nHand-written figures: 7.56 s.\n"


def timing(size, runners, rss=1.0):
    return {"size": size, "threads": 2, "peak_rss_gib": rss,
            "runners": {n: {"median_s": m, "min_s": m * 0.9, "samples_s": [m]} for n, m in runners.items()}}


def probe(size, name, rel):
    return {"runner": name, "size": size, "load_s": 0.5, "first_call_s": 1.5, "peak_rss_gib": 2.0,
            "rel_l2_vs_eager_fp32": rel, "inputs": {"sample": [[1, 4, size // 8, size // 8], "float32"]}}


# Per size: eager fp32 medians differ per process, so a wrong pairing gives a wrong ratio.
MEDIANS = {
    64: {"iree float32": (2.0, 1.0), "compile float32": (2.2, 1.1), "openvino float32": (2.4, 0.6)},
    128: {"iree float32": (8.0, 10.0), "compile float32": (8.8, 4.4), "openvino float32": (9.6, 3.2)},
}


def fake_results() -> dict:
    timings, probes = [], []
    for size, runs in MEDIANS.items():
        probes.append(probe(size, "eager float32", 0.0))
        for name, (base, median) in runs.items():
            timings.append(timing(size, {"eager float32": base, name: median}))
            probes.append(probe(size, name, 1e-6))
    # 128: OpenVINO bf16 timed alone, with an eager fp32 process of its own.
    timings += [timing(128, {"eager float32": 10.0}), timing(128, {"openvino bfloat16": 2.5})]
    return {
        "host": {"cpu": "Fake CPU 9000", "cpu_id": "family 26, model 2", "cores": 2, "flags": {f: f != "amx" for f in report.ISA_FLAGS},
                 "avx512_bf16": True, "amx": False, "ghz": 2.0, "fp32_flop_per_cycle": 64, "torch": "2.x",
                 "iree_compiler": "IREE 3.x", "openvino": "2026.x", "python": "3.11", "date": "2026-01-01"},
        "threads": 2,
        "command": "python bench/suite.py --sizes 64 128",
        "tflop_per_call": {"128": 0.256},  # 64 unknown: blank floor
        "model": {"config": "/tmp/tiny.json", "parameters": 1234},
        "stages": [{"stage": "openvino convert", "size": 64, "dtype": "float32", "seconds": 3.0, "peak_rss_gib": 1.0}],
        "timings": timings,
        "probes": probes,
    }


def table_row(text: str, size: int, label: str) -> list[str]:
    found = [line for line in text.splitlines() if line.startswith(f"| {size}x{size} | {label} |")]
    assert len(found) == 1, (size, label, found)
    return [c.strip() for c in found[0].strip("|").split("|")]


@pytest.mark.parametrize("chart", [False, True])
def test_section_replaces_itself_and_keeps_hand_text(tmp_path, chart):
    if chart:
        pytest.importorskip("matplotlib")
    out = tmp_path / "benchmarks.md"
    out.write_text(HAND + "\n## Reproduce\n\nby hand\n")
    results = fake_results()
    report.write_report(results, out, chart=chart)
    first = out.read_text()
    report.write_report(results, out, chart=chart)
    text = out.read_text()
    assert text == first  # rerun: replaced, not duplicated
    assert text.startswith("# Benchmarks: full-size SDXL UNet\n\n" + report.BEGIN)
    assert text.count(report.BEGIN) == 1 and text.count(report.END) == 1
    assert "Hand-written figures: 7.56 s." in text and text.rstrip().endswith("by hand")
    section = text[text.index(report.BEGIN):text.index(report.END)]
    assert "Fake CPU 9000** (family 26, model 2), 2 cores" in section
    assert "avx512_bf16 yes" in section and "amx no" in section
    for size, runs in MEDIANS.items():
        assert table_row(section, size, "torch eager fp32")[5] == "1.00x"
        for name, (base, median) in runs.items():
            row = table_row(section, size, report.label(name))
            assert row[2] == "paired"
            assert row[5] == f"{base / median:.2f}x"
    alone = table_row(section, 128, "OpenVINO bf16")
    assert alone[2] == "alone" and alone[5] == f"{10.0 / 2.5:.2f}x"
    assert table_row(section, 128, "torch eager fp32")[2] == "alone"
    # FLOP floor: 0.256 TFLOP / (2 GHz x 64 x 2 threads = 0.256 TFLOP/s) = 1 s; blank for the unknown size.
    assert table_row(section, 128, "IREE fp32")[6] == "10%"
    assert table_row(section, 64, "IREE fp32")[6] == ""
    assert table_row(section, 64, "OpenVINO fp32")[9] == "3.0"  # the convert stage
    assert (tmp_path / "benchmarks.png").is_file() == chart

    # Edits outside the section survive a rerun; a new result replaces the old section.
    out.write_text(text + "\nadded later\n")
    results["timings"][0]["runners"]["iree float32"]["median_s"] = 4.0
    report.write_report(results, out, chart=False)
    text = out.read_text()
    assert text.count(report.BEGIN) == 1 and text.rstrip().endswith("added later")
    assert table_row(text, 64, "IREE fp32")[5] == "0.50x"


def test_markers_added_to_a_file_without_title_or_missing(tmp_path):
    out = tmp_path / "new" / "b.md"
    report.write_report(fake_results(), out, chart=False)
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\n" + report.BEGIN) and text.count(report.END) == 1
    plain = tmp_path / "plain.md"
    plain.write_text("notes only\n")
    report.write_report(fake_results(), plain, chart=False)
    assert plain.read_text().startswith(report.BEGIN) and plain.read_text().endswith("notes only\n")
    plain.write_text(f"{report.BEGIN}\n{report.BEGIN}\n{report.END}\n")
    with pytest.raises(ValueError):
        report.write_report(fake_results(), plain, chart=False)


def test_a_reused_module_counts_its_own_build_time(tmp_path):
    """Bug: a suite run that reuses an up-to-date module (`punet compile` in 2 s) reported that 2 s as the
    IREE build time (the first Zen 4 run with torch.compile showed 43.8 s for a 142 s build). Reference:
    the build record's compile time, added to the export stage by hand; the stage row says it was reused."""
    results = fake_results()
    results["stages"] += [
        {"stage": "export", "size": 64, "dtype": "float32", "seconds": 40.0, "peak_rss_gib": 0.6},
        {"stage": "compile", "size": 64, "dtype": "float32", "seconds": 2.0, "peak_rss_gib": 0.3,
         "reused": True, "built_s": 142.0},
        {"stage": "compile", "size": 128, "dtype": "float32", "seconds": 150.0, "peak_rss_gib": 0.8},
    ]
    out = tmp_path / "b.md"
    report.write_report(results, out, chart=False)
    text = out.read_text()
    assert table_row(text, 64, "IREE fp32")[9] == "182.0"
    assert table_row(text, 128, "IREE fp32")[9] == "150.0"
    assert "| compile | 64 | float32 | 2.0 (reused: up to date; built in 142.0 s) | 0.30 |" in text
    assert "| compile | 128 | float32 | 150.0 | 0.80 |" in text


def alone_round(size, name, samples, r, rss=1.0):
    t = timing(size, {name: sorted(samples)[len(samples) // 2]}, rss)
    t["runners"][name]["samples_s"] = list(samples)
    return dict(t, round=r)


def test_rounds_pool_alone_runners_and_compare_iree_round_by_round(tmp_path):
    """Bugs this catches in `--rounds` (bench/suite.py runs the alone processes R times in rotation): the
    report keeping one round's figure (the last, or the first) instead of the median over every round's
    calls; rounds of one runner merged with another's (or one size's with another's); the by-round
    quotient inverted (peer / IREE is >1 when IREE is faster); the eager fp32 baseline of an alone ratio
    taken from a single round. Reference: medians and quotients worked out here by hand."""
    results = fake_results()
    rounds = {  # size 256, two rounds each, in rotation: eager, IREE, OpenVINO, then again
        "eager float32": ([4.0, 4.2, 4.4], [5.0, 5.2, 5.4]),
        "iree float32": ([2.0, 2.1, 2.2], [3.0, 2.9, 3.1]),
        "openvino float32": ([2.2, 2.3, 2.4], [2.6, 2.7, 2.8]),
    }
    for r in (1, 2):
        for name, samples in rounds.items():
            results["timings"].append(alone_round(256, name, samples[r - 1], r, rss=r + 0.5))
    # Size 128's OpenVINO bf16 / eager fp32 alone rows stay single-process rows without rounds.
    out = tmp_path / "b.md"
    report.write_report(results, out, chart=False)
    text = out.read_text()
    eager, iree, ov = (table_row(text, 256, label) for label in ("torch eager fp32", "IREE fp32", "OpenVINO fp32"))
    # Pooled medians of six calls: eager (4.4 + 5.0) / 2 = 4.7, IREE (2.2 + 2.9) / 2 = 2.55, OpenVINO 2.5.
    assert [eager[2], eager[3], eager[4]] == ["alone x2", "4.70", "4.00"]
    assert [iree[2], iree[3], iree[4], iree[5]] == ["alone x2", "2.55", "2.00", f"{4.7 / 2.55:.2f}x"]
    assert [ov[3], ov[5]] == ["2.50", f"{4.7 / 2.5:.2f}x"]
    assert "256 IREE fp32 2.50" in text  # the larger of the two rounds' process RSS
    assert table_row(text, 128, "OpenVINO bf16")[2] == "alone"
    versus = table_row(text, 256, "fp32")
    # vs torch eager = IREE's ratio; vs OpenVINO = 2.5 / 2.55; by round: 4.2/2.1, 5.2/3.0 and 2.3/2.1, 2.7/3.0.
    assert versus[2:5] == [f"{4.7 / 2.55:.2f}x", "", f"{2.5 / 2.55:.2f}x"]
    assert versus[5] == (f"torch eager: {4.2 / 2.1:.2f}x, {5.2 / 3.0:.2f}x; "
                         f"OpenVINO: {2.3 / 2.1:.2f}x, {2.7 / 3.0:.2f}x")
    # Paired rows compare through each process's own eager fp32: IREE 2.0 / 1.0 against torch.compile's
    # 2.2 / 1.1 and OpenVINO's 2.4 / 0.6 (a quotient of medians would give 2.2 / 1.0 and 2.4 / 1.0).
    expected = ["2.00x", f"{(2.0 / 1.0) / (2.2 / 1.1):.2f}x", f"{(2.0 / 1.0) / (2.4 / 0.6):.2f}x"]
    assert table_row(text, 64, "fp32")[2:5] == expected


def test_suite_reads_reuse_from_the_punet_logs(tmp_path):
    """Bug: the suite's reuse check out of step with what `punet compile` / `punet pack` print when they
    reuse an output. Reference: those commands' own messages (punet/cli.py: compile, pack)."""
    import suite

    cli = (ROOT / "punet" / "cli.py").read_text()
    assert "is up to date (reused; --force rebuilds)" in cli and "is up to date (reused; --force packs again)" in cli
    log = tmp_path / "compile.log"
    log.write_text("x.vmfb is up to date (reused; --force rebuilds)\n")
    assert suite.reused(log)
    log.write_text("compiled x.vmfb in 140 s\n")
    assert not suite.reused(log)


@pytest.mark.parametrize("vendor, family, flags, expected", [
    ("AuthenticAMD", "25", "fma avx2 avx512f avx512_bf16", 32),  # Zen 4: 512-bit FMAs on 256-bit pipes
    ("AuthenticAMD", "26", "fma avx2 avx512f", 64),  # Zen 5: full-width pipes
    ("GenuineIntel", "6", "fma avx2 avx512f avx512_vnni", 64),  # Ice Lake / Emerald Rapids
    ("AuthenticAMD", "25", "fma avx2", 32),  # Zen 3
    ("GenuineIntel", "6", "sse4_2", 16),
], ids=["zen4", "zen5", "xeon", "zen3", "sse"])
def test_flop_per_cycle_follows_the_cpu(vendor, family, flags, expected):
    """Bug: every AVX-512 CPU taken as 64 fp32 FLOP per cycle, so the suite's floor on a Zen 4 (which
    splits 512-bit FMAs over 256-bit pipes) was half the true one and its "floor / time" half the real
    fraction. Reference: the vendors' pipe widths (AMD's Zen 4 / Zen 5 optimisation guides)."""
    text = f"processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nflags\t\t: {flags}\n"
    assert report.fp32_flop_per_cycle(text)[0] == expected
