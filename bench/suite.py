"""The SDXL UNet on this CPU: IREE, torch eager, torch.compile and OpenVINO side by side, in docs/benchmarks.md.

    python bench/suite.py                       # 256x256 and 512x512, batch 1 (about 40 min on 2 cores without peers)
    python bench/suite.py --sizes 256 --repeat 2 --peers openvino --alone openvino
    python bench/suite.py --sizes 256 --iree-dtypes float32 --eager-dtypes float32 --peers openvino \
        --alone openvino iree:float32 --rounds 3        # IREE vs OpenVINO fp32, alone in 3 rounds
    python bench/suite.py --config /tmp/tiny.json --work /tmp/suite_tiny --sizes 64 --iree-dtypes float32 \
        --eager-dtypes float32 --repeat 2 --out /tmp/suite_tiny/benchmarks.md    # a small config, minutes

Nothing is downloaded: a random-weight SDXL checkpoint with the real config
(shared/configs/sdxl-base-1.0-unet.json, or --config) is written once under
--work. Then, per dtype and size: `punet import`, `punet export`, `punet
compile --target cpu --pack-weights` + `punet pack`, and per size the OpenVINO IR (`ov.convert_model` of
punet's torch model, saved), each timed with its peak RSS as a child process;
a probe process per runner (load + one call) gives its peak RSS and its
output, compared with torch eager fp32; and one timing process per runner
alternates it with torch eager fp32 on the same inputs and threads, warm-up
excluded (or times it alone: --alone; with --rounds R the alone processes
run R times in rotation and each alone runner pools its rounds' calls). The peers (--peers: torch.compile,
OpenVINO) run the dtypes of --eager-dtypes, bf16 only where the CPU has
AVX-512 BF16 or AMX.

The report is the section between `<!-- suite:begin -->` and `<!-- suite:end -->`
of --out (added after the title if absent); the rest of the file is kept.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

from punet import host as cpu_host
from punet.fileio import WEIGHTS
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


def reused(log: Path) -> bool:
    """Whether `punet compile` / `punet pack` reused an up-to-date output instead of building it (their log says so)."""
    return "(reused; --force" in log.read_text()


def punet(*args: str) -> list[str]:
    return [sys.executable, "-m", "punet.cli", *args]


PEERS = ("compile", "openvino")


def runner_spec(kind: str, dtype: str, work: Path, size: int, iree_weights: str = "mapped") -> dict:
    irpa = work / f"unet_{SHORT[dtype]}.irpa"
    spec = {"kind": kind, "dtype": dtype, "irpa": str(irpa), "size": size}
    if kind == "iree":  # `punet compile --pack-weights` + `punet pack`: the fastest CPU build, weights in place
        spec["vmfb"] = str(work / f"unet_b1_{size}x{size}_{SHORT[dtype]}.cpu-packed.vmfb")
        spec["irpa"] = str(Path(spec["vmfb"]).with_suffix(".irpa"))
        spec["weights"] = iree_weights
    if kind == "openvino":  # one float32 IR per size; bfloat16 is a precision hint on it (bench/worker.py)
        spec["irpa"] = str(work / "unet_f32.irpa")
        spec["xml"] = str(ov_xml(work, size))
    return spec


def ov_xml(work: Path, size: int) -> Path:
    return work / f"unet_f32_{size}.xml"


def peer_dtypes(eager_dtypes: list[str], machine: dict) -> list[str]:
    """The peers' dtypes: --eager-dtypes, less bf16 where the CPU has no native bf16 and what peers do not run."""
    out = []
    for dtype in eager_dtypes:
        if dtype == "bfloat16" and not (machine["avx512_bf16"] or machine["amx"]):
            print("peers: bfloat16 skipped: this CPU has neither AVX-512 BF16 nor AMX (bf16 would be emulated)",
                  flush=True)
        elif dtype not in ("float32", "bfloat16"):
            print(f"peers: {dtype} skipped: torch.compile and OpenVINO run float32 and bfloat16 here", flush=True)
        else:
            out.append(dtype)
    return out


def is_default_config(path: Path) -> bool:
    """Whether `path` is the real SDXL config (the file, or a copy): TFLOP_PER_CALL holds for it alone."""
    if not DEFAULT_CONFIG.is_file():
        return False
    if path.resolve() == DEFAULT_CONFIG.resolve():
        return True

    def fields(p: Path) -> dict:
        return {k: v for k, v in json.loads(p.read_text()).items() if not k.startswith("_")}

    return fields(path) == fields(DEFAULT_CONFIG)


def matches(spec: dict, tokens: list[str]) -> bool:
    """Whether --alone names this runner: by kind (openvino) or kind:dtype (openvino:float32)."""
    return spec["kind"] in tokens or f"{spec['kind']}:{spec['dtype']}" in tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--work", default=str(ROOT / "artifacts" / "bench"))
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--iree-dtypes", nargs="*", default=["float32", "bfloat16", "float16"],
                   help="float32, bfloat16, float16, int8 (punet quantize of the float32 archive)")
    p.add_argument("--eager-dtypes", nargs="+", default=["float32", "bfloat16"],
                   help="must hold float32: torch eager fp32 is every process's baseline and the reference")
    p.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS,
                   help="CPU peers timed beside eager and IREE, in the dtypes of --eager-dtypes (bf16 only with "
                        "AVX-512 BF16 or AMX): compile = torch.compile (inductor), openvino = OpenVINO CPU plugin; "
                        "--peers alone: none")
    p.add_argument("--alone", nargs="*", default=[], metavar="KIND[:DTYPE]",
                   help="runners timed alone in their own process instead of alternating with torch eager fp32 "
                        "(a pair that does not fit in memory), e.g. openvino or iree:float32; their ratio is "
                        "then against an eager fp32 process of its own")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--rounds", type=int, default=1,
                   help="times the alone processes run, in rotation (eager fp32 alone, each --alone runner, then "
                        "again): an alone runner's figure pools its rounds' calls, so drift between processes "
                        "falls on every alone runner alike, and the report compares IREE with each runner timed alone "
                        "round by round")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--iree-weights", choices=WEIGHTS, default="mapped",
                   help="how IREE's processes read the packed archive (`punet bench --weights`): mapped from its file "
                   "(default) or read into memory at load (docs/cpu-tuning.md, thirteenth session)")
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"),
                   help="markdown file: the suite's section (between its markers) is replaced, the rest kept")
    p.add_argument("--json", default=None, help="raw results (default: <work>/results.json)")
    a = p.parse_args()
    kinds = ("eager", "iree") + PEERS
    for token in a.alone:
        kind, _, dtype = token.partition(":")
        if kind not in kinds or (dtype and dtype not in SHORT):
            p.error(f"--alone {token}: expected KIND or KIND:DTYPE with KIND one of {', '.join(kinds)}")
    if a.rounds < 1:
        p.error(f"--rounds {a.rounds}: expected 1 or more")
    if "float32" not in a.eager_dtypes:
        p.error("--eager-dtypes must include float32 (the baseline of every ratio and the reference output)")
    eager_dtypes = ["float32"] + [d for d in a.eager_dtypes if d != "float32"]
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    machine = host()
    peer_types = peer_dtypes(eager_dtypes, machine) if a.peers else []
    full_size = is_default_config(Path(a.config))
    results: dict = {
        "stages": [], "probes": [], "timings": [],
        "command": shlex.join(["python", "bench/suite.py"] + sys.argv[1:]),
        "threads": a.threads,
        # FLOPs per call are known for the real SDXL config only; other configs leave the floor blank.
        "tflop_per_call": {str(k): v for k, v in TFLOP_PER_CALL.items()} if full_size else {},
        "model": {"config": a.config, "full_size_sdxl": full_size, "iree_weights": a.iree_weights},
    }

    ckpt = work / "checkpoint"
    if not (ckpt / "config.json").is_file():
        print("writing the random-weight checkpoint", flush=True)
        run_child([sys.executable, str(ROOT / "bench" / "make_checkpoint.py"), a.config, str(ckpt), "--dtype", "float16"],
                  logs / "checkpoint.log")

    dtypes = sorted(set(a.iree_dtypes) | set(eager_dtypes), key=list(SHORT).index)
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
    from punet.weights import read_metadata

    results["model"]["parameters"] = read_metadata(work / "unet_f32.irpa").get("num_parameters")
    worker = [sys.executable, str(ROOT / "bench" / "worker.py")]
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
            compile_ = punet("compile", str(mlir), "--target", "cpu", "--pack-weights")
            compile_log, pack_log = logs / f"compile_{size}_{dtype}.log", logs / f"pack_{size}_{dtype}.log"
            s, rss = run_child(compile_, compile_log)
            vmfb = runner_spec("iree", dtype, work, size)["vmfb"]
            stage = {"stage": "compile", "size": size, "dtype": dtype, "seconds": s, "peak_rss_gib": rss}
            if reused(compile_log):  # the build s column takes the build's own time
                stage.update(reused=True, built_s=json.loads(Path(vmfb + ".json").read_text())["compile_seconds"])
            results["stages"].append(stage)
            s, rss = run_child(punet("pack", vmfb, str(irpa)), pack_log)
            results["stages"].append({"stage": "pack", "size": size, "dtype": dtype, "seconds": s, "peak_rss_gib": rss,
                                      "reused": reused(pack_log)})
        if "openvino" in a.peers and peer_types:
            # One child converts and saves the IR, so no benchmark process holds the torch model and the
            # converted one at once; the workers read the IR back.
            print(f"openvino convert {size} (float32 IR)", flush=True)
            out = work / f"convert_{size}.json"
            job = {"mode": "convert", "irpa": str(work / "unet_f32.irpa"), "size": size, "dtype": "float32",
                   "threads": a.threads, "xml": str(ov_xml(work, size)), "out": str(out)}
            s, rss = run_child(worker + [json.dumps(job)], logs / f"convert_openvino_{size}.log")
            info = json.loads(out.read_text())
            results["stages"].append({"stage": "openvino convert", "size": size, "dtype": "float32", "seconds": s,
                                      "peak_rss_gib": rss, "convert_s": info["convert_s"], "ir_gib": info["ir_gib"]})

    for size in a.sizes:
        specs = [runner_spec("eager", d, work, size) for d in eager_dtypes]
        specs += [runner_spec("iree", d, work, size, a.iree_weights) for d in a.iree_dtypes]
        specs += [runner_spec(kind, d, work, size) for kind in a.peers for d in peer_types]
        reference = work / f"ref_{size}.safetensors"
        # The fp32 eager probe goes first: it writes the reference the others compare to.
        for spec in specs:
            label = f"{spec['kind']}_{spec['dtype']}"
            print(f"probe {size} {spec['kind']} {spec['dtype']}", flush=True)
            out = work / f"probe_{size}_{label}.json"
            job = dict(spec, mode="probe", threads=a.threads, reference=str(reference), out=str(out))
            run_child(worker + [json.dumps(job)], logs / f"probe_{size}_{label}.log")
            results["probes"].append(json.loads(out.read_text()))
        # One timing process per runner, alternating it with torch eager fp32: every ratio is measured
        # side by side, and no process holds more than two models (two full-size IREE runners with their
        # packed weights do not fit 24 GB beside torch's). A runner named by --alone runs by itself, and an
        # eager fp32 process of its own gives its ratio. The alone processes run --rounds times, in rotation.
        base = specs[0]
        alone = [s for s in specs[1:] if matches(s, a.alone)]
        jobs = [([base, s], 0) for s in specs[1:] if s not in alone]
        solo = ([[base]] if alone or len(specs) == 1 else []) + [[s] for s in alone]
        jobs += [(pair, r) for r in range(1, a.rounds + 1) for pair in solo]
        for pair, round_ in jobs:
            spec = pair[-1]
            label = f"{spec['kind']}_{spec['dtype']}" + ("_alone" if len(pair) == 1 else "")
            label += f"_r{round_}" if a.rounds > 1 and round_ else ""
            what = f"eager float32 and {spec['kind']} {spec['dtype']} alternating" if len(pair) == 2 else \
                f"{spec['kind']} {spec['dtype']} alone" + (f", round {round_} of {a.rounds}" if a.rounds > 1 else "")
            print(f"timing {size}: {what}, {a.repeat} calls each", flush=True)
            out = work / f"timing_{size}_{label}.json"
            # OpenVINO beside eager fp32: converted in the process from eager's model, sharing its weights.
            runners = [dict(s, share=len(pair) == 2) if s["kind"] == "openvino" else s for s in pair]
            job = {"mode": "timing", "runners": runners, "threads": a.threads, "repeat": a.repeat, "out": str(out)}
            run_child(worker + [json.dumps(job)], logs / f"timing_{size}_{label}.log")
            timing = json.loads(out.read_text())
            if round_:
                timing["round"] = round_
            results["timings"].append(timing)

    results["host"] = machine
    Path(a.json or work / "results.json").write_text(json.dumps(results, indent=2))
    write_report(results, Path(a.out))
    print(f"wrote {a.out}")


ISA_FLAGS = {"avx2": "avx2", "avx512f": "avx512f", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
             "amx": "amx_bf16"}


def host() -> dict:
    import torch

    report = bench_module("report")

    cpuinfo = cpu_host.read_cpuinfo()
    flags = cpu_host.cpu_flags(cpuinfo)
    from punet.compile import compiler_version

    try:
        import openvino

        ov_version = openvino.__version__
    except ImportError:
        ov_version = None
    return {
        "cpu": cpu_host.cpu_model(cpuinfo),
        "cpu_id": cpu_host.cpu_id(cpuinfo),
        "cores": os.cpu_count(),
        "flags": {name: flag in flags for name, flag in ISA_FLAGS.items()},
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_bf16" in flags,
        "ghz": report.cpu_ghz(),
        "fp32_flop_per_cycle": report.fp32_flop_per_cycle(cpuinfo)[0],
        "torch": torch.__version__,
        "iree_compiler": compiler_version(),
        "openvino": ov_version,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def bench_module(name: str):
    """bench/<name>.py as a module, wherever the suite is imported from."""
    import importlib.util

    if f"bench_{name}" not in sys.modules:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules[f"bench_{name}"]


def write_report(results: dict, out: Path) -> None:
    bench_module("report").write_report(results, out)


if __name__ == "__main__":
    main()
