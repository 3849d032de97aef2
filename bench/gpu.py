"""GPU benchmark: the SDXL UNet CFG step, IREE CUDA / Vulkan vs torch eager (and torch.compile) on one GPU.

Run on an NVIDIA machine with torch (CUDA) and iree-base-runtime, from the repo root:

    bash bench/gpu.sh artifacts/gpu-vmfb   # the folder holds the .vmfb files compiled beforehand

Prepare on any machine with the compiler (`bash bench/gpu.sh --prepare artifacts/gpu`): it exports the
full-size SDXL CFG step in fp16 (plain and with decomposed attention) from a meta-device model, and
compiles it for `sm_80` (CUDA PTX, JIT-compiled by the driver on Hopper; tuned and plain flags) and
`vulkan-ampere`. The .vmfb files hold no weights (a few MiB), so they travel; the weights are generated
on the GPU machine: punet's deterministic random weights with the real SDXL config.

Every runner gets the same inputs (`make_inputs`, seed 0) and is timed the same way: warm-up calls,
then `--repeat` calls, each synchronised (torch: `cuda.synchronize`; IREE: the result is read back).
Prints, per runner: load time, ms per step (median), ratio to torch eager, the fraction of the GPU's
dense fp16 tensor peak reached, and relative L2 error against torch eager fp16 and against torch
eager fp32. Each row is written to --json as soon as it is measured. Without a GPU it fails with one
line, never silently; `--torch-device cpu` runs the same code on CPU-compiled modules (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Dense fp16 tensor-core peaks (TFLOP/s), from NVIDIA's data sheets (SXM parts).
PEAK_FP16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.0}
TFLOP_PER_STEP = {(1024, 1024): 13.52}  # torch.utils.flop_counter, SDXL UNet, 2 rows (bench/flops.py)
DRIVERS = {"cuda": "cuda", "vulkan": "vulkan", "local-task": "local-task"}


def fail(msg: str) -> None:
    print(f"bench/gpu.py: error: {msg}", file=sys.stderr)
    sys.exit(1)


def peak_for(name: str) -> float | None:
    return next((v for key, v in PEAK_FP16_TFLOPS.items() if key in name), None)


def time_calls(call, sync, warmup: int, repeat: int, budget_s: float = float("inf")) -> list[float]:
    """Milliseconds of each of `repeat` synchronised calls after `warmup` untimed ones; a row whose
    calls (warm-up included) pass `budget_s` stops early, after at least 3 timed calls (a slow
    runner, e.g. fp32 on CUDA at 7 s a step, must not eat the device time of the rows after it)."""
    start = time.perf_counter()
    for _ in range(warmup):
        call()
        sync()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        sync()
        out.append((time.perf_counter() - t0) * 1e3)
        if len(out) >= 3 and time.perf_counter() - start > budget_s:
            break
    return out


def rel_l2(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def host_info(torch) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        from importlib.metadata import version

        info["iree_runtime"] = version("iree-base-runtime")
    except Exception as e:  # reported, not fatal
        info["iree_runtime"] = f"unavailable: {e}"
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = "unavailable"
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("vmfb_dir", help="folder with the compiled .vmfb files and their .json build records")
    p.add_argument("--irpa", required=True, help="parameter archive generated on this machine")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--row-budget", type=float, default=60.0, metavar="S",
                   help="stop a runner's timed calls once its calls took S seconds (at least 3 calls; default 60)")
    p.add_argument("--torch-device", default="cuda", help="cuda (default), or cpu for a smoke test")
    p.add_argument("--torch-compile", action="store_true", help="also time torch.compile (last; slow to compile)")
    p.add_argument("--json", help="write the figures here (rewritten after every runner)")
    a = p.parse_args()

    import torch

    if a.torch_device == "cuda" and not torch.cuda.is_available():
        fail("no CUDA GPU visible to torch (torch.cuda.is_available() is False); run this on an NVIDIA machine")
    from punet.eager import call_model
    from punet.runtime import Session, load_build_info
    from punet.signature import Signature, dtype_from_name, make_inputs
    from punet.weights import load_model

    vmfbs = sorted(Path(a.vmfb_dir).glob("*.vmfb"))
    if not vmfbs:
        fail(f"no .vmfb in {a.vmfb_dir}")
    infos = {v: load_build_info(v) for v in vmfbs}
    sigs = {json.dumps(i["signature"], sort_keys=True) for i in infos.values()}
    if len(sigs) != 1:
        fail(f"the .vmfb files in {a.vmfb_dir} have different signatures: {sorted(sigs)}")
    sig = Signature(**json.loads(sigs.pop()))
    dev = a.torch_device
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    gpu = torch.cuda.get_device_name(0) if dev == "cuda" else platform.processor() or "cpu"
    host = host_info(torch)
    tflop = TFLOP_PER_STEP.get((sig.height, sig.width)) if sig.cfg and sig.batch == 1 else None
    peak = peak_for(gpu)
    report = {"gpu": gpu, "host": host, "signature": sig.to_dict(), "tflop_per_step": tflop,
              "peak_fp16_tflops": peak, "warmup": a.warmup, "repeat": a.repeat, "rows": []}
    print(f"{gpu}; {host}", flush=True)

    def record(name: str, load_s: float, ms: list[float], out, note: str = "") -> None:
        row = {"runner": name, "load_s": round(load_s, 2), "median_ms": statistics.median(ms), "min_ms": min(ms),
               "calls": len(ms), "samples_ms": ms, "rel_l2_vs_torch_fp16": rel_l2(out, ref16), "rel_l2_vs_torch_fp32": rel_l2(out, ref32),
               "note": note}
        report["rows"].append(row)
        print(f"  {name}: load {load_s:.1f} s, median {row['median_ms']:.1f} ms, "
              f"rel L2 vs fp16 {row['rel_l2_vs_torch_fp16']:.2e}, vs fp32 {row['rel_l2_vs_torch_fp32']:.2e}", flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(report, indent=2))

    t0 = time.perf_counter()
    model, config = load_model(a.irpa, dtype="float32", device=dev)
    x = make_inputs(config, sig, 0)
    x32 = {k: (v.float() if v.is_floating_point() else v).to(dev) for k, v in x.items()}
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # a true fp32 reference (cuDNN convs default to TF32)
    ref32 = call_model(model, x32).float().cpu()
    torch.backends.cudnn.allow_tf32 = tf32
    model = model.to(dtype_from_name(sig.dtype))
    load_s = time.perf_counter() - t0
    xg = {k: v.to(dev) for k, v in x.items()}
    ref16 = call_model(model, xg).float().cpu()
    ms = time_calls(lambda: call_model(model, xg), sync, a.warmup, a.repeat, a.row_budget)
    record(f"torch eager {sig.dtype} (SDPA)", load_s, ms, ref16, "load_s includes an fp32 reference call")
    if dev == "cuda":  # the same kernels replayed as a CUDA graph: torch's time without host launch overhead
        try:
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                call_model(model, xg)  # warm-up on the capture stream
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph):
                static_out = call_model(model, xg)
            graph.replay()
            sync()
            ms = time_calls(graph.replay, sync, a.warmup, a.repeat, a.row_budget)
            record(f"torch eager {sig.dtype} (SDPA) as a CUDA graph", 0.0, ms, static_out.float().cpu(),
                   "kernels of the eager model captured once and replayed: no Python/launch overhead")
            del graph, static_out
        except Exception as e:  # capture is best effort; report why it did not work
            print(f"  skip torch CUDA graph: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
    eager_model = model

    for vmfb, info in infos.items():
        device = DRIVERS.get(info["driver"])
        if device is None or (dev == "cuda") != (device != "local-task"):
            continue
        form = info.get("attention") or ("decomposed" if "_decomposed." in vmfb.name else "fused")
        decomposed = f"{form} attention"
        name = f"IREE {info.get('label') or info['target'] + (' tuned' if info['tuned'] else ' plain') + ', ' + decomposed}"
        name += f" ({device})"
        try:
            t0 = time.perf_counter()
            session = Session.load(vmfb, a.irpa, device)
            args = session.to_device(x)
            out = session.to_torch(session.call(args)).float()  # the first call JIT-compiles kernels
            load_s = time.perf_counter() - t0
            ms = time_calls(lambda: session.to_torch(session.call(args)), lambda: None, a.warmup, a.repeat, a.row_budget)
        except Exception as e:  # a missing driver is reported; the other runners still run
            print(f"  skip {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", flush=True)
            report["rows"].append({"runner": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            if a.json:
                Path(a.json).write_text(json.dumps(report, indent=2))
            continue
        record(name, load_s, ms, out)
        session = args = None  # release the device buffers before the next module

    if a.torch_compile:
        t0 = time.perf_counter()
        compiled = torch.compile(eager_model)
        out = call_model(compiled, xg)
        sync()
        load_s = time.perf_counter() - t0
        ms = time_calls(lambda: call_model(compiled, xg), sync, a.warmup, a.repeat, a.row_budget)
        record(f"torch.compile {sig.dtype} (inductor, default mode)", load_s, ms, out.float().cpu(),
               "load_s = first call, i.e. compile time")

    rows = [r for r in report["rows"] if "median_ms" in r]
    base = rows[0]["median_ms"]
    print(f"\n{gpu}; SDXL UNet {sig.entry} batch {sig.batch}, {sig.height}x{sig.width}, {sig.dtype}"
          + (f"; {tflop} TFLOP/step" if tflop else "") + f"; median of up to {a.repeat} calls after {a.warmup} warm-up ({a.row_budget:g} s a row at most)")
    print(f"{'runner':44} {'load s':>7} {'calls':>5} {'ms/step':>9} {'vs torch':>9} {'of peak':>8} {'L2 vs fp16':>11} {'L2 vs fp32':>11}")
    for r in rows:
        m = r["median_ms"]
        frac = f"{tflop / (m / 1e3) / peak:.0%}" if (peak and tflop) else "n/a"
        print(f"{r['runner']:44} {r['load_s']:7.1f} {r['calls']:5d} {m:9.1f} {base / m:8.2f}x {frac:>8} "
              f"{r['rel_l2_vs_torch_fp16']:11.2e} {r['rel_l2_vs_torch_fp32']:11.2e}")


if __name__ == "__main__":
    main()
