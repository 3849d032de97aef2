"""The benchmark scripts fail loudly where they cannot run, and count FLOPs like torch does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


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
