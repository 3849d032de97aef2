"""Quantized vs float, per model family: how far punet quantize's int8 and int8-fp8attn move the output.

    python bench/quant_accuracy.py                      # the tiny families, a few seconds each
    python bench/quant_accuracy.py --json out.json

For each family of punet's built-in small models (random weights): import fp32, quantize
(4 random calibration samples at 64x64, SmoothQuant alpha 0.5), then run the float model and
each quantized one in torch eager fp32 (and the quantized one in float64) on the same inputs:
timesteps 0, 10 and 999, batch 1 and 2. Prints the relative L2 of quantized vs float (the
quantization error) and of quantized float32 vs float64 (the rounding-flip noise floor).
Random weights make a pessimistic calibration: real checkpoints have smoother activations.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from punet.builtin import TINY_CONFIGS
from punet.eager import call_model
from punet.quant.calibrate import quantize_archive
from punet.signature import Signature, make_inputs
from punet.weights import import_checkpoint, load_model


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


def measure(family: str, work: Path) -> list[dict]:
    f32 = work / f"{family}.irpa"
    import_checkpoint(f"builtin:{family}", f32, dtype="float32")
    fmodel, config = load_model(f32)
    rows = []
    for scheme in ("int8", "int8-fp8attn"):
        q = work / f"{family}_{scheme}.irpa"
        quantize_archive(f32, q, scheme=scheme, samples=4, height=64, width=64)
        q32, _ = load_model(q, dtype="float32")
        q64, _ = load_model(q, dtype="float64")
        for batch in (1, 2):
            for t in (0, 10, 999):
                x = make_inputs(config, Signature(batch, 64, 64), seed=100 + t)
                x["timestep"] = torch.full_like(x["timestep"], float(t))
                x64 = {k: v.double() if v.is_floating_point() else v for k, v in x.items()}
                ref, out, exact = call_model(fmodel, x), call_model(q32, x), call_model(q64, x64)
                rows.append({
                    "family": family, "scheme": scheme, "batch": batch, "timestep": t,
                    "vs_float": rel_l2(out, ref), "f32_vs_f64": rel_l2(out, exact),
                })
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--families", nargs="+", default=list(TINY_CONFIGS))
    p.add_argument("--json", help="write the rows here")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in a.families:
            rows += measure(family, Path(tmp))
    print("| family | scheme | quantized vs float, rel L2 (median, max) | float32 vs float64 (max) |")
    print("| --- | --- | ---: | ---: |")
    for family in a.families:
        for scheme in ("int8", "int8-fp8attn"):
            sel = [r for r in rows if r["family"] == family and r["scheme"] == scheme]
            vs = sorted(r["vs_float"] for r in sel)
            print(f"| {family} | {scheme} | {vs[len(vs) // 2]:.3f}, {vs[-1]:.3f} | {max(r['f32_vs_f64'] for r in sel):.1e} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
