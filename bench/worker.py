"""One benchmark process of bench/suite.py: `probe` (peak RSS, output error) or `timing` (alternating runners)."""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from punet.compare import compare_tensors
from punet.eager import call_model
from punet.runtime import Session, set_threads
from punet.signature import Signature, make_inputs
from punet.tensors import load_tensors, save_tensors
from punet.weights import load_model


def make_runner(spec: dict):
    """(name, call, inputs): `call()` runs one synchronised UNet step on fixed inputs."""
    size, dtype = spec["size"], spec["dtype"]
    # int8: quantized weights, float32 inputs and outputs.
    sig = Signature(1, size, size, "float32" if dtype == "int8" else dtype, quant="int8" if dtype == "int8" else "")
    name = f"{spec['kind']} {dtype}"
    if spec["kind"] == "eager":
        model, config = load_model(spec["irpa"], dtype=sig.dtype)
        x = make_inputs(config, sig, 0)
        return name, lambda: call_model(model, x)
    session = Session.load(spec["vmfb"], spec["irpa"])
    args = session.to_device(make_inputs(session.config, sig, 0))
    return name, lambda: session.to_torch(session.call(args))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def probe(job: dict) -> dict:
    t0 = time.perf_counter()
    name, call = make_runner(job)
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = call().float()
    first_s = time.perf_counter() - t0
    ref_path = Path(job["reference"])
    if job["kind"] == "eager" and job["dtype"] == "float32":
        save_tensors(ref_path, {"sample": out})
    cmp = compare_tensors(out, load_tensors(ref_path)["sample"])
    return {
        "runner": name, "size": job["size"], "load_s": load_s, "first_call_s": first_s,
        "peak_rss_gib": peak_rss_gib(), "rel_l2_vs_eager_fp32": cmp.rel_l2, "max_abs_error": cmp.max_abs_error,
        "irpa_gib": Path(job["irpa"]).stat().st_size / 2**30,
    }


def timing(job: dict) -> dict:
    runners = [make_runner(dict(s)) for s in job["runners"]]
    samples = {name: [] for name, _ in runners}
    for name, call in runners:  # warm-up, excluded
        call()
    for _ in range(job["repeat"]):
        for name, call in runners:  # alternate, so drift hits every runner alike
            t0 = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - t0)
    return {
        "size": job["runners"][0]["size"],
        "threads": job["threads"],
        "runners": {n: {"median_s": statistics.median(s), "min_s": min(s), "samples_s": s} for n, s in samples.items()},
    }


def main() -> None:
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job["threads"])
    set_threads(job["threads"])
    result = probe(job) if job["mode"] == "probe" else timing(job)
    Path(job["out"]).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
