"""GPU benchmark: SDXL UNet CFG step at 1024x1024 (2 UNet rows), IREE CUDA / Vulkan vs torch eager fp16.

Run on an NVIDIA machine with torch (CUDA) and iree-base-runtime, from the repo root:

    bash bench/gpu.sh artifacts/gpu      # artifacts/gpu holds the .vmfb files compiled beforehand

Prepare on any machine with the compiler (`bash bench/gpu.sh --prepare artifacts/gpu`): it exports the
full-size SDXL CFG step in fp16 (plain and with decomposed attention) from a meta-device model, and
compiles it for `sm_80` (CUDA PTX, JIT-compiled by the driver on Hopper) and `vulkan-ampere`.
The .vmfb files hold no weights (a few MiB), so they travel; the 5 GB of weights are generated on the
GPU machine (`punet import builtin:...`), deterministic random weights with the real SDXL config.

Prints, per runner: ms per step (median of --repeat after warm-up), ratio to torch eager fp16, the
fraction of the GPU's dense fp16 tensor peak reached, and relative L2 error against torch eager.
Without a GPU it fails with one line, never silently.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

# Dense fp16 tensor-core peaks (TFLOP/s), from NVIDIA's data sheets.
PEAK_FP16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
TFLOP_PER_STEP = 13.52  # torch.utils.flop_counter, SDXL UNet, 1024x1024, 2 rows (bench/flops.py)


def fail(msg: str) -> None:
    print(f"bench/gpu.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def peak_for(name: str) -> float | None:
    for key, v in PEAK_FP16_TFLOPS.items():
        if key in name:
            return v
    return None


def time_calls(call, sync, warmup: int, repeat: int) -> list[float]:
    for _ in range(warmup):
        call()
        sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vmfb_dir", help="folder with the compiled .vmfb files and their .json build records")
    p.add_argument("--irpa", required=True, help="fp16 parameter archive generated on this machine")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--json", help="write the figures here too")
    a = p.parse_args()

    import torch

    if not torch.cuda.is_available():
        fail("no CUDA GPU visible to torch (torch.cuda.is_available() is False); run this on an NVIDIA machine")
    from punet.eager import call_model
    from punet.runtime import Session
    from punet.signature import Signature, make_inputs
    from punet.weights import load_model

    gpu = torch.cuda.get_device_name(0)
    sig = Signature(1, 1024, 1024, "float16", cfg=True)
    model, config = load_model(a.irpa, dtype="float16", device="cuda")
    x = make_inputs(config, sig, 0)
    xg = {k: v.cuda() for k, v in x.items()}
    ref = call_model(model, xg).float().cpu()
    rows = []
    ms = time_calls(lambda: call_model(model, xg), torch.cuda.synchronize, a.warmup, a.repeat)
    rows.append(("torch eager fp16 (SDPA)", statistics.median(ms), 0.0))
    del model
    torch.cuda.empty_cache()

    for vmfb in sorted(Path(a.vmfb_dir).glob("*.vmfb")):
        info = json.loads(Path(str(vmfb) + ".json").read_text())
        device = {"cuda": "cuda", "vulkan": "vulkan"}.get(info["driver"])
        if device is None:
            continue
        try:
            session = Session.load(vmfb, a.irpa, device, verify_weights=False)
        except Exception as e:  # a missing driver is reported, the other runners still run
            print(f"skip {vmfb.name}: {str(e).splitlines()[0]}", file=sys.stderr)
            continue
        args = session.to_device(x)
        out = session.to_torch(session.call(args)).float()
        err = ((out - ref).norm() / ref.norm()).item()
        ms = time_calls(lambda: session.to_torch(session.call(args)), lambda: None, a.warmup, a.repeat)
        rows.append((f"IREE {info['target']} ({device})", statistics.median(ms), err))

    peak = peak_for(gpu)
    base = rows[0][1]
    print(f"{gpu}; SDXL UNet CFG step 1024x1024, 2 UNet rows, fp16; {TFLOP_PER_STEP} TFLOP/step; "
          f"{a.repeat} calls after {a.warmup} warm-up; torch {torch.__version__}")
    print(f"{'runner':34} {'ms/step':>9} {'vs torch':>9} {'of peak':>8} {'rel L2 vs torch':>16}")
    for name, m, err in rows:
        frac = f"{TFLOP_PER_STEP / (m / 1e3) / peak:.0%}" if peak else "n/a"
        print(f"{name:34} {m:9.1f} {base / m:8.2f}x {frac:>8} {err:16.2e}")
    if a.json:
        Path(a.json).write_text(json.dumps({"gpu": gpu, "rows": rows, "peak_tflops": peak}, indent=2))


if __name__ == "__main__":
    main()
