"""One benchmark process of bench/suite.py: `probe` (peak RSS, output error), `timing` (alternating runners)
or `convert` (punet's torch model to an OpenVINO IR).

Runners (`kind`): `eager` (punet's torch model), `iree` (a compiled .vmfb on the .irpa), `compile`
(torch.compile of punet's torch model, inductor, default mode) and `openvino` (an OpenVINO IR of punet's
torch model on the CPU plugin). The runners of one process share a torch model of the same archive and
dtype, so its weights are read once. A runner's `size` is the image's side in pixels; `batch` (default 1)
its batch, e.g. 2 for the 1024x1024 classifier-free-guidance step's two UNet rows.
"""

from __future__ import annotations

import gc
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
from report import OV_PRECISION

from punet.compare import compare_tensors
from punet.config import UNetConfig
from punet.eager import call_model
from punet.runtime import Session, set_threads
from punet.signature import Signature, make_inputs
from punet.tensors import load_tensors, save_tensors
from punet.weights import load_model, read_metadata

# (irpa, dtype) -> (model, config): every runner of this process that needs that torch model uses this one.
_MODELS: dict[tuple[str, str], tuple[torch.nn.Module, UNetConfig]] = {}


def torch_model(irpa: str, dtype: str) -> tuple[torch.nn.Module, UNetConfig]:
    key = (str(irpa), dtype)
    if key not in _MODELS:
        _MODELS[key] = load_model(irpa, dtype=dtype)
    return _MODELS[key]


def signature(spec: dict, dtype: str | None = None) -> Signature:
    dtype = dtype or spec["dtype"]
    # int8: quantized weights, float32 inputs and outputs.
    return Signature(spec.get("batch", 1), spec["size"], spec["size"], "float32" if dtype == "int8" else dtype,
                     quant="int8" if dtype == "int8" else "")


class Positional(torch.nn.Module):
    """punet's keyword-only forward with positional arguments: OpenVINO traces with positional example inputs."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.model(**dict(zip(self.names, args)))


def ov_convert(model: torch.nn.Module, inputs: dict[str, torch.Tensor]):
    """An OpenVINO model of `model` with the signature's input names and static shapes.

    Its constants share the torch model's weight memory (convert_model's default), so `model` must outlive it
    unless it is saved and read back.
    """
    import openvino as ov

    names = list(inputs)
    with torch.no_grad():
        m = ov.convert_model(Positional(model, names), example_input=tuple(inputs[n] for n in names))
    for port, name in zip(m.inputs, names):
        port.get_tensor().set_names({name})
    m.reshape({name: list(inputs[name].shape) for name in names})
    return m


def openvino_runner(spec: dict, threads: int):
    """(call, inputs, info) of the OpenVINO CPU plugin.

    The IR is converted from the float32 torch model; bfloat16 is the CPU plugin's INFERENCE_PRECISION_HINT
    on it (OpenVINO's own route to bf16 on CPU), not a bf16 IR. With `share` and the float32 torch model of
    this archive already loaded in this process (a timing process, after eager fp32), it is converted here
    from that model, whose weights its constants share: the weights are read once. Otherwise the saved IR
    is read (`core.read_model`) and nothing torch-side is kept.
    """
    import openvino as ov

    sig = signature(spec, "float32")
    core = ov.Core()
    key = (str(spec["irpa"]), "float32")
    if spec.get("share") and key in _MODELS:
        model, config = _MODELS[key]
        x = make_inputs(config, sig, 0)
        m = ov_convert(model, x)
        source = "converted in-process (weights shared with eager fp32)"
    else:
        config = UNetConfig.from_dict(read_metadata(spec["irpa"])["config"])
        x = make_inputs(config, sig, 0)
        m = core.read_model(spec["xml"])
        source = "IR"
    compiled = core.compile_model(m, "CPU", {
        "INFERENCE_NUM_THREADS": threads,
        "INFERENCE_PRECISION_HINT": OV_PRECISION[spec["dtype"]],
        "PERFORMANCE_HINT": "LATENCY",
    })
    del m
    gc.collect()
    request = compiled.create_infer_request()
    feed = {k: v.contiguous().numpy() for k, v in x.items()}
    out_port = compiled.output(0)

    def call() -> torch.Tensor:
        request.infer(feed)
        return torch.from_numpy(request.get_tensor(out_port).data.copy())

    call.compiled = compiled  # keep it alive with the closure
    return call, x, {"source": source, "ir_gib": _gib(Path(spec["xml"]).with_suffix(".bin")) if source == "IR" else None}


def make_runner(spec: dict, threads: int):
    """(name, call, inputs, info): `call()` runs one synchronised UNet step on fixed inputs."""
    kind, dtype = spec["kind"], spec["dtype"]
    name = f"{kind} {dtype}"
    sig = signature(spec)
    if kind in ("eager", "compile"):
        model, config = torch_model(spec["irpa"], sig.dtype)
        x = make_inputs(config, sig, 0)
        if kind == "compile":
            model = torch.compile(model)  # inductor, default mode: compiled on the first call
        return name, lambda: call_model(model, x), x, {}
    if kind == "openvino":
        call, x, info = openvino_runner(spec, threads)
        return name, call, x, info
    session = Session.load(spec["vmfb"], spec["irpa"], weights=spec.get("weights", "mapped"))
    x = make_inputs(session.config, sig, 0)
    args = session.to_device(x)
    return name, lambda: session.to_torch(session.call(args)), x, {}


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _gib(path: str | Path) -> float:
    return Path(path).stat().st_size / 2**30


def probe(job: dict) -> dict:
    t0 = time.perf_counter()
    name, call, x, info = make_runner(job, job["threads"])
    load_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = call().float()
    first_s = time.perf_counter() - t0
    ref_path = Path(job["reference"])
    if job["kind"] == "eager" and job["dtype"] == "float32":
        save_tensors(ref_path, {"sample": out})
    cmp = compare_tensors(out, load_tensors(ref_path)["sample"])
    return {
        "runner": name, "kind": job["kind"], "dtype": job["dtype"], "size": job["size"],
        "load_s": load_s, "first_call_s": first_s,
        "peak_rss_gib": peak_rss_gib(), "rel_l2_vs_eager_fp32": cmp.rel_l2, "max_abs_error": cmp.max_abs_error,
        "irpa_gib": _gib(job["irpa"]),
        "inputs": {k: [list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in x.items()},
        **{k: v for k, v in info.items() if v is not None},
    }


def timing(job: dict) -> dict:
    runners = []
    for spec in job["runners"]:
        t0 = time.perf_counter()
        name, call, _, info = make_runner(dict(spec), job["threads"])
        runners.append((name, call, dict(info, kind=spec["kind"], dtype=spec["dtype"],
                                         load_s=time.perf_counter() - t0)))
    samples = {name: [] for name, _, _ in runners}
    for name, call, _ in runners:  # warm-up (and torch.compile's compilation), excluded
        call()
    for _ in range(job["repeat"]):
        for name, call, _ in runners:  # alternate, so drift hits every runner alike
            t0 = time.perf_counter()
            call()
            samples[name].append(time.perf_counter() - t0)
    return {
        "size": job["runners"][0]["size"],
        "threads": job["threads"],
        "peak_rss_gib": peak_rss_gib(),
        "runners": {
            name: {"median_s": statistics.median(samples[name]), "min_s": min(samples[name]),
                   "samples_s": samples[name], **info}
            for name, _, info in runners
        },
    }


def convert(job: dict) -> dict:
    """Save the OpenVINO IR of the float32 torch model at the job's size (`xml`, weights in the .bin beside it)."""
    import openvino as ov

    model, config = torch_model(job["irpa"], "float32")
    x = make_inputs(config, signature(job, "float32"), 0)
    t0 = time.perf_counter()
    m = ov_convert(model, x)
    convert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ov.save_model(m, job["xml"], compress_to_fp16=False)
    return {"size": job["size"], "convert_s": convert_s, "save_s": time.perf_counter() - t0,
            "peak_rss_gib": peak_rss_gib(), "ir_gib": _gib(Path(job["xml"]).with_suffix(".bin")), "openvino": ov.__version__}


def main() -> None:
    job = json.loads(sys.argv[1])
    torch.set_num_threads(job.get("threads", torch.get_num_threads()))
    set_threads(job.get("threads", torch.get_num_threads()))
    result = {"probe": probe, "timing": timing, "convert": convert}[job["mode"]](job)
    Path(job["out"]).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
