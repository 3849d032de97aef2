"""The benchmark scripts fail loudly where they cannot run, and count FLOPs like torch does."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


# The scripts with a command line, and the helper modules the others import from bench/.
SCRIPTS = sorted(p.name for p in (ROOT / "bench").glob("*.py")
                 if "argparse" in p.read_text() and p.name != "worker.py")  # worker.py: the suite's JSON child
HELPERS = ("report", "perf_samples", "worker")


@pytest.mark.parametrize("script", SCRIPTS)
def test_bench_script_starts(script):
    """Bug: a script importing a helper that moved (bench/cpu_attention.py imported `cpu_line` from
    cpu_matmul.py after it moved to punet.host, and no test ran it). Reference: argparse's usage line
    naming the script."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / script), "--help"], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith(f"usage: {script}"), r.stdout + r.stderr


def test_bench_helpers_import():
    """The same for the modules bench/ scripts import by name (bench/ first on sys.path, as when run)."""
    code = f"import sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); " + "; ".join(f"import {m}" for m in HELPERS)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr

@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_gpu_script_fails_clearly_without_gpu(tmp_path):
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "no .vmfb" in r.stderr
    (tmp_path / "x.vmfb").write_bytes(b"")
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(tmp_path)], capture_output=True, text=True,
                       env={"PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin", "PYTHON": sys.executable})
    assert r.returncode == 1 and "no CUDA GPU visible to torch" in r.stderr
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), str(tmp_path), "--irpa", "x.irpa"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().startswith("bench/gpu.py: error: no CUDA GPU")


def test_flop_count_of_sdxl_matches_the_known_figure():
    """1.59 TFLOP per SDXL call at 512x512 batch 1 (torch's FLOP counter on the real config)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from flops import count_flops

    from punet import UNetConfig
    from punet.signature import Signature

    cfg = UNetConfig.from_json(ROOT / "tests" / "data" / "configs" / "sdxl-base-1.0-unet.json")
    assert round(count_flops(cfg, Signature(1, 512, 512)) / 1e12, 2) == 1.59
    assert round(count_flops(cfg, Signature(1, 1024, 1024, cfg=True)) / 1e12, 2) == 13.52


def test_gpu_rows_stop_at_their_time_budget(monkeypatch):
    """Bugs in `bench/gpu.py`'s `time_calls`: a slow row runs all its `--repeat` calls (an fp32 CUDA row
    at 7 s a call ate a whole device call in run 16), stops before 3 timed calls, counts the warm-up in
    the figures, leaves the warm-up out of the budget, or stops a row that is within it. Reference: a clock that advances 10 s per
    call, so the calls' count follows from the budget by hand."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu

    clock = [0.0]
    monkeypatch.setattr(gpu.time, "perf_counter", lambda: clock[0])

    def call():
        clock[0] += 10.0

    # warm-up 0-10 s, timed calls end at 20, 30, 40 s: the third passes the 25 s budget
    assert gpu.time_calls(call, lambda: None, 1, 10, budget_s=25.0) == [10_000.0] * 3
    # a budget of 0 still gives 3 calls; a budget of 200 s lets all 10 run
    assert len(gpu.time_calls(call, lambda: None, 2, 10, budget_s=0.0)) == 3
    assert len(gpu.time_calls(call, lambda: None, 1, 10, budget_s=200.0)) == 10
    # the budget counts the warm-up: calls end at 20, 30, 40, 50 s; the fourth passes 45 s
    assert len(gpu.time_calls(call, lambda: None, 1, 10, budget_s=45.0)) == 4


def test_profile_shares_overlapping_dispatches():
    """Bug in `bench/cpu_profile.py`'s `attribute_overlap`: dispatches that ran side by side (a layer's K and
    V projections on one worker each) each charged their whole span, so the kinds added up to 112% of the
    call and both looked half idle (the first Zen 4 profile). Reference: shares worked out by hand; they
    add up to the union of the intervals."""
    sys.path.insert(0, str(ROOT / "bench"))
    from cpu_profile import attribute_overlap

    # A alone 0-10; A and B together 10-20; B alone 20-30; C after a gap; D empty; E and F identical.
    ivs = [(0, 20), (10, 30), (40, 50), (55, 55), (60, 70), (60, 70)]
    assert attribute_overlap(ivs) == [15, 15, 10, 0, 5, 5]
    assert attribute_overlap([(0, 12), (6, 12), (6, 12)]) == [8, 2, 2]  # three at once share 6-12
    assert sum(attribute_overlap(ivs)) == 20 + 10 + 10 + 10  # the union: 0-30, 40-50, 60-70


@pytest.mark.parametrize("data, dtype, hint", [("cpu-profile-zen4-bf16-512-2026-11-28.json", "bfloat16", "bf16"),
                                               ("cpu-profile-zen4-2026-11-27-run3.json", "float32", "f32")])
def test_profile_report_names_the_module_dtype(data, dtype, hint):
    """Bug in `bench/cpu_profile.py`'s report: it said "float32 weights and activations" and OpenVINO
    `INFERENCE_PRECISION_HINT=f32` for every module, a bf16 one too. Reference: the module's dtype in
    the build record's signature, as the profile JSON in docs/data keeps it."""
    import json

    sys.path.insert(0, str(ROOT / "bench"))
    from cpu_profile import render

    res = json.loads((ROOT / "docs" / "data" / data).read_text())
    assert res["flops"]["signature"]["dtype"] == dtype
    out = render(res, dict(res["args"], work="/scratch"))
    assert f"{dtype} weights and activations" in out and f"INFERENCE_PRECISION_HINT={hint}`" in out
    assert ("against the fp32 sgemm rate" in out) == (dtype != "float32")


def test_profile_bins_share_time_among_sampled_functions():
    """Bugs in `bench/perf_samples.py`'s `attribute_bins` (the perf profile's clock): a bin with no sample
    dropped (the kinds no longer add up to the call), each sample charged a whole bin (two workers in one
    bin count it twice), or samples outside the call counted. Reference: shares worked out by hand."""
    sys.path.insert(0, str(ROOT / "bench"))
    from perf_samples import attribute_bins

    samples = [(-1, "A"), (1, "A"), (5, "A"), (12, "A"), (15, "B"), (31, "B"), (40, "A")]
    # bins of 10 over [0, 35): A,A | A,B | nothing | B (a bin of 5)
    assert attribute_bins(samples, 0, 35, 10, "idle") == {"A": 15.0, "B": 10.0, "idle": 10.0}
    assert sum(attribute_bins(samples, 0, 35, 10, "idle").values()) == 35


def test_profile_reads_perf_samples_and_anonymous_code():
    """Bugs in how the perf profile finds IREE's dispatch code: a sample line misread (the time's
    nanoseconds or the hex address), or a file-backed library, a writable mapping or [vdso] taken for the
    anonymous r-x mapping IREE's ELF loader makes. Reference: lines in `perf script -F tid,time,ip --ns`'s
    and /proc/<pid>/maps's formats, read by hand."""
    sys.path.insert(0, str(ROOT / "bench"))
    from perf_samples import anonymous_exec_regions, parse_perf_samples

    text = ("    3838  2079.453101730:  ffffffff8160fb09\n"
            " 3840  2079.000000001:      7f7371e616a7\n"
            "not a sample\n")
    assert parse_perf_samples(text) == [(3838, 2079453101730, 0xFFFFFFFF8160FB09),
                                        (3840, 2079000000001, 0x7F7371E616A7)]
    maps = ("7f7371e4e000-7f7371e81000 r-xp 00000000 00:00 0 \n"
            "7f7371e81000-7f7371e84000 rw-p 00000000 00:00 0 \n"
            "7f83754a8000-7f8375626000 r-xp 00028000 fe:01 1234   /usr/lib/x86_64-linux-gnu/libc.so.6\n"
            "7ffd2f1f0000-7ffd2f1f2000 r-xp 00000000 00:00 0                          [vdso]\n")
    assert anonymous_exec_regions(maps) == [(0x7F7371E4E000, 0x7F7371E81000)]


def test_profile_matches_convolutions_and_projections_by_shape():
    """Bug in `conv_shape_from_name`/`mm_shape_from_name`: IREE's dispatch names (a conv's out channels,
    output map, in channels, kernel; a projection's tokens, out and in features) read in another order
    than `conv_shape_key`/`mm_shape_key` write OpenVINO's nodes (module channels or features and output
    shape), so no op of one runner meets its twin, or a matmul taken for a conv. Reference: the dispatch
    names of the Zen 5 profile and the modules they run (up_blocks.0.resnets.0.conv1: 2560 -> 1280 at
    8x8; down_blocks.1.resnets.1.conv1: 640 -> 640 at 16x16)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from cpu_profile import conv_shape_from_name, conv_shape_key, mm_shape_from_name, mm_shape_key

    assert conv_shape_from_name("main$async_dispatch_1057_conv_1280x8x8x2560x3x3_f32") == conv_shape_key(
        1280, 8, 8, 2560, 3, 3) == "1280 x 8x8 <- 2560, 3x3"
    assert conv_shape_from_name("main$async_dispatch_80_conv_640x16x16x640x3x3_f32") == conv_shape_key(
        640, 16, 16, 640, 3, 3)
    assert conv_shape_from_name("main$async_dispatch_219_batch_matmul_1x64x10240x1280_f32") is None
    # projections: tokens x out features <- in features (the 8x8 level's GEGLU up-projection, 1280 -> 2 x 5120;
    # the time embedding's first Linear, 320 -> 1280, on one row)
    assert mm_shape_from_name("main$async_dispatch_219_batch_matmul_1x64x10240x1280_f32") == mm_shape_key(
        64, 10240, 1280) == "64 x 10240 <- 1280"
    assert mm_shape_from_name("main$async_dispatch_1_matmul_1x1280x320_f32") == mm_shape_key(1, 1280, 320)
    assert mm_shape_from_name("main$async_dispatch_1057_conv_1280x8x8x2560x3x3_f32") is None


@pytest.mark.skipif(not (shutil.which("addr2line") and shutil.which("readelf")), reason="needs binutils")
def test_profile_names_dispatch_code_in_a_vmfb():
    """Bugs in `bench/perf_samples.py`'s `vmfb_elfs`/`elf_exec_span`/`symbolize`: the ELF cut short or not
    found in the module, the executable segment's span (which must match the loader's r-x mapping) off by
    its page rounding, or an address not named by its dispatch. Reference: readelf's program headers and
    sections of the same ELF, and the dispatch named in the compiled module."""
    sys.path.insert(0, str(ROOT / "bench"))
    from perf_samples import elf_exec_span, symbolize, vmfb_elfs
    from iree.compiler import compile_str

    mlir = ("func.func @main(%a: tensor<64xf32>, %b: tensor<64xf32>) -> tensor<64xf32> {\n"
            "  %0 = arith.mulf %a, %b : tensor<64xf32>\n  return %0 : tensor<64xf32>\n}\n")
    vmfb = compile_str(mlir, target_backends=["llvm-cpu"], extra_args=["--iree-llvmcpu-target-cpu=generic"])
    elfs = vmfb_elfs(vmfb)
    assert len(elfs) == 1
    with tempfile.TemporaryDirectory() as d:
        so = Path(d) / "e.so"
        so.write_bytes(elfs[0])
        headers = subprocess.run(["readelf", "-lSW", str(so)], capture_output=True, text=True, check=True).stdout
        load = next(line.split() for line in headers.splitlines() if "LOAD" in line and "R E" in line)
        vaddr, memsz = int(load[2], 16), int(load[5], 16)
        assert elf_exec_span(elfs[0]) == (vaddr // 4096 * 4096, -(-(vaddr + memsz) // 4096) * 4096)
        text = next(line for line in headers.splitlines() if " .text " in line)
        start = int(text.split(".text")[1].split()[1], 16)
        names = symbolize(so, {start})
    assert "main" in names[start] and "dispatch_0" in names[start]
