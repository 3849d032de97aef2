"""Full-size SDXL UNet on this CPU: IREE vs torch eager, side by side, written to docs/benchmarks.md.

    python bench/suite.py                       # 256x256 and 512x512, batch 1 (about 40 min on 2 cores)
    python bench/suite.py --sizes 256 --repeat 2

Nothing is downloaded: a random-weight SDXL checkpoint with the real config
(shared/configs/sdxl-base-1.0-unet.json, or --config) is written once under
--work. Then, per dtype and size: `punet import`, `punet export`, `punet
compile --target cpu` (each timed with its peak RSS, as a child process);
a probe process per runner (load + one call) gives its peak RSS and its
output, compared with torch eager fp32; and one timing process per size
alternates all runners on the same inputs and threads, warm-up excluded.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from punet.compile import get_target

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT.parent / "shared" / "configs" / "sdxl-base-1.0-unet.json"
# torch.utils.flop_counter on the real SDXL config (bench/flops.py), batch 1.
TFLOP_PER_CALL = {256: 0.43, 512: 1.59, 1024: 6.76}
# "int8": punet quantize's int8 weights and activations (float32 elsewhere; calibrated on random inputs).
SHORT = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "int8": "int8"}


def run_child(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run `cmd`; return (seconds, peak RSS GiB) of that child alone."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"failed: {' '.join(cmd)} (log: {log})")
    return seconds, usage.ru_maxrss / 2**20


def punet(*args: str) -> list[str]:
    return [sys.executable, "-m", "punet.cli", *args]


def runner_spec(kind: str, dtype: str, work: Path, size: int) -> dict:
    irpa = work / f"unet_{SHORT[dtype]}.irpa"
    spec = {"kind": kind, "dtype": dtype, "irpa": str(irpa), "size": size}
    if kind == "iree":
        spec["vmfb"] = str(work / f"unet_b1_{size}x{size}_{SHORT[dtype]}.cpu.vmfb")
    return spec


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--iree-dtypes", nargs="+", default=["float32", "bfloat16", "float16"],
                   help="float32, bfloat16, float16, int8 (punet quantize of the float32 archive)")
    p.add_argument("--eager-dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--json", default=None, help="raw results (default: <work>/results.json)")
    a = p.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    results: dict = {"stages": [], "probes": [], "timings": []}

    ckpt = work / "checkpoint"
    if not (ckpt / "config.json").is_file():
        print("writing the random-weight checkpoint", flush=True)
        run_child([sys.executable, str(ROOT / "bench" / "make_checkpoint.py"), a.config, str(ckpt), "--dtype", "float16"],
                  logs / "checkpoint.log")

    dtypes = sorted(set(a.iree_dtypes) | set(a.eager_dtypes), key=list(SHORT).index)
    if "int8" in dtypes and "float32" not in dtypes:
        dtypes.insert(0, "float32")
    for dtype in dtypes:
        irpa = work / f"unet_{SHORT[dtype]}.irpa"
        if dtype == "int8" and not irpa.is_file():
            print("quantize int8", flush=True)
            quantize = punet("quantize", str(work / "unet_f32.irpa"), "-o", str(irpa), "--calibration-samples", "2")
            s, rss = run_child(quantize, logs / "quantize_int8.log")
            results["stages"].append({"stage": "quantize", "dtype": dtype, "seconds": s, "peak_rss_gib": rss})
        elif not irpa.is_file():
            print(f"import {dtype}", flush=True)
            s, rss = run_child(punet("import", str(ckpt), "--dtype", dtype, "-o", str(irpa)), logs / f"import_{dtype}.log")
            results["stages"].append({"stage": "import", "dtype": dtype, "seconds": s, "peak_rss_gib": rss})
    for size in a.sizes:
        for dtype in a.iree_dtypes:
            irpa = work / f"unet_{SHORT[dtype]}.irpa"
            mlir = work / f"unet_b1_{size}x{size}_{SHORT[dtype]}.mlir"
            print(f"export + compile {size} {dtype}", flush=True)
            export = punet("export", str(irpa), "--height", str(size), "--width", str(size), "-o", str(mlir))
            if get_target("cpu").decompose_attention:
                export.append("--decompose-attention")
            s, rss = run_child(export, logs / f"export_{size}_{dtype}.log")
            results["stages"].append({"stage": "export", "size": size, "dtype": dtype, "seconds": s, "peak_rss_gib": rss})
            s, rss = run_child(punet("compile", str(mlir), "--target", "cpu"), logs / f"compile_{size}_{dtype}.log")
            results["stages"].append({"stage": "compile", "size": size, "dtype": dtype, "seconds": s, "peak_rss_gib": rss})

    worker = [sys.executable, str(ROOT / "bench" / "worker.py")]
    for size in a.sizes:
        specs = [runner_spec("eager", d, work, size) for d in a.eager_dtypes]
        specs += [runner_spec("iree", d, work, size) for d in a.iree_dtypes]
        reference = work / f"ref_{size}.safetensors"
        # The fp32 eager probe goes first: it writes the reference the others compare to.
        for spec in specs:
            print(f"probe {size} {spec['kind']} {spec['dtype']}", flush=True)
            out = work / f"probe_{size}_{spec['kind']}_{spec['dtype']}.json"
            job = dict(spec, mode="probe", threads=a.threads, reference=str(reference), out=str(out))
            run_child(worker + [json.dumps(job)], logs / f"probe_{size}_{spec['kind']}_{spec['dtype']}.log")
            results["probes"].append(json.loads(out.read_text()))
        # One timing process per runner, alternating it with torch eager fp32: every ratio is measured
        # side by side, and no process holds more than two models (two full-size IREE runners with their
        # packed weights do not fit 24 GB beside torch's).
        base = specs[0]
        for spec in specs[1:] or [base]:
            label = f"{spec['kind']}_{spec['dtype']}"
            print(f"timing {size}: eager float32 and {label} alternating, {a.repeat} calls each", flush=True)
            out = work / f"timing_{size}_{label}.json"
            pair = [base, spec] if spec is not base else [base]
            job = {"mode": "timing", "runners": pair, "threads": a.threads, "repeat": a.repeat, "out": str(out)}
            run_child(worker + [json.dumps(job)], logs / f"timing_{size}_{label}.log")
            results["timings"].append(json.loads(out.read_text()))

    results["host"] = host()
    Path(a.json or work / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, Path(a.out), a)
    print(f"wrote {a.out}")


def host() -> dict:
    import torch

    cpu = platform.machine()
    flags = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = line
    from punet.compile import compiler_version

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "torch": torch.__version__,
        "iree_compiler": compiler_version(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def write_report(results: dict, out: Path, a) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from report import render

    out.parent.mkdir(parents=True, exist_ok=True)
    text, chart = render(results, a.threads, TFLOP_PER_CALL, out.parent)
    out.write_text(text)


if __name__ == "__main__":
    main()
