"""Where one UNet call's time goes on CPU: IREE, torch eager and OpenVINO per operation, grouped by kind.

    python bench/cpu_profile.py --irpa /work/qfull/unet_f32.irpa --vmfb /work/qfull/unet_b1_256x256_f32.cpu.vmfb \\
        --size 256 --threads 2 --out docs/cpu-profile.md

(`--size 1024 --batch 2` for the module of a 1024x1024 CFG step's two UNet rows, exported with `--batch 2`.)

Writes `--out` (markdown) and the raw figures beside it (`data/<out stem>-<date>.json`). Each phase runs
in its own child process (a full-size runner maps 10 GB of weights, and the machine has 24 GB); the
children hand their results back as JSON files in a scratch folder.

Phases, in order:
  peak      a large fp32 sgemm with `--threads` threads, by torch.mm and by IREE (punet's cpu flags):
            the faster one's FLOP rate is what every "% of peak" below is taken against (MKL is slow
            on AMD CPUs); the datasheet-style peak (GHz x FLOP/cycle x threads) is printed beside it.
  flops     FLOPs per kind from torch.utils.flop_counter's formulas on the meta device (attention
            decomposed, so QK^T and PV are counted apart); floor seconds = FLOPs / measured rate.
  iree      the .vmfb's calls in punet's runtime under `perf record` (`--iree-profiler perf`, the default
            where perf is installed: CPU-clock samples named by the module's embedded code, which costs the
            call next to nothing), or under IREE's host-execution profiling (iree-benchmark-module, which
            slows the call: 1.46 vs 1.31 s per 256x256 call on the Zen 5); either way
            dispatches grouped by kind from their names, refined with the module's flow-level IR
            (iree-compile --compile-to=flow of the exported .mlir beside the .vmfb) for what the
            names do not tell: conv stride, a 1x1 conv lowered to a matmul, attention QK^T vs PV,
            GroupNorm vs LayerNorm reductions. Dispatches that ran side by side share the time they
            overlapped, so the kinds add up to the call.
  torch     torch.profiler over one eager call of punet's model (after a warm-up), aten ops grouped by
            the module that ran them (forward hooks mark module scopes).
  openvino  the suite's saved IR (`--ov-xml`) or ov.convert_model of the same model, compiled for CPU with
            per-node performance counters (which cost nothing once warm: 1.12-1.28 s per 256x256 call
            with them, 1.10-1.56 s without, on the Zen 5), two warm-ups, `--ov-calls` calls averaged.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

from punet import host

PHASES = ("peak", "flops", "iree", "torch", "openvino")
RUNNERS = ("iree", "torch", "openvino")
RUNNER_TITLES = {"iree": "IREE", "torch": "torch eager", "openvino": "OpenVINO"}

# ---- kinds ---------------------------------------------------------------------------------------

K_CONV3 = "conv 3x3"
K_CONV3S = "conv 3x3 stride 2"
K_CONV1 = "conv 1x1"
K_MM = "matmul: projection/FFN"
K_QK = "matmul: attention QK^T"
K_PV = "matmul: attention PV"
K_SOFTMAX = "attention softmax"
K_ATTN = "attention, fused (QK^T+softmax+PV)"
K_GN = "GroupNorm"
K_LN = "LayerNorm"
K_ELT = "elementwise"
K_LAYOUT = "layout (pack/unpack/transpose/copy)"
K_OTHER = "other"
K_UNCL = "unclassified"
K_GAP = "between ops (runtime/framework)"
KIND_ORDER = [K_CONV3, K_CONV3S, K_CONV1, K_MM, K_QK, K_PV, K_SOFTMAX, K_ATTN, K_GN, K_LN, K_ELT, K_LAYOUT,
              K_OTHER, K_UNCL, K_GAP]

# Coarse groups for comparing runners: each runner fuses differently (IREE folds a norm's apply step and
# its activation into an elementwise dispatch, OpenVINO fuses the whole attention into one node).
GROUPS = {
    "convolutions": lambda k: k.startswith("conv "),
    "projection/FFN matmuls": lambda k: k == K_MM,
    "attention core (QK^T, softmax, PV)": lambda k: k in (K_QK, K_PV, K_SOFTMAX, K_ATTN),
    "norms + elementwise": lambda k: k in (K_GN, K_LN, K_ELT),
    "layout": lambda k: k == K_LAYOUT,
    "other, unclassified, between ops": lambda k: k in (K_OTHER, K_UNCL, K_GAP),
}


def conv_kind(kh: int, kw: int, stride: int) -> str:
    k = f"conv {kh}x{kw}"
    return k + (f" stride {stride}" if stride > 1 else "")


def kind_order(kinds) -> list[str]:
    extra = sorted(k for k in kinds if k not in KIND_ORDER)
    convs = [k for k in extra if k.startswith("conv ")]
    rest = [k for k in extra if not k.startswith("conv ")]
    order = KIND_ORDER[:3] + convs + KIND_ORDER[3:-3] + rest + KIND_ORDER[-3:]
    return [k for k in order if k in kinds]


def module_kind(mod) -> str | None:
    """The kind of the ops inside a leaf module: convs by kernel and stride, Linear, the norms."""
    from torch import nn

    if isinstance(mod, nn.Conv2d):
        return conv_kind(mod.kernel_size[0], mod.kernel_size[1], max(mod.stride))
    if isinstance(mod, nn.Linear):
        return K_MM
    if isinstance(mod, nn.GroupNorm):
        return K_GN
    if isinstance(mod, nn.LayerNorm):
        return K_LN
    return None


def is_attention(mod) -> bool:
    from punet.model.layers import Attention

    return isinstance(mod, Attention)


_ELEMENTWISE = {
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "silu", "silu_", "gelu", "neg", "exp", "exp_",
    "cos", "sin", "sigmoid", "tanh", "rsqrt", "sqrt", "pow", "where", "clamp", "clamp_", "maximum", "minimum",
    "abs", "erf", "addcmul", "lerp", "fill_", "zero_", "zeros", "ones", "ones_like", "zeros_like", "full",
    "arange", "mean", "sum", "var", "rsub", "reciprocal"
}
_LAYOUT = {
    "copy_", "clone", "contiguous", "cat", "stack", "permute", "transpose", "t", "view", "reshape", "as_strided",
    "expand", "unsqueeze", "squeeze", "flatten", "unflatten", "chunk", "split", "split_with_sizes", "slice",
    "select", "narrow", "to", "_to_copy", "empty", "empty_like", "empty_strided", "resize_", "upsample_nearest2d",
    "_unsafe_view", "alias", "pad", "constant_pad_nd", "index", "detach", "lift_fresh", "repeat",
}
_MATMUL = {"mm", "bmm", "matmul", "baddbmm", "addmm", "linear"}


def aten_kind(name: str) -> str:
    op = name.split("::", 1)[-1]
    if "scaled_dot_product" in op:
        return K_ATTN
    if op in ("softmax", "_softmax", "_safe_softmax"):
        return K_SOFTMAX
    if op in ("group_norm", "native_group_norm"):
        return K_GN
    if op in ("layer_norm", "native_layer_norm"):
        return K_LN
    if op in _ELEMENTWISE:
        return K_ELT
    if op in _LAYOUT:
        return K_LAYOUT
    if op in _MATMUL:
        return K_MM
    return K_OTHER


class ModuleScopes:
    """Forward hooks that keep the stack of running modules; optionally each scope is a profiler range."""

    def __init__(self, model, record: bool = False):
        self.stack: list[tuple[str, object]] = []
        self.calls: dict[str, int] = defaultdict(int)  # attention matmuls seen in the running call
        self.record = record
        self.handles = []
        self._ranges = []
        for name, mod in model.named_modules():
            self.handles.append(mod.register_forward_pre_hook(self._pre(name)))
            self.handles.append(mod.register_forward_hook(self._post))

    def _pre(self, name):
        def hook(mod, args):
            self.stack.append((name, mod))
            if is_attention(mod):
                self.calls[name] = 0
            if self.record:
                import torch

                rf = torch.profiler.record_function("mod:" + name)
                rf.__enter__()
                self._ranges.append(rf)

        return hook

    def _post(self, mod, args, out):
        self.stack.pop()
        if self.record:
            self._ranges.pop().__exit__(None, None, None)

    def remove(self):
        for h in self.handles:
            h.remove()


def scoped_kind(mod, op_name: str, matmul_index: int | None) -> str:
    """Kind of one aten op run directly inside `mod` (its innermost module)."""
    k = module_kind(mod) if mod is not None else None
    if k:
        return k
    op = op_name.split("::", 1)[-1]
    if mod is not None and is_attention(mod) and op in _MATMUL and matmul_index is not None:
        return K_QK if matmul_index % 2 == 0 else K_PV  # QK^T, PV per slice of heads (decomposed_attention)
    return aten_kind(op_name)


# ---- host --------------------------------------------------------------------------------------


def cpu_info() -> dict:
    text = host.read_cpuinfo()
    fields = host.cpuinfo_fields(text)
    mhz = fields.get("cpu MHz")
    info = {"model": host.cpu_model(text), "cpu_id": host.cpu_id(text), "mhz": float(mhz) if mhz else None,
            "flags": fields.get("flags", "").split(), "logical_cpus": os.cpu_count()}
    try:
        info["max_mhz"] = int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000
    except (OSError, ValueError):
        info["max_mhz"] = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return info


def datasheet_peak(cpu: dict, threads: int) -> dict:
    from report import fp32_flop_per_cycle

    per_cycle, why = fp32_flop_per_cycle()
    mhz = cpu.get("max_mhz") or cpu.get("mhz") or 0.0
    return {"ghz": mhz / 1000, "flop_per_cycle": per_cycle, "why": why, "threads": threads,
            "gflops": mhz / 1000 * per_cycle * threads}


# ---- child phases --------------------------------------------------------------------------------


def say(msg: str) -> None:
    print(f"  {msg}", flush=True)


def peak_rss_gib() -> float:
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 2**20


def meta_modules(config) -> dict:
    """Every module of punet's UNet for `config` by its path, on the meta device (shapes and types, no weights):
    what dispatch and node names are classified against."""
    import torch

    from punet.model import UNet2DConditionModel

    with torch.device("meta"):
        return dict(UNet2DConditionModel(config).named_modules())


def load_signature(a: dict):
    """(config, signature, build record or None) for the run: the .vmfb's when given, else fp32 at --batch/--size."""
    from punet.config import UNetConfig
    from punet.signature import Signature
    from punet.weights import read_metadata

    info = None
    if a.get("vmfb"):
        from punet.runtime import load_build_info

        info = load_build_info(a["vmfb"])
        sig = Signature(**info["signature"])
        config = UNetConfig.from_dict(info["config"])
        if sig.height != a["size"] or sig.width != a["size"]:
            raise SystemExit(f"{a['vmfb']} was compiled for {sig.height}x{sig.width}, not --size {a['size']}")
        if sig.batch != a["batch"]:
            raise SystemExit(f"{a['vmfb']} was compiled for batch {sig.batch}, not --batch {a['batch']}")
        if sig.cfg or sig.scheduled or sig.devices > 1 or sig.quant:
            raise SystemExit(f"{a['vmfb']}: profile a plain single-device float UNet step (no CFG/scheduled/quant)")
    else:
        config = UNetConfig.from_dict(read_metadata(a["irpa"])["config"])
        sig = Signature(a["batch"], a["size"], a["size"])
    return config, sig, info


def phase_peak(a: dict) -> dict:
    import torch

    torch.set_num_threads(a["threads"])
    n, reps = a["gemm_size"], a["gemm_reps"]
    x = torch.randn(n, n)
    y = torch.randn(n, n)
    out = torch.empty(n, n)
    torch.mm(x, y, out=out)  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(x, y, out=out)
        times.append(time.perf_counter() - t0)
    flop = 2.0 * n**3
    cpu = cpu_info()
    iree_times = iree_sgemm_times(n, reps, a["threads"], x.numpy(), y.numpy(), (x @ y).numpy())
    # The faster library sets the peak: MKL's sgemm is far from the top on AMD CPUs (Zen 4: 194 GFLOP/s,
    # below IREE's own convolutions), OpenBLAS- or IREE-style kernels elsewhere.
    best = min(("torch.mm", times), ("IREE (punet's cpu flags)", iree_times), key=lambda kv: min(kv[1]))
    res = {
        "gemm": f"{best[0]} fp32 {n}x{n} @ {n}x{n}",
        "threads": a["threads"],
        "times_s": best[1],
        "gflops_best": flop / min(best[1]) / 1e9,
        "gflops_median": flop / statistics.median(best[1]) / 1e9,
        "libraries": {"torch.mm": flop / min(times) / 1e9, "iree": flop / min(iree_times) / 1e9},
        "cpu": cpu,
        "datasheet": datasheet_peak(cpu, a["threads"]),
    }
    say(f"sgemm {n}^3 with {a['threads']} threads: torch.mm {res['libraries']['torch.mm']:.1f}, IREE "
        f"{res['libraries']['iree']:.1f} GFLOP/s best; datasheet-style {res['datasheet']['gflops']:.1f} GFLOP/s "
        f"({res['datasheet']['ghz']:.2f} GHz x {res['datasheet']['flop_per_cycle']} x {a['threads']})")
    return res


def iree_sgemm_times(n: int, reps: int, threads: int, x, y, ref) -> list[float]:
    """Seconds per call of IREE's own fp32 n^3 matmul, compiled with `punet compile --target cpu`'s flags
    (data tiling, mmt4d microkernels; the operands are packed in the call, a small part of it), checked
    against torch."""
    import iree.compiler as ic
    import iree.runtime as rt

    from punet.compile.targets import compile_flags, get_target

    t = f"tensor<{n}x{n}xf32>"
    src = (f"func.func @mm(%a: {t}, %b: {t}) -> {t} {{\n  %z = arith.constant 0.0 : f32\n"
           f"  %e = tensor.empty() : {t}\n  %c = linalg.fill ins(%z : f32) outs(%e : {t}) -> {t}\n"
           f"  %r = linalg.matmul ins(%a, %b : {t}, {t}) outs(%c : {t}) -> {t}\n  return %r : {t}\n}}\n")
    vmfb = ic.compile_str(src, extra_args=compile_flags(get_target("cpu"), tuned=True))
    rt.flags.parse_flags(f"--task_topology_max_group_count={threads}")
    config = rt.Config("local-task")
    mm = rt.load_vm_modules(rt.VmModule.copy_buffer(config.vm_instance, vmfb), config=config)[-1].mm
    out = mm(x, y).to_host()  # warm-up
    err = float(((out - ref) ** 2).sum() ** 0.5 / (ref**2).sum() ** 0.5)
    if err > 1e-4:
        raise SystemExit(f"IREE's sgemm differs from torch.mm: relative L2 {err:.1e}")
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(x, y).to_host()
        times.append(time.perf_counter() - t0)
    return times


def phase_flops(a: dict) -> dict:
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    from punet.model import UNet2DConditionModel

    config, sig, _ = load_signature(a)
    with torch.device("meta"):
        model = UNet2DConditionModel(config).eval()
        x = {s.name: torch.empty(s.shape, dtype=torch.float32) for s in sig.inputs(config)}
    model.set_decomposed_attention(True)  # QK^T and PV as two matmuls (the SDPA op has no CPU formula)
    scopes = ModuleScopes(model)
    per_kind: dict[str, float] = defaultdict(float)
    per_shape: dict[str, float] = defaultdict(float)

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            packet = func._overloadpacket
            if packet in flop_registry:
                n = flop_registry[packet](*args, **kwargs, out_val=out)
                name, mod = scopes.stack[-1] if scopes.stack else ("", None)
                idx = None
                if mod is not None and is_attention(mod) and packet.__name__ in _MATMUL:
                    idx = scopes.calls[name]
                    scopes.calls[name] += 1
                kind = scoped_kind(mod, "aten::" + packet.__name__, idx)
                per_kind[kind] += n
                shapes = "x".join(str(list(t.shape)) for t in args if isinstance(t, torch.Tensor))
                per_shape[f"{kind} | aten.{packet.__name__} {shapes}"] += n
            return out

    with torch.no_grad(), Count():
        model(**x)
    scopes.remove()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**x)
    total = counter.get_total_flops()
    if abs(sum(per_kind.values()) - total) > 1e-6 * total:
        say(f"warning: per-kind FLOPs {sum(per_kind.values()):.4g} differ from FlopCounterMode's {total:.4g}")
    params = sum(p.numel() for p in model.parameters())
    say(f"{total / 1e9:.2f} GFLOP per call at {sig.height}x{sig.width} batch {sig.batch}, {params / 1e9:.3f} B parameters")
    return {"total": total, "per_kind": dict(per_kind), "per_shape": dict(per_shape), "parameters": params,
            "signature": sig.to_dict()}


# ---- IREE --------------------------------------------------------------------------------------------


def iree_tool(name: str) -> str:
    import iree._runtime_libs as libs

    p = Path(libs.__file__).parent / name
    if p.is_file():
        return str(p)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"{name} not found (looked in {p.parent} and PATH)")
    return found


_DISPATCH_PREFIX = re.compile(r"^.*?_dispatch_\d+_")


def dispatch_op(key: str) -> str:
    """The op part of a dispatch name: 'main$async_dispatch_12_conv_..._f32' -> 'conv_..._f32'."""
    return _DISPATCH_PREFIX.sub("", key)


def name_kind(key: str, groups: int | None = None) -> tuple[str, str]:
    """(kind, coarse class) of an IREE dispatch from its name alone; kind is K_UNCL where the name cannot tell.

    The coarse class (conv, matmul, softmax, reduction, elementwise, layout, unknown) is what the flow-level
    IR refines.
    """
    op = dispatch_op(key)
    if key.startswith("_encoding_") or re.search(r"(^|_)(set_|unset_)?encod(e|ing)_", op) or "decode_" in op:
        return K_LAYOUT, "layout"
    if re.search(r"(^|_)(slow_memcpy|memcpy|copy|pack|unpack|transpose|fill)($|_)", op) and not op.startswith(
        ("elementwise_", "generic_")
    ) or op.startswith("elementwise_transpose"):
        return K_LAYOUT, "layout"
    m = re.match(r"conv(?:_2d)?[a-z_]*?_((?:\d+x)+\d+)_", op)
    if m:
        dims = [int(d) for d in m.group(1).split("x")]
        if len(dims) >= 2 and dims[-1] == dims[-2] == 1:
            return conv_kind(1, 1, 1), "conv"
        return K_UNCL, "conv"  # kernel from the name, stride only from the IR (below)
    if re.match(r"(batch_)?(matmul|mmt4d)", op):
        return K_UNCL, "matmul"
    if op.startswith("softmax"):
        return K_SOFTMAX, "softmax"
    if op.startswith("reduction"):
        dims = [int(d) for d in re.findall(r"(?<=[_x])(\d+)(?=[x_])", op + "_")]
        dims = [d for d in dims if d != 1]
        if groups and dims and dims[0] == groups:
            return K_GN, "reduction"
        return K_UNCL, "reduction"
    if op.startswith("elementwise"):
        return K_ELT, "elementwise"
    return K_UNCL, "unknown"


_CONV_SHAPE = re.compile(r"conv(?:_2d)?[a-z_]*?_(\d+)x(\d+)x(\d+)x(\d+)x(\d+)x(\d+)_")


def conv_shape_from_name(key: str) -> str | None:
    """'out x H x W <- in, kh x kw' of a batch-1 IREE conv dispatch (named conv_<out>x<H>x<W>x<in>x<kh>x<kw>, the
    output map's size), the key OpenVINO's convolutions are matched on; None for other names."""
    m = _CONV_SHAPE.search(dispatch_op(key) + "_")
    if not m:
        return None
    o, h, w, i, kh, kw = m.groups()
    return conv_shape_key(int(o), int(h), int(w), int(i), int(kh), int(kw))


def conv_shape_key(out_ch: int, h: int, w: int, in_ch: int, kh: int, kw: int) -> str:
    return f"{out_ch} x {h}x{w} <- {in_ch}, {kh}x{kw}"


_MM_SHAPE = re.compile(r"(?:^|_)(?:batch_)?matmul_(?:1x)?(\d+)x(\d+)x(\d+)_")


def mm_shape_from_name(key: str) -> str | None:
    """'tokens x out <- in' of an IREE projection dispatch (named [batch_]matmul_[1x]<M>x<N>x<K>), the key
    OpenVINO's FullyConnected nodes are matched on; None for other names."""
    m = _MM_SHAPE.search("_" + dispatch_op(key) + "_")
    return mm_shape_key(*(int(v) for v in m.groups())) if m else None


def mm_shape_key(tokens: int, out_features: int, in_features: int) -> str:
    return f"{tokens} x {out_features} <- {in_features}"


def conv_kernel_from_name(key: str) -> tuple[int, int] | None:
    m = re.match(r"conv(?:_2d)?[a-z_]*?_((?:\d+x)+\d+)_", dispatch_op(key))
    if not m:
        return None
    dims = [int(d) for d in m.group(1).split("x")]
    return (dims[-2], dims[-1]) if len(dims) >= 2 else None


_SSA = r"%([\w$.\-]+)(?:#\d+)?"


def parse_flow_ir(text: str) -> dict:
    """Per dispatch function of a flow-level module: the parameters it reads (through hoisted globals), the
    dispatches that produce its operands and consume its results, and whether its body convolves with stride 2.
    """
    gparams: dict[str, set[str]] = defaultdict(set)
    for m in re.finditer(r'util\.global private @([\w$.\-]+)[^\n]*#flow\.parameter\.named<"[^"]*"::"([^"]+)">', text):
        gparams[m.group(1)].add(m.group(2))
    lines = text.splitlines()
    # Executable bodies (for strides).
    bodies: dict[str, list[str]] = {}
    exe_names: list[str] = []
    in_exe = False
    for line in lines:
        if re.match(r"^  flow\.executable ", line):
            in_exe, exe_names = True, []
            continue
        if in_exe:
            if line.startswith("  }"):
                in_exe = False
                continue
            m = re.search(r"flow\.executable\.export (?:public )?@([\w$.\-]+)", line)
            if m:
                exe_names.append(m.group(1))
                bodies[m.group(1)] = []
            elif exe_names:
                bodies[exe_names[-1]].append(line)
    stride2 = {}
    for name, body in bodies.items():
        t = "\n".join(body)
        stride2[name] = bool(re.search(r"strides = dense<(2|\[2, 2\])>", t) or re.search(r"d\d+ \* 2 \+ d\d+", t))

    gorigin: dict[str, set[str]] = defaultdict(set)
    sites: dict[str, dict] = {}
    for _ in range(2):  # initializers store hoisted weights before the entry loads them; two passes settle it
        sites = defaultdict(lambda: {"params": set(), "producers": set(), "consumers": set(), "calls": 0})
        origin: dict[str, set[str]] = {}
        prods: dict[str, set[str]] = {}
        in_exe = False
        init = False
        for line in lines:
            if re.match(r"^  flow\.executable ", line):
                in_exe = True
                continue
            if in_exe:
                if line.startswith("  }"):
                    in_exe = False
                continue
            if re.match(r"^\s*util\.initializer", line):
                origin, prods, init = {}, {}, True
                continue
            if re.match(r"^\s*util\.func ", line):
                origin, prods, init = {}, {}, False
                continue
            m = re.match(r"^\s*util\.global\.store " + _SSA + r", @([\w$.\-]+)", line)
            if m:
                gorigin[m.group(2)] |= origin.get(m.group(1), set())
                continue
            m = re.match(r"^\s*((?:%[\w$.\-]+(?::\d+)?)(?:, %[\w$.\-]+(?::\d+)?)*) = (.*)$", line)
            if not m:
                continue
            defs = [d.split(":")[0].lstrip("%") for d in m.group(1).split(", ")]
            rhs = m.group(2)
            g = re.match(r"util\.global\.load (?:immutable )?@([\w$.\-]+)", rhs)
            if g:
                o = set(gparams.get(g.group(1), ())) | gorigin.get(g.group(1), set())
                for d in defs:
                    origin[d], prods[d] = o, set()
                continue
            dm = re.match(r"flow\.dispatch @[\w$.\-]+::@([\w$.\-]+)(?:\[[^\]]*\])?\(([^)]*)\)", rhs)
            uses = re.findall(_SSA, dm.group(2) if dm else rhs)
            o = set().union(*(origin.get(u, set()) for u in uses)) if uses else set()
            p = set().union(*(prods.get(u, set()) for u in uses)) if uses else set()
            if dm and not init:
                fn = dm.group(1)
                s = sites[fn]
                s["params"] |= o
                s["producers"] |= p
                s["calls"] += 1
                for q in p:
                    sites[q]["consumers"].add(fn)
                for d in defs:
                    origin[d], prods[d] = set(), {fn}
            else:
                for d in defs:
                    origin[d], prods[d] = o, p
    return {fn: {"params": sorted(s["params"]), "producers": sorted(s["producers"]),
                 "consumers": sorted(s["consumers"]), "calls": s["calls"], "stride2": stride2.get(fn, False)}
            for fn, s in sites.items()}


def param_modules(params, modules: dict) -> list:
    out = []
    for key in params:
        path = key.rsplit(".", 1)[0]
        if path in modules:
            out.append(modules[path])
    return out


def classify_dispatch(key: str, flow: dict | None, modules: dict, groups: int) -> tuple[str, str]:
    """(kind, how) of one IREE dispatch function: `how` says what decided it (name, or which IR fact)."""
    kind, coarse = name_kind(key, groups)
    f = flow.get(key) if flow else None
    if coarse == "conv":
        kernel = conv_kernel_from_name(key)
        mods = [m for m in param_modules(f["params"], modules) if module_kind(m) and module_kind(m).startswith("conv")] if f else []
        if mods:
            return module_kind(mods[0]), "name + conv weight's module"
        if f is not None and kernel:
            return conv_kind(kernel[0], kernel[1], 2 if f["stride2"] else 1), "name + IR strides"
        return (kind, "name (1x1)") if kind != K_UNCL else (K_UNCL, "name: conv, stride unknown without the IR")
    if coarse == "matmul":
        if f is None:
            return K_UNCL, "name: matmul, role unknown without the IR"
        kinds = [module_kind(m) for m in param_modules(f["params"], modules)]
        kinds = [k for k in kinds if k and (k.startswith("conv") or k == K_MM)]
        if kinds:
            return (next((k for k in kinds if k.startswith("conv")), K_MM), "name + weight's module")
        if any("softmax" in p for p in f["producers"]):
            return K_PV, "name + operand from softmax"
        if any("softmax" in c for c in f["consumers"]):
            return K_QK, "name + result to softmax"
        return K_UNCL, "name: matmul without weights or softmax neighbour"
    if coarse == "reduction":
        if f is not None:
            for m in param_modules(f["params"], modules):  # the normalise step fused into the reduction
                if module_kind(m) in (K_GN, K_LN):
                    return module_kind(m), "name + own norm weights"
            seen, frontier = set(), [key]
            for _ in range(3):
                nxt = []
                for fn in frontier:
                    for c in (flow.get(fn) or {}).get("consumers", []):
                        if c in seen:
                            continue
                        seen.add(c)
                        nxt.append(c)
                        for m in param_modules((flow.get(c) or {}).get("params", []), modules):
                            if module_kind(m) in (K_GN, K_LN):
                                return module_kind(m), "name + consumer's norm weights"
                frontier = nxt
        return kind, "name" if kind != K_UNCL else "name: reduction, norm unknown"
    return kind, "name"


def write_inputs(config, sig, work: Path) -> list[str]:
    """The call's inputs as iree-benchmark-module `--input` values: .npy files, and raw files with their
    shape and type for bfloat16, which numpy cannot hold."""
    import numpy as np
    import torch

    from punet.signature import make_inputs

    values = []
    for i, (name, t) in enumerate(make_inputs(config, sig, 0).items()):
        if t.dtype == torch.bfloat16:
            p = work / f"input{i}_{name}.bin"
            p.write_bytes(t.contiguous().view(torch.uint16).numpy().tobytes())
            values.append(f"{'x'.join(map(str, t.shape))}xbf16=@{p}")
        else:
            p = work / f"input{i}_{name}.npy"
            np.save(p, t.numpy())
            values.append(f"@{p}")
    return values


def flow_map(a: dict, info: dict, work: Path) -> tuple[dict | None, str]:
    """The flow-level IR of the .vmfb's .mlir, parsed; (None, why) where it cannot be had."""
    from punet.artifacts import sha256_file

    if a.get("mlir") == "none":
        return None, "skipped (--mlir none)"
    mlir = Path(a["mlir"]) if a.get("mlir") else Path(info["mlir"]["path"])
    if not mlir.is_absolute():
        mlir = Path(a["vmfb"]).resolve().parent / mlir
    if not mlir.is_file():
        return None, f"{mlir} not found"
    if not a.get("mlir") and sha256_file(mlir) != info["mlir"]["sha256"]:
        return None, f"{mlir} is not the .mlir the .vmfb was compiled from (sha256 differs)"
    tool = info.get("command", [None])[0]
    if not tool or not Path(tool).is_file():
        from iree.compiler.tools import binaries

        tool = binaries.find_tool("iree-compile")
    out = work / f"flow-{sha256_file(mlir)[:12]}.mlir"
    cmd = [tool, str(mlir), "-o", str(out), *info["flags"], "--compile-to=flow"]
    if out.is_file():  # an earlier round's
        return parse_flow_ir(out.read_text()), f"{mlir.name} compiled to flow with the build record's flags"
    say(f"flow-level IR: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if r.returncode:
        return None, f"iree-compile --compile-to=flow failed: {r.stderr.strip().splitlines()[-1:]}"
    say(f"  {time.perf_counter() - t0:.1f} s, {out.stat().st_size / 2**20:.1f} MiB")
    return parse_flow_ir(out.read_text()), f"{mlir.name} compiled to flow with the build record's flags"


def attribute_overlap(intervals: list[tuple[int, int]]) -> list[int]:
    """Each interval's share of wall time where intervals overlap: a stretch during which k of them run
    counts 1/k to each. The shares add up to the union of the intervals, so kinds and functions add up
    to the call, and two dispatches that ran side by side on one worker each (a layer's K and V
    projections, which IREE issues together) are not each charged the pair's whole span."""
    bounds = sorted({t for iv in intervals for t in iv})
    starts: dict[int, list[int]] = defaultdict(list)
    ends: dict[int, list[int]] = defaultdict(list)
    for i, (s, e) in enumerate(intervals):
        if e > s:
            starts[s].append(i)
            ends[e].append(i)
    share = [0.0] * len(intervals)
    active: set[int] = set()
    for t0, t1 in zip(bounds, bounds[1:]):
        active.difference_update(ends.get(t0, ()))
        active.update(starts.get(t0, ()))
        for i in active:
            share[i] += (t1 - t0) / len(active)
    return [round(x) for x in share]


# ---- IREE under perf: sampled, at the cost of an unprofiled call -------------------------------------
# (the parts that read ELF images, /proc maps and perf's samples are in bench/perf_samples.py)


K_HOST = "[runtime, host and kernel]"


def iree_perf_phase(a: dict, config, sig, info: dict, flow: dict | None, flow_note: str, modules: dict,
                    work: Path) -> dict:
    """IREE calls in this process (punet's Session, as `punet run` and the suite load them) under `perf
    record`'s CPU-clock sampling: every sample's code address names its dispatch function through the
    module's embedded ELF, and time bins give each function its wall time."""
    import signal

    from perf_samples import (anonymous_exec_regions, attribute_bins, elf_exec_span, parse_perf_samples, symbolize,
                              vmfb_elfs)

    from punet.runtime import Session, set_threads
    from punet.signature import make_inputs

    perf = shutil.which("perf")
    if not perf or not shutil.which("addr2line"):
        raise SystemExit("--iree-profiler perf needs `perf` (Debian: linux-perf) and `addr2line` (binutils) on PATH")
    elfs = vmfb_elfs(Path(a["vmfb"]).read_bytes())
    if not elfs:
        raise SystemExit(f"{a['vmfb']}: no embedded ELF (a llvm-cpu module compiled with --iree-llvmcpu-link-embedded)")
    set_threads(a["threads"])
    session = Session.load(a["vmfb"], a.get("packed") or a["irpa"])
    args = session.to_device(make_inputs(config, sig, 0))
    calls = a["iree_calls"]
    for _ in range(2):  # warm-up: page-ins and first-call work stay out of the profile
        session.to_torch(session.call(args))
    unprofiled = []  # as many calls without perf, to show what perf costs
    for _ in range(calls):
        t0 = time.perf_counter()
        session.to_torch(session.call(args))
        unprofiled.append(time.perf_counter() - t0)
    regions = anonymous_exec_regions(Path("/proc/self/maps").read_text())
    code = []  # (region start, region end, ELF file, span start)
    for i, elf in enumerate(elfs):
        lo, hi = elf_exec_span(elf)
        match = [r for r in regions if r[1] - r[0] == hi - lo]
        if len(match) != 1:
            raise SystemExit(f"executable {i} of {a['vmfb']}: {len(match)} anonymous r-x mappings of its code's size "
                             f"{hi - lo} bytes in /proc/self/maps (expected 1)")
        path = work / f"executable{i}.so"
        path.write_bytes(elf)
        code.append((match[0][0], match[0][1], path, lo))
    data = work / "iree.perf.data"
    freq = a["perf_freq"]
    cmd = [perf, "record", "-q", "-F", str(freq), "-k", "CLOCK_MONOTONIC", "-p", str(os.getpid()), "-o", str(data)]
    rec = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # perf attaches to every thread before the first profiled call
    if rec.poll() is not None:
        raise SystemExit(f"perf record failed: {rec.stderr.read().strip()[-500:]}")
    spans, steal = [], []
    for _ in range(calls):
        s0 = machine_steal_s()
        t0 = time.monotonic_ns()
        session.to_torch(session.call(args))
        spans.append((t0, time.monotonic_ns()))
        steal.append(machine_steal_s() - s0)
    rec.send_signal(signal.SIGINT)
    rec.wait()
    script = subprocess.run([perf, "script", "-i", str(data), "-F", "tid,time,ip", "--ns"], capture_output=True,
                            text=True, check=True).stdout
    raw = parse_perf_samples(script)
    offsets: dict[Path, set[int]] = defaultdict(set)
    located = []  # (time, ELF file or None, offset in it)
    for _, t, ip in raw:
        for lo, hi, path, base in code:
            if lo <= ip < hi:
                located.append((t, path, ip - lo + base))
                offsets[path].add(ip - lo + base)
                break
        else:
            located.append((t, None, ip))
    names = {path: symbolize(path, offs) for path, offs in offsets.items()}
    keyed = [(t, names[path][off] if path else K_HOST) for t, path, off in located]
    bin_ns = 10**9 // freq
    per_fn_ns: dict[str, float] = defaultdict(float)
    cpu_samples: dict[str, int] = defaultdict(int)
    for start, end in spans:
        for key, ns in attribute_bins(keyed, start, end, bin_ns, K_HOST).items():
            per_fn_ns[key] += ns
        for t, key in keyed:
            if start <= t < end:
                cpu_samples[key] += 1
    groups = config.norm_num_groups
    per_kind: dict[str, float] = defaultdict(float)
    per_fn: dict[str, dict] = {}
    for key, ns in per_fn_ns.items():
        kind, how = (K_GAP, "not dispatch code") if key == K_HOST else classify_dispatch(key, flow, modules, groups)
        s = ns / 1e9 / calls
        per_kind[kind] += s
        per_fn[key] = {"kind": kind, "how": how, "count": None, "s": s, "wall_s": s,
                       "tile_s": cpu_samples[key] / freq / calls, "samples": cpu_samples[key]}
    total = sum(e - s for s, e in spans) / 1e9 / calls
    dispatch_s = sum(f["s"] for k, f in per_fn.items() if k != K_HOST)
    conv_shapes: dict[str, float] = defaultdict(float)
    mm_shapes: dict[str, float] = defaultdict(float)
    for key, f in per_fn.items():
        if f["kind"].startswith("conv ") and (shape := conv_shape_from_name(key)):
            conv_shapes[shape] += f["s"]
        elif f["kind"] == K_MM and (shape := mm_shape_from_name(key)):
            mm_shapes[shape] += f["s"]
    uncl = per_kind.get(K_UNCL, 0.0)
    say(f"{calls} calls without perf: {', '.join(f'{t:.3f}' for t in unprofiled)} s; under perf: "
        f"{', '.join(f'{(e - s) / 1e9:.3f}' for s, e in spans)} s; {len(raw)} samples, "
        f"{sum(cpu_samples.values())} in the calls; dispatch code {dispatch_s:.3f} s of {total:.3f} s per call")
    for k in kind_order(per_kind):
        say(f"  {k:<40} {fmt_s(per_kind[k]):>9}")
    return {
        "profiler": "perf",
        "total_s": total,
        "per_kind": dict(per_kind),
        "dispatch_sum_s": dispatch_s,
        "dispatch_busy_s": dispatch_s,
        "unclassified_share": uncl / dispatch_s if dispatch_s else 0.0,
        "calls": [{"span_s": (e - s) / 1e9, "steal_s": st} for (s, e), st in zip(spans, steal)],
        "unprofiled_calls_s": unprofiled,
        "conv_shapes": dict(conv_shapes),
        "mm_shapes": dict(mm_shapes),
        "dispatches": None,
        "functions": per_fn,
        "classified_by": {},
        "flow_ir": flow_note if flow is not None else f"none: {flow_note}",
        "tool": {"command": [Path(cmd[0]).name, *cmd[1:-4], "-p", "<pid>"], "seconds": None,
                 "samples": len(raw), "freq": freq},
        "entry": info["entry"],
        "flags": info["flags"],
        "compiler": info.get("compiler_version"),
    }


def phase_iree(a: dict) -> dict:
    config, sig, info = load_signature(a)
    work = Path(a["work"])
    modules = meta_modules(config)
    flow, flow_note = flow_map(a, info, work)
    if flow is None:
        say(f"no flow-level IR ({flow_note}): conv strides and matmul roles stay unclassified")
    if a.get("iree_profiler", "host-execution") == "perf":
        return iree_perf_phase(a, config, sig, info, flow, flow_note, modules, work)
    inputs = write_inputs(config, sig, work)
    prof = work / "iree.ireeprof"
    calls = a["iree_calls"]
    cmd = [
        iree_tool("iree-benchmark-module"), f"--module={a['vmfb']}", f"--parameters=model={a['irpa']}",
        *([f"--parameters={info['packed']['scope']}={a['packed']}"] if a.get("packed") else []),
        "--device=local-task", f"--function={info['entry']}", *[f"--input={v}" for v in inputs],
        f"--task_topology_max_group_count={a['threads']}", f"--benchmark_min_time={calls}x",
        "--device_profiling_mode=host-execution", f"--device_profiling_output={prof}",
        # The recorder holds 8192 host events between flushes: unflushed, a 512x512 call (3,500 dispatches)
        # twice over drops the later events, the calls' own among them.
        "--device_profiling_flush_interval_ms=200",
    ]
    say(f"{calls} profiled calls: {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}")
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    tool_s = time.perf_counter() - t0
    if r.returncode:
        raise SystemExit(f"iree-benchmark-module failed ({r.returncode}):\n{r.stderr[-3000:]}")
    tool_rss = peak_rss_gib()
    say(f"  {tool_s:.1f} s (load + {calls} calls), peak RSS {tool_rss:.1f} GiB")
    export = work / "iree.ireeperf.jsonl"
    subprocess.run([iree_tool("iree-profile"), "export", "--format=ireeperf-jsonl", f"--output={export}", str(prof)],
                   check=True, capture_output=True)
    stats = subprocess.run([iree_tool("iree-profile"), "statistics", "--format=jsonl", str(prof)], check=True,
                           capture_output=True, text=True).stdout
    events = [json.loads(line) for line in export.read_text().splitlines() if line.strip()]
    host = [e for e in events if e.get("record_type") == "host_execution_event"]
    executes = sorted((e for e in host if e["op"] == "execute"), key=lambda e: e["start_host_time_ns"])
    if not executes or len(executes) % calls:
        raise SystemExit(f"{len(executes)} execute submissions for {calls} calls: cannot split the profile by call "
                         f"(`iree-profile summary {prof}` tells whether events were dropped)")
    per_call = len(executes) // calls
    call_spans = []
    for c in range(calls):
        ex = executes[c * per_call:(c + 1) * per_call]
        call_spans.append((ex[0]["start_host_time_ns"], max(e["end_host_time_ns"] for e in ex),
                           {e["submission_id"] for e in ex}))
    start, end, subs = call_spans[-1]
    disp = [e for e in host if e["op"] == "dispatch" and e["submission_id"] in subs]
    others = [e for e in host if e["op"] not in ("dispatch", "execute") and e["submission_id"] in subs]
    groups = config.norm_num_groups
    fn_kind: dict[str, tuple[str, str]] = {}
    per_kind: dict[str, float] = defaultdict(float)
    per_fn: dict[str, dict] = {}
    # Dispatches with no barrier between them run side by side; each is charged its share of the time.
    shares = attribute_overlap([(e["start_host_time_ns"], e["end_host_time_ns"]) for e in disp])
    for e, share_ns in zip(disp, shares):
        key = e["key"] or f"executable{e['executable_id']}#{e['function_ordinal']}"
        if key not in fn_kind:
            fn_kind[key] = classify_dispatch(key, flow, modules, groups)
        d = share_ns / 1e9
        per_kind[fn_kind[key][0]] += d
        f = per_fn.setdefault(key, {"kind": fn_kind[key][0], "how": fn_kind[key][1], "count": 0, "s": 0.0,
                                    "wall_s": 0.0, "tile_s": 0.0, "tiles": 0})
        f["count"] += 1
        f["s"] += d
        f["wall_s"] += e["duration_ns"] / 1e9
        f["tile_s"] += e["tile_duration_sum_ns"] / 1e9
        f["tiles"] += e["tile_count"]
    for e in others:  # queue copies/fills inside the call, if any were recorded
        per_kind[K_LAYOUT] += e["duration_ns"] / 1e9
    # Busy time: the union of dispatch intervals (dispatches without a barrier between them may overlap).
    ivs = sorted((e["start_host_time_ns"], e["end_host_time_ns"]) for e in disp)
    busy, cur_s, cur_e = 0, None, None
    for s, t in ivs:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                busy += cur_e - cur_s
            cur_s, cur_e = s, t
        else:
            cur_e = max(cur_e, t)
    if cur_e is not None:
        busy += cur_e - cur_s
    span_s = (end - start) / 1e9
    summed = sum(e["duration_ns"] for e in disp) / 1e9
    per_kind[K_GAP] += max(0.0, span_s - busy / 1e9)
    stat_rows = [json.loads(line) for line in stats.splitlines() if line.strip()]
    stat_fn = [r for r in stat_rows if r.get("row_type") == "host_execution_function"]
    uncl = per_kind.get(K_UNCL, 0.0)
    say(f"last call: {span_s:.3f} s span, {len(disp)} dispatches ({len(per_fn)} functions) summing to {summed:.3f} s, "
        f"overlap {summed - busy / 1e9:.3f} s; unclassified {uncl:.3f} s = {100 * uncl / summed:.1f}% of dispatch time")
    hows = defaultdict(float)
    for f in per_fn.values():
        hows[f["how"]] += f["s"]
    say("top 15 dispatch functions of the last call:")
    for name, f in sorted(per_fn.items(), key=lambda kv: -kv[1]["s"])[:15]:
        say(f"  {fmt_s(f['s']):>9} {f['count']:4d}x  {f['kind']:<36} {name}")
    for k in kind_order(per_kind):
        say(f"  {k:<40} {fmt_s(per_kind[k]):>9}")
    return {
        "total_s": span_s,
        "per_kind": dict(per_kind),
        "dispatch_sum_s": summed,
        "dispatch_busy_s": busy / 1e9,
        "unclassified_share": uncl / summed if summed else 0.0,
        "calls": [{"span_s": (t - s) / 1e9, "submissions": len(ss)} for s, t, ss in call_spans],
        "dispatches": len(disp),
        "functions": per_fn,
        "classified_by": dict(hows),
        "flow_ir": flow_note if flow is not None else f"none: {flow_note}",
        "statistics_all_calls_dispatch_s": sum(r["total_duration_ns"] for r in stat_fn) / 1e9,
        "tool": {"command": [Path(cmd[0]).name, *cmd[1:]], "seconds": tool_s, "peak_rss_gib": tool_rss,
                 "stdout_tail": r.stdout[-1500:]},
        "entry": info["entry"],
        "flags": info["flags"],
        "compiler": info.get("compiler_version"),
    }


# ---- torch eager ---------------------------------------------------------------------------------------


def phase_torch(a: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from punet.eager import call_model
    from punet.signature import make_inputs
    from punet.weights import load_model

    torch.set_num_threads(a["threads"])
    _, sig, _ = load_signature(a)
    t0 = time.perf_counter()
    model, config = load_model(a["irpa"])
    say(f"model loaded in {time.perf_counter() - t0:.1f} s")
    x = make_inputs(config, sig, 0)
    t0 = time.perf_counter()
    call_model(model, x)
    warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    call_model(model, x)
    plain = time.perf_counter() - t0
    say(f"warm-up call {warm:.3f} s, plain call {plain:.3f} s; profiling one call")
    scopes = ModuleScopes(model, record=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        call_model(model, x)
        wall = time.perf_counter() - t0
    scopes.remove()
    modules = dict(model.named_modules())
    events = sorted(prof.events(), key=lambda e: e.time_range.start)
    per_kind: dict[str, float] = defaultdict(float)
    per_op: dict[tuple, dict] = {}
    matmul_seen: dict[int, int] = defaultdict(int)
    aten_total = 0.0
    for e in events:
        if not e.name.startswith("aten::"):
            continue
        # The outermost aten op under the innermost module scope decides the kind of all the time below it.
        top, p, scope = e, e.cpu_parent, None
        while p is not None:
            if p.name.startswith("mod:"):
                scope = p
                break
            if p.name.startswith("aten::"):
                top = p
            p = p.cpu_parent
        name = scope.name[4:] if scope is not None else None
        mod = modules.get(name) if name is not None else None
        idx = None
        if top is e and mod is not None and is_attention(mod) and e.name.split("::")[-1] in _MATMUL:
            idx = matmul_seen[scope.id]
            matmul_seen[scope.id] += 1
        elif mod is not None and is_attention(mod):
            idx = max(0, matmul_seen[scope.id] - 1)
        kind = scoped_kind(mod, top.name, idx)
        s = e.self_cpu_time_total / 1e6
        aten_total += s
        per_kind[kind] += s
        shapes = str(top.input_shapes) if top.input_shapes else ""
        k = (top.name, shapes, kind)
        o = per_op.setdefault(k, {"op": top.name, "shapes": shapes, "kind": kind, "s": 0.0, "count": 0})
        o["s"] += s
        if top is e:
            o["count"] += 1
    per_kind[K_GAP] += max(0.0, wall - aten_total)
    top_ops = sorted(per_op.values(), key=lambda o: -o["s"])[:40]
    say(f"profiled call {wall:.3f} s wall, aten self time {aten_total:.3f} s")
    return {"total_s": wall, "per_kind": dict(per_kind), "warmup_s": warm, "unprofiled_call_s": plain,
            "aten_self_s": aten_total, "top": top_ops, "peak_rss_gib": peak_rss_gib(),
            "attention": "scaled_dot_product_attention (fused)" if not any(
                getattr(m, "decomposed", False) for m in modules.values()) else "decomposed"}


# ---- OpenVINO --------------------------------------------------------------------------------------


# punet's model inside the traced wrapper: `m` (here) or `model` (bench/worker.py's IR, the suite's)
_OV_WRAPPER = re.compile(r"^__module\.(model|m)\.")
_OV_WRAPPER_PATH = re.compile(r"^(model|m)(\.|$)")


def ov_kind(node_name: str, node_type: str, modules: dict, attn_seen: dict) -> tuple[str, str | None]:
    """(kind, module path) of one executed OpenVINO node from its friendly name and type."""
    m = re.match(r"^__module\.([\w.]*?)/", node_name + "/")
    path = m.group(1) if m else None
    if path is not None:
        path = _OV_WRAPPER_PATH.sub("", path)
    mod = modules.get(path) if path is not None else None
    t = node_type
    if t in ("Convolution", "GroupConvolution"):
        if mod is not None and module_kind(mod):
            return module_kind(mod), path
        return K_UNCL, path
    if t in ("FullyConnected", "MatMul", "Gemm"):
        if mod is not None and module_kind(mod) == K_MM:
            return K_MM, path
        if mod is not None and is_attention(mod):
            i = attn_seen.get(node_name.split("/")[0], 0)
            attn_seen[node_name.split("/")[0]] = i + 1
            return (K_QK if i % 2 == 0 else K_PV), path
        return (K_MM if t == "FullyConnected" else K_UNCL), path
    if t in ("ScaledDotProductAttention", "ScaledAttn", "MHA"):
        return K_ATTN, path
    if t == "Subgraph" and mod is not None and is_attention(mod):
        return K_ATTN, path  # snippets' MHA tokenisation: QK^T, softmax and PV in one kernel
    if t in ("Softmax", "SoftMax"):
        return K_SOFTMAX, path
    if t in ("MVN", "GroupNormalization", "NormalizeL2"):
        if mod is not None and module_kind(mod) in (K_GN, K_LN):
            return module_kind(mod), path
        if "group_norm" in node_name:
            return K_GN, path
        if "layer_norm" in node_name:
            return K_LN, path
        return K_UNCL, path
    if t in ("Reorder", "Transpose", "Reshape", "Concat", "Split", "VariadicSplit", "Gather", "Interpolate",
             "Broadcast", "StridedSlice", "Slice", "Pad", "Tile", "Convert", "Squeeze", "Unsqueeze"):
        return K_LAYOUT, path
    if t in ("ShapeOf", "Range", "Parameter", "Result", "Constant"):
        return K_OTHER, path
    if mod is not None and module_kind(mod) in (K_GN, K_LN):
        return module_kind(mod), path  # the affine step of a norm (Multiply/MulAdd named after it)
    if t in ("Eltwise", "Multiply", "Add", "Subtract", "Divide", "MulAdd", "Swish", "SwishCPU", "Gelu", "Sin",
             "Cos", "Exp", "Power", "Sigmoid", "Tanh", "Sqrt", "Subgraph", "PowerStatic", "Erf", "Select"):
        return K_ELT, path
    return K_OTHER, path


def phase_openvino(a: dict) -> dict:
    import gc

    import openvino as ov
    import torch
    from report import OV_PRECISION

    from punet.signature import make_inputs
    from punet.weights import load_model

    torch.set_num_threads(a["threads"])
    _, sig, _ = load_signature(a)
    # As in bench/suite.py: the float32 model converted, and the module's dtype asked of the CPU plugin.
    hint = OV_PRECISION.get(sig.dtype, "f32")
    if a.get("ov_xml"):
        from punet.config import UNetConfig
        from punet.weights import read_metadata

        model, config = None, UNetConfig.from_dict(read_metadata(a["irpa"])["config"])
    else:
        model, config = load_model(a["irpa"], dtype="float32")
    x = make_inputs(config, replace(sig, dtype="float32"), 0)
    names = list(x)

    class Positional(torch.nn.Module):  # convert_model traces positional inputs
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *args):
            return self.m(**dict(zip(names, args)))

    convert_s = None
    if a.get("ov_xml"):  # the IR bench/suite.py saved: no torch model in memory beside OpenVINO's weights
        t0 = time.perf_counter()
        ov_model = ov.Core().read_model(a["ov_xml"])
        say(f"read_model {a['ov_xml']}: {time.perf_counter() - t0:.1f} s")
        modules = meta_modules(config)
    else:
        t0 = time.perf_counter()
        with torch.no_grad():
            ov_model = ov.convert_model(Positional(model), example_input=tuple(x.values()))
        convert_s = time.perf_counter() - t0
        say(f"convert_model {convert_s:.1f} s, peak RSS {peak_rss_gib():.1f} GiB")
        modules = {n: m for n, m in model.named_modules()}
    core = ov.Core()
    t0 = time.perf_counter()
    compiled = core.compile_model(ov_model, "CPU", {"PERF_COUNT": True, "INFERENCE_NUM_THREADS": a["threads"],
                                                     "INFERENCE_PRECISION_HINT": hint})
    compile_s = time.perf_counter() - t0
    del ov_model
    gc.collect()
    say(f"compile_model {compile_s:.1f} s, peak RSS {peak_rss_gib():.1f} GiB")
    out_shapes = {}  # node -> its output's static shape, from the runtime graph (the profiled nodes' names)
    for op in compiled.get_runtime_model().get_ops():
        if op.get_output_size() and op.get_output_partial_shape(0).is_static:
            out_shapes[op.get_friendly_name()] = list(op.get_output_shape(0))
    req = compiled.create_infer_request()
    if len(compiled.inputs) != len(x):
        raise SystemExit(f"OpenVINO model has {len(compiled.inputs)} inputs, the UNet {len(x)}")
    feed = [t.numpy() for t in x.values()]  # in argument order
    # The CPU plugin reports each node's mean over every call of the compiled model so far (a new request
    # does not reset it): call n's own time is n x the mean after it - (n - 1) x the mean before it.
    warmups, calls = 2, a.get("ov_calls") or 1
    walls, per_node, mean_before = [], defaultdict(float), {}
    meta = {}
    for n in range(1, warmups + calls + 1):
        t0 = time.perf_counter()
        req.infer(feed)
        wall = time.perf_counter() - t0
        infos = req.get_profiling_info()
        mean_after = {p.node_name: p.real_time.total_seconds() for p in infos}
        if n > warmups:
            walls.append(wall)
            for p in infos:
                meta[p.node_name] = (p.node_type, p.exec_type, str(p.status))
                own = n * mean_after[p.node_name] - (n - 1) * mean_before.get(p.node_name, 0.0)
                per_node[p.node_name] += max(0.0, own)
        elif n == 1:
            warm = wall
        mean_before = mean_after
    wall = sum(walls) / len(walls)
    per_kind: dict[str, float] = defaultdict(float)
    nodes = []
    attn_seen: dict[str, int] = {}
    rows = [(name, *meta[name][:2], per_node[name] / calls, meta[name][2]) for name in per_node]
    for i, (name, ntype, etype, real, status) in enumerate(rows):
        if "EXECUTED" not in status or "NOT_RUN" in status:
            continue
        kind, path = ov_kind(name, ntype, modules, attn_seen)
        if path is None and ntype in ("MVN", "Multiply", "MulAdd"):
            # Unnamed nodes of a decomposed GroupNorm (MVN, then the affine Multiply): the norm's named node
            # (fused away, NOT_RUN) follows within a few entries.
            for later in rows[i + 1:i + 6]:
                if "group_norm" in later[0]:
                    kind = K_GN
                    break
                if "layer_norm" in later[0]:
                    kind = K_LN
                    break
            else:
                if ntype == "MVN":
                    kind = K_UNCL
        per_kind[kind] += real
        node = {"name": name, "type": ntype, "exec": etype, "s": real, "kind": kind}
        mod = modules.get(path) if path is not None else None
        shape = out_shapes.get(name)
        if kind.startswith("conv ") and mod is not None and shape and len(shape) == 4 and shape[0] == 1:
            node["conv_shape"] = conv_shape_key(mod.out_channels, shape[2], shape[3], mod.in_channels,
                                                *mod.kernel_size)
        elif kind == K_MM and hasattr(mod, "in_features") and shape and shape[-1] == mod.out_features:
            node["mm_shape"] = mm_shape_key(math.prod(shape[:-1]), mod.out_features, mod.in_features)
        nodes.append(node)
    summed = sum(n["s"] for n in nodes)
    per_kind[K_GAP] += max(0.0, wall - summed)
    shapes: dict[str, dict[str, float]] = {"conv_shape": defaultdict(float), "mm_shape": defaultdict(float)}
    counts: dict[str, dict[str, int]] = {"conv_shape": defaultdict(int), "mm_shape": defaultdict(int)}
    for n in nodes:
        for field in shapes:
            if field in n:
                shapes[field][n[field]] += n["s"]
                counts[field][n[field]] += 1
    say(f"warm-up {warm:.3f} s, profiled calls {', '.join(f'{w:.3f}' for w in walls)} s, node times sum to "
        f"{summed:.3f} s per call")
    return {"total_s": wall, "per_kind": dict(per_kind), "warmup_s": warm, "convert_s": convert_s,
            "calls_s": walls, "warmups": warmups, "ir": a.get("ov_xml"), "conv_shapes": dict(shapes["conv_shape"]),
            "conv_counts": dict(counts["conv_shape"]), "mm_shapes": dict(shapes["mm_shape"]),
            "mm_counts": dict(counts["mm_shape"]),
            "compile_s": compile_s, "precision_hint": hint, "node_sum_s": summed, "executed_nodes": len(nodes),
            "top": sorted(nodes, key=lambda n: -n["s"])[:40], "nodes": nodes, "peak_rss_gib": peak_rss_gib()}


# ---- report ----------------------------------------------------------------------------------------------


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "iree-base-compiler", "iree-base-runtime", "iree-turbine", "openvino", "punet"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


def fmt_s(s: float | None) -> str:
    if s is None:
        return "–"
    return f"{s:.3f}" if s >= 0.1 else f"{s * 1000:.1f} ms" if s >= 1e-4 else f"{s * 1e6:.0f} µs"


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def group_totals(per_kind: dict) -> dict:
    return {g: sum(v for k, v in per_kind.items() if f(k)) for g, f in GROUPS.items()}


def shorten(name: str, n: int = 90) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def top_table(title: str, intro: str, columns: list[str], text_columns: int, rows: list[list]) -> list[str]:
    """A '## title' section: the intro, then a numbered table (the first `text_columns` columns left-aligned)."""
    lines = [f"## {title}", "", intro, "", "| # | " + " | ".join(columns) + " |",
             "| ---: |" + " --- |" * text_columns + " ---: |" * (len(columns) - text_columns)]
    lines += [f"| {i} | " + " | ".join(str(c) for c in row) + " |" for i, row in enumerate(rows, 1)]
    return lines + [""]


def md_escape(s: str) -> str:
    return s.replace("|", "\\|")  # a table cell, even inside a code span


def render(res: dict, a: dict) -> str:
    from report import OV_PRECISION

    peak = res["peak"]
    rate = peak["gflops_best"] * 1e9
    flops = res.get("flops", {})
    fk = dict(flops.get("per_kind", {}))
    runners = [r for r in a["runners"] if r in res]
    # The fused attention row's FLOPs are QK^T's and PV's.
    fk_fused = fk.get(K_QK, 0.0) + fk.get(K_PV, 0.0)
    kinds = set(fk)
    for r in runners:
        kinds |= {k for k, v in res[r]["per_kind"].items() if v > 0}
    kinds = kind_order(kinds)
    cpu = peak["cpu"]
    flags = set(cpu["flags"])
    sig = flops.get("signature") or {}
    lat = f"{a['size'] // 8}x{a['size'] // 8}"
    L = []
    L.append("# CPU profile: where one UNet call's time goes (IREE vs torch eager vs OpenVINO)")
    L.append("")
    L.append(f"Generated by `python bench/cpu_profile.py {' '.join(a['argv'])}` on {res['date']}; "
             f"raw figures: `{res['json_rel']}`. Regenerate with the same command.")
    L.append("")
    busy = {p: st["other_cpu_share"] for p, st in res["phases"].items() if p in ("peak", *RUNNERS)}
    if busy and max(busy.values()) > 0.1:
        L.append("**Noisy run**: other processes used " + ", ".join(
            f"{100 * v:.0f}% ({p})" for p, v in busy.items()) + " of the CPUs while the phases ran; the timings "
                 "below are not those of a quiet machine.")
        L.append("")
    L.append("## Host and workload")
    L.append("")
    isa = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in host.ISA_FLAGS)
    cpu_id = f" ({cpu['cpu_id']})" if cpu.get("cpu_id") else ""  # absent from profiles before 2026-12-07
    L.append(f"- CPU: {cpu['model']}{cpu_id}, {cpu['logical_cpus']} logical CPUs, {cpu.get('mem_gib', 0):.0f} GiB RAM; "
             f"ISA: {isa}.")
    L.append(f"- Threads: {a['threads']} for every runner (torch.set_num_threads, IREE "
             f"`--task_topology_max_group_count`, OpenVINO `INFERENCE_NUM_THREADS`).")
    v = res["versions"]
    L.append(f"- Versions: torch {v['torch']}, IREE compiler {v['iree-base-compiler']} / runtime "
             f"{v['iree-base-runtime']}, iree-turbine {v['iree-turbine']}, OpenVINO {v['openvino']}, "
             f"Python {v['python']}, punet {v['punet']}.")
    params = flops.get("parameters")
    L.append(f"- Workload: one UNet step, batch {sig.get('batch', 1)}, {a['size']}x{a['size']} pixels "
             f"(latent {lat}), {sig.get('tokens', 77)} text tokens, {sig.get('dtype', 'float32')} weights and activations"
             + (f", {params / 1e9:.2f} B parameters" if params and params >= 1e8 else
                f", {params / 1e6:.1f} M parameters" if params else "")
             + (f", {flops['total'] / 1e9:.1f} GFLOP per call" if flops.get("total") else "") + ".")
    L.append(f"- Inputs: `{a['irpa']}`" + (f", `{a['vmfb']}`" if a.get("vmfb") else "") + ".")
    if "iree" in res:
        L.append(f"- IREE module flags: `{' '.join(res['iree']['flags'])}`; entry `{res['iree']['entry']}`.")
    L.append("")
    L.append("## Peak")
    L.append("")
    ds = peak["datasheet"]
    L.append(f"- Measured: {peak['gemm']} with {peak['threads']} threads: **{peak['gflops_best']:.1f} GFLOP/s** "
             f"(best of {len(peak['times_s'])}; median {peak['gflops_median']:.1f}). Every \"% of peak\" below is "
             "against this rate"
             + (", the faster of two libraries' sgemm: " + ", ".join(f"{k} {v:.1f}" for k, v in peak["libraries"].items())
                + " GFLOP/s." if "libraries" in peak else "."))
    L.append(f"- Datasheet-style: {ds['ghz']:.2f} GHz (from /proc/cpuinfo) x {ds['flop_per_cycle']} FLOP/cycle "
             f"({ds['why']}) x {ds['threads']} threads = {ds['gflops']:.1f} GFLOP/s; the measured sgemm reaches "
             f"{100 * peak['gflops_best'] / ds['gflops']:.0f}% of it"
             + (" (above 100%: /proc/cpuinfo gives the base clock, and the cores ran faster)."
                if peak["gflops_best"] > ds["gflops"] else ".") if ds["gflops"] else "- Datasheet-style: "
             "no clock rate in /proc/cpuinfo.")
    L.append("")
    L.append("## Time by kind")
    L.append("")
    head = "| kind | GFLOP | floor s |"
    sep = "| --- | ---: | ---: |"
    for r in runners:
        t = RUNNER_TITLES[r]
        head += f" {t} s | {t} % | {t} % of peak |"
        sep += " ---: | ---: | ---: |"
    L.append(head)
    L.append(sep)

    def kind_flops(k):
        if k == K_ATTN:
            return fk_fused or None
        return fk.get(k)

    for k in kinds:
        kf = kind_flops(k)
        row = f"| {k} | {kf / 1e9:.2f} |" if kf else "| " + k + " | – |"
        row += f" {fmt_s(kf / rate)} |" if kf else " – |"
        for r in runners:
            pk = res[r]["per_kind"]
            t = pk.get(k, 0.0)
            tot = res[r]["total_s"]
            if t <= 0:
                row += " – | – | – |"
                continue
            eff = (kf / rate) / t if kf else None
            row += f" {fmt_s(t)} | {pct(t / tot)} | {pct(eff)} |"
        L.append(row)
    tf = flops.get("total")
    row = f"| **total** | {tf / 1e9:.2f} | {fmt_s(tf / rate)} |" if tf else "| **total** | – | – |"
    for r in runners:
        tot = res[r]["total_s"]
        row += f" **{fmt_s(tot)}** | 100% | {pct((tf / rate) / tot) if tf else '–'} |"
    L.append(row)
    L.append("")
    L.append("Columns: *GFLOP* per call of each kind (torch.utils.flop_counter's formulas, attention decomposed); "
             "*floor s* = GFLOP / measured sgemm rate, the time at matmul peak; per runner its seconds in the "
             "profiled call, the share of that call, and *% of peak* = floor / time (FLOP-bearing kinds only). "
             f"*{K_ATTN}*'s FLOPs are QK^T's plus PV's. *{K_GAP}* is the part of the call no op accounts for "
             + ("(IREE: time bins with no sample in dispatch code, and samples in the runtime, host code or kernel; "
                if (res.get("iree") or {}).get("profiler") == "perf" else
                "(IREE: the call's span minus the union of its dispatches; ")
             + "torch: wall minus aten self time; "
             "OpenVINO: wall minus the sum of node times)."
             + ("" if sig.get("dtype", "float32") == "float32" else
                f" The module is {sig['dtype']}, and *% of peak* is still against the fp32 sgemm rate: "
                "AVX-512 BF16 and AMX run more FLOP per cycle, so it can pass 100%."))
    L.append("")
    L.append("How each runner's ops become kinds, and what that hides:")
    L.append("")
    if "iree" in res and res["iree"].get("profiler") == "perf":
        ir = res["iree"]
        L.append(f"- IREE: `perf record` CPU-clock samples ({ir['tool']['freq']} per second per thread) over "
                 f"{len(ir['calls'])} calls in punet's own runtime (`Session`, as `punet run` and the suite load the "
                 "module), averaged per call. Each sample's code address names its dispatch function through the "
                 "DWARF of the ELF the .vmfb embeds; kinds then come from the names and the flow-level IR "
                 f"({ir['flow_ir']}) as for the host-execution profile. Time: the calls are cut into bins of one "
                 "sampling period; a bin's wall time goes to the functions sampled in it, in proportion (one worker "
                 "busy and the other idle: the busy one's function takes the bin, as a node's wall time does in "
                 f"OpenVINO's counters); bins with no sample in dispatch code, and samples in the runtime, host "
                 f"code or kernel, count as *{K_GAP}*. Unclassified: {100 * ir['unclassified_share']:.1f}% of "
                 "dispatch time.")
    elif "iree" in res:
        ir = res["iree"]
        L.append(f"- IREE: {ir['dispatches']} dispatches of {len(ir['functions'])} functions in the kept call. "
                 "Kinds come from the dispatch names (conv kernel, matmul, softmax, reduction, elementwise, "
                 "encoding/pack/copy = layout) and, for what names do not tell, from the flow-level IR "
                 f"({ir['flow_ir']}): conv stride from the weight's module or the IR's strides, a matmul's role "
                 "from its weight's module (Linear = projection/FFN, 1x1 Conv2d = conv 1x1) or, with no weight, "
                 "from its softmax neighbour (result into softmax = QK^T, operand from softmax = PV), a reduction's "
                 "norm from its own weights or those of the dispatch that applies it. GroupNorm/LayerNorm rows hold "
                 "the mean/variance reduction dispatches, with the normalise-scale-shift step where IREE fused it "
                 "into them; where it is fused with the activation or residual instead, it counts as elementwise. "
                 f"Dispatches that ran side by side ({fmt_s(ir['dispatch_sum_s'] - ir['dispatch_busy_s'])} of "
                 "overlap in this call) share the time they overlapped equally, so the kinds add up to the call. "
                 f"Unclassified: {100 * ir['unclassified_share']:.1f}% of dispatch time.")
    if "torch" in res:
        L.append(f"- torch eager: aten self time by the innermost module that ran it (Conv2d by kernel/stride, "
                 "Linear, GroupNorm, LayerNorm; ops elsewhere by aten name); the outermost aten op under that "
                 f"module names the kind of everything below it. Attention runs as "
                 f"{res['torch']['attention']}, one op, so QK^T, softmax and PV share the fused row.")
    if "openvino" in res:
        L.append("- OpenVINO: per-node real time of executed nodes, by the module path in the node's friendly "
                 "name and the node type. Its CPU plugin fuses each attention (QK^T, softmax, PV) into one "
                 "Subgraph node (snippets' MHA), decomposes GroupNorm into MVN + Multiply and fuses activations "
                 "and residual adds into the neighbouring node (those count where they ran).")
    L.append("")
    L.append("Coarse groups (fusion-independent), seconds per call:")
    L.append("")
    gh = "| group |" + "".join(f" {RUNNER_TITLES[r]} |" for r in runners)
    L.append(gh)
    L.append("| --- |" + " ---: |" * len(runners))
    gt = {r: group_totals(res[r]["per_kind"]) for r in runners}
    for g in GROUPS:
        L.append(f"| {g} |" + "".join(f" {fmt_s(gt[r][g])} |" for r in runners))
    L.append("")
    if all("conv_shapes" in (res.get(r) or {}) for r in ("iree", "openvino")):
        L += shape_table("Convolutions by shape (out channels x output map <- in channels, kernel), seconds per "
                         "call; IREE's dispatch names give the shape, OpenVINO's nodes their module and output shape; "
                         "one IREE dispatch function runs every convolution of its shape:",
                         res["iree"]["conv_shapes"], res["openvino"]["conv_shapes"],
                         res["openvino"].get("conv_counts", {}))
    if all("mm_shapes" in (res.get(r) or {}) for r in ("iree", "openvino")):
        L += shape_table("Projection/FFN matmuls by shape (tokens x out features <- in features), seconds per call, "
                         "matched the same way (*count*: OpenVINO's FullyConnected nodes of the shape):",
                         res["iree"]["mm_shapes"], res["openvino"]["mm_shapes"], res["openvino"].get("mm_counts", {}))
    L.append("## What it shows")
    L.append("")
    for s in findings(res, runners, gt, kind_flops, rate):
        L.append(f"- {s}")
    L.append("")
    if "iree" in res and res["iree"].get("profiler") == "perf":
        ir = res["iree"]
        fns = sorted(((n, f) for n, f in ir["functions"].items() if f["kind"] != K_GAP), key=lambda kv: -kv[1]["s"])
        L += top_table(
            "IREE: top 15 dispatch functions",
            f"perf samples of {len(ir['calls'])} calls (" + ", ".join(f"{c['span_s']:.3f} s" for c in ir["calls"])
            + "; the same number of calls just before, without perf: "
            + ", ".join(f"{t:.3f} s" for t in ir["unprofiled_calls_s"]) + "), per call. *s*: the function's wall "
            "time (its bins); *threads busy* = its CPU samples' time / "
            f"(s x {a['threads']}): below 100% the workers idle.",
            ["dispatch function", "kind", "s", "% of call", "threads busy"], 2,
            [[f"`{md_escape(shorten(name))}`", f["kind"], fmt_s(f["s"]), pct(f["s"] / ir["total_s"]),
              pct(f["tile_s"] / (f["s"] * a["threads"]) if f["s"] else 0)] for name, f in fns[:15]],
        )
    elif "iree" in res:
        ir = res["iree"]
        fns = sorted(ir["functions"].items(), key=lambda kv: -kv[1]["s"])[:15]
        L += top_table(
            "IREE: top 15 dispatch functions",
            f"Host-execution profile of call {len(ir['calls'])} of {len(ir['calls'])} (calls: "
            + ", ".join(f"{c['span_s']:.3f} s" for c in ir["calls"]) + "). *s*: the function's share of the "
            "call (where dispatches overlap, each is charged an equal part of the overlap); *wall s*: its "
            "dispatches' own spans, overlaps counted in full. *threads busy* = summed tile time / "
            f"(s x {a['threads']}): below 100% the workers idle.",
            ["dispatch function", "kind", "calls", "s", "wall s", "% of call", "threads busy"], 2,
            [[f"`{md_escape(shorten(name))}`", f["kind"], f["count"], fmt_s(f["s"]), fmt_s(f.get("wall_s", f["s"])),
              pct(f["s"] / ir["total_s"]), pct(f["tile_s"] / (f["s"] * a["threads"]) if f["s"] else 0)]
             for name, f in fns],
        )
    if "torch" in res:
        t = res["torch"]
        L += top_table(
            "torch eager: top 15 ops",
            f"Profiled call {t['total_s']:.3f} s (the same call unprofiled: {t['unprofiled_call_s']:.3f} s; "
            f"warm-up {t['warmup_s']:.3f} s). Self time of the op and everything below it, by op and input shapes.",
            ["op", "input shapes", "kind", "calls", "s", "% of call"], 3,
            [[f"`{o['op']}`", md_escape(shorten(o["shapes"], 70)), o["kind"], o["count"], fmt_s(o["s"]),
              pct(o["s"] / t["total_s"])] for o in t["top"][:15]],
        )
    if "openvino" in res:
        o = res["openvino"]
        L += top_table(
            "OpenVINO: top 15 nodes",
            (f"Profiled calls {', '.join(f'{w:.3f}' for w in o['calls_s'])} s, node times averaged "
             f"({o['warmups']} warm-ups before them, the first {o['warmup_s']:.3f} s; "
             + (f"IR `{Path(o['ir']).name}` read" if o.get("ir") else f"convert_model {o['convert_s']:.1f} s")
             + f", compile_model {o['compile_s']:.1f} s), {o['executed_nodes']} executed nodes."
             if "calls_s" in o else
             f"Profiled call {o['total_s']:.3f} s (warm-up {o['warmup_s']:.3f} s; convert_model "
             f"{o['convert_s']:.1f} s, compile_model {o['compile_s']:.1f} s), {o['executed_nodes']} executed nodes."),
            ["node", "type", "kernel", "kind", "s", "% of call"], 4,
            [[f"`{md_escape(shorten(_OV_WRAPPER.sub('', n['name'])))}`", n["type"], n["exec"], n["kind"],
              fmt_s(n["s"]), pct(n["s"] / o["total_s"])] for n in o["top"][:15]],
        )
    L.append("## Method")
    L.append("")
    L.append("- Each phase ran in its own process, one after another (seconds; peak RSS / of it anonymous, "
             "sampled every 0.5 s: RSS counts the memory-mapped weights the process touched, anonymous memory "
             "does not; the share of the CPUs other processes used meanwhile): " + "; ".join(
                 f"{p} {st['seconds']:.0f} s, {st['peak_rss_gib']:.1f} / {st['peak_anon_gib']:.1f} GiB, "
                 f"{100 * st['other_cpu_share']:.0f}%" for p, st in res["phases"].items()) + ".")
    rounded = [r for r in runners if len(res[r].get("rounds_total_s", [])) > 1]
    if rounded:
        L.append(f"- Rounds: {' and '.join(RUNNER_TITLES[r] for r in rounded)} ran "
                 f"{len(res[rounded[0]]['rounds_total_s'])} times in rotation, one process each; their rows "
                 "average the rounds. Seconds per call by round: " + "; ".join(
                     f"{RUNNER_TITLES[r]} " + ", ".join(f"{t:.3f}" for t in res[r]["rounds_total_s"]) for r in rounded)
                 + ".")
    if "iree" in res and res["iree"].get("profiler") == "perf":
        ir = res["iree"]
        L.append(f"- IREE: `{' '.join(ir['tool']['command']).replace(a['work'] + '/', '<scratch>/')}` (this "
                 "process) around the calls, after two warm-up calls; `perf script -F tid,time,ip` for the samples; "
                 "the code's place in memory from /proc/self/maps (the anonymous r-x mapping of the embedded ELF's "
                 "executable segment), names from `addr2line` on that ELF. Steal time (the hypervisor running "
                 "other guests) per call: " + ", ".join(f"{c['steal_s']:.2f} s" for c in ir["calls"]) + ".")
    elif "iree" in res:
        tool_cmd = " ".join(res["iree"]["tool"]["command"]).replace(a["work"] + "/", "<scratch>/")
        L.append(f"- IREE: `{tool_cmd}`, then `iree-profile export "
                 "--format=ireeperf-jsonl` for the per-dispatch events of the last call (`iree-profile statistics` "
                 "aggregates over all calls and cannot split them; its dispatch total over all calls, "
                 f"{res['iree']['statistics_all_calls_dispatch_s']:.3f} s, is kept in the JSON as a cross-check). "
                 "A dispatch's time is its wall time from first to last workgroup on the worker threads.")
    L.append("- torch eager: `torch.profiler.profile(activities=[CPU], record_shapes=True)` around one "
             "`punet.eager.call_model` after a warm-up and an unprofiled call; module scopes from forward hooks "
             "(`record_function`).")
    L.append("- OpenVINO: `ov.convert_model(model, example_input=inputs)`, compiled for CPU with "
             f"`PERF_COUNT`, `INFERENCE_NUM_THREADS`, `INFERENCE_PRECISION_HINT="
             f"{(res.get('openvino') or {}).get('precision_hint') or OV_PRECISION.get(sig.get('dtype'), 'f32')}` (the module's dtype; the model converted "
             "in float32, as in bench/suite.py); "
             + ("two warm-up calls, then the profiled calls. `get_profiling_info()` gives each node's mean over "
                "every call of the compiled model (a new infer request does not reset it), so a node's time in call "
                "n is n x its mean after that call - (n - 1) x its mean before it; the table averages the profiled "
                "calls." if "calls_s" in (res.get("openvino") or {}) else
                "one warm-up, one timed call. `get_profiling_info()` gives each node's mean over every call of the "
                "compiled model (a new infer request does not reset it), so a node's time in the timed call is 2 x "
                "its mean after that call - its mean after the warm-up."))
    L.append("- Profilers add overhead; compare the calls above with `docs/benchmarks.md`'s unprofiled medians.")
    L.append("")
    return "\n".join(L)


def shape_table(intro: str, iree: dict[str, float], ov: dict[str, float], counts: dict[str, int]) -> list[str]:
    """IREE's dispatches against OpenVINO's nodes of one kind, matched by shape, seconds per call."""
    keys = sorted(set(iree) | set(ov), key=lambda k: -(iree.get(k, 0.0) + ov.get(k, 0.0)))
    L = [intro, "", "| shape | count | IREE | OpenVINO | IREE / OpenVINO |", "| --- | ---: | ---: | ---: | ---: |"]
    for k in keys:
        a, b = iree.get(k, 0.0), ov.get(k, 0.0)
        L.append(f"| {k} | {counts.get(k, '–')} | {fmt_s(a) if a else '–'} | {fmt_s(b) if b else '–'} | "
                 f"{f'{a / b:.2f}x' if a and b else '–'} |")
    a, b = sum(iree.values()), sum(ov.values())
    L += [f"| **all** | {sum(counts.values())} | **{fmt_s(a)}** | **{fmt_s(b)}** | **{a / b:.2f}x** |" if b else
          f"| **all** | | **{fmt_s(a)}** | – | – |", ""]
    return L


def findings(res, runners, gt, kind_flops, rate) -> list[str]:
    out = []
    for r in runners:
        pk = {k: v for k, v in res[r]["per_kind"].items() if k != K_GAP}
        if not pk:
            continue
        k, v = max(pk.items(), key=lambda kv: kv[1])
        tot = res[r]["total_s"]
        eff = (kind_flops(k) / rate) / v if kind_flops(k) else None
        g, gv = max(gt[r].items(), key=lambda kv: kv[1])
        s = (f"{RUNNER_TITLES[r]} ({tot:.3f} s per call): the biggest kind is {k}, {fmt_s(v)} = {pct(v / tot)} of "
             f"the call" + (f", at {pct(eff)} of the measured peak" if eff is not None else ""))
        s += f"; by group, {g} take {pct(gv / tot)}."
        out.append(s)
    for other in ("openvino", "torch"):
        if "iree" not in runners or other not in runners:
            continue
        diff = {g: gt["iree"][g] - gt[other][g] for g in GROUPS}
        total_gap = res["iree"]["total_s"] - res[other]["total_s"]
        g, d = max(diff.items(), key=lambda kv: kv[1])
        name = RUNNER_TITLES[other]
        ratio = res["iree"]["total_s"] / res[other]["total_s"]
        if total_gap > 0 and d > 0:
            s = (f"IREE takes {ratio:.2f}x {name}'s time (+{fmt_s(total_gap)} per call); the biggest gap is {g}: "
                 f"IREE {fmt_s(gt['iree'][g])} vs {fmt_s(gt[other][g])} (+{fmt_s(d)}, {pct(d / total_gap)} of the "
                 "difference).")
        elif d > 0:
            s = (f"IREE takes {ratio:.2f}x {name}'s time; the group where IREE still loses most is {g}: "
                 f"{fmt_s(gt['iree'][g])} vs {fmt_s(gt[other][g])}.")
        else:
            s = f"IREE takes {ratio:.2f}x {name}'s time and is faster in every group."
        s_fine_lead = " Still slower by fine kind: " if d <= 0 else " By fine kind: "
        # Per fine kind, only where both runners have the kind (fusion-comparable).
        both = [(k, res["iree"]["per_kind"].get(k, 0) - res[other]["per_kind"].get(k, 0)) for k in
                res["iree"]["per_kind"] if res[other]["per_kind"].get(k, 0) > 0 and k != K_GAP]
        if both:
            k, dk = max(both, key=lambda kv: kv[1])
            in_group = {j for r in ("iree", other) for j, v in res[r]["per_kind"].items() if v > 0 and GROUPS[g](j)}
            if dk > 0 and in_group != {k}:  # not the group's own single kind again
                s += (f"{s_fine_lead}{k}, {fmt_s(res['iree']['per_kind'][k])} vs "
                      f"{fmt_s(res[other]['per_kind'][k])}.")
        out.append(s)
    if "iree" in runners:
        ir = res["iree"]
        low = [(n, f) for n, f in ir["functions"].items() if f["s"] > 0.01 * ir["total_s"]
               and f["tile_s"] / (f["s"] * res["args_threads"]) < 0.75]
        if low:
            share = sum(f["s"] for _, f in low) / ir["total_s"]
            out.append(f"IREE: {len(low)} dispatch functions above 1% of the call keep the {res['args_threads']} "
                       f"workers less than 75% busy ({pct(share)} of the call): too few workgroups or unequal ones.")
    return out


# ---- driver --------------------------------------------------------------------------------------


def tree_memory_kib(root: int) -> tuple[int, int]:
    """(anonymous, total) resident KiB of process `root` and its descendants, from /proc."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                parent[int(d)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    tree, frontier = {root}, [root]
    while frontier:
        frontier = [c for c, pp in parent.items() if pp in frontier and c not in tree]
        tree.update(frontier)
    anon = total = 0
    for pid in tree:
        try:
            # A fork that has not exec'd yet shares its parent's pages (OpenVINO's conversion forks often).
            if pid != root and os.readlink(f"/proc/{pid}/exe") == os.readlink(f"/proc/{parent[pid]}/exe"):
                continue
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    anon += int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return anon, total


def _cpu_seconds() -> dict[str, float]:
    """The machine's CPU time since boot by state (/proc/stat's first line), in seconds; {} where unreadable."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError):
        return {}
    states = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
    return {k: v / os.sysconf("SC_CLK_TCK") for k, v in zip(states, ticks + [0] * 8)}


def machine_busy_s() -> float:
    """CPU seconds all processes have used since boot (steal included), or 0 where it cannot be read."""
    t = _cpu_seconds()
    return sum(t.get(k, 0.0) for k in ("user", "nice", "system", "irq", "softirq", "steal"))


def machine_steal_s() -> float:
    """Seconds the hypervisor has given this machine's CPUs to others since boot (steal), or 0."""
    return _cpu_seconds().get("steal", 0.0)


ROUNDED = ("iree", "openvino")  # the phases --rounds repeats, in rotation


def merge_rounds(phase: str, outs: list[dict]) -> dict:
    """One runner's result over its --rounds: per-kind seconds, call totals and per-function (IREE) or
    per-node (OpenVINO) seconds averaged, the calls of every round listed."""
    n = len(outs)
    m = dict(outs[-1])
    m["rounds_total_s"] = [o["total_s"] for o in outs]
    m["total_s"] = sum(o["total_s"] for o in outs) / n
    for field in ("per_kind", "conv_shapes", "mm_shapes"):
        if all(field in o for o in outs):
            keys = {k for o in outs for k in o[field]}
            m[field] = {k: sum(o[field].get(k, 0.0) for o in outs) / n for k in keys}
    if phase == "iree":
        fns: dict[str, dict] = {}
        for o in outs:
            for key, f in o["functions"].items():
                g = fns.setdefault(key, {**f, "s": 0.0, "wall_s": 0.0, "tile_s": 0.0})
                for x in ("s", "wall_s", "tile_s"):
                    g[x] += f[x] / n
        m["functions"] = fns
        m["calls"] = [c for o in outs for c in o["calls"]]
        if "unprofiled_calls_s" in m:
            m["unprofiled_calls_s"] = [t for o in outs for t in o["unprofiled_calls_s"]]
        for x in ("dispatch_sum_s", "dispatch_busy_s"):
            m[x] = sum(o[x] for o in outs) / n
        m["unclassified_share"] = m["per_kind"].get(K_UNCL, 0.0) / m["dispatch_sum_s"] if m["dispatch_sum_s"] else 0.0
    if phase == "openvino":
        nodes: dict[str, dict] = {}
        for o in outs:
            for nd in o["nodes"]:
                nodes.setdefault(nd["name"], {**nd, "s": 0.0})["s"] += nd["s"] / n
        m["nodes"] = list(nodes.values())
        m["top"] = sorted(m["nodes"], key=lambda nd: -nd["s"])[:40]
        m["calls_s"] = [t for o in outs for t in o["calls_s"]]
        m["node_sum_s"] = sum(o["node_sum_s"] for o in outs) / n
    return m


def run_phase(phase: str, work: Path) -> tuple[dict, dict]:
    """Run one phase in a child process; its result, and its seconds and peak memory (sampled every 0.5 s)."""
    import threading

    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--work", str(work)]
    busy0 = machine_busy_s()
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    peak = {"anon": 0, "total": 0}
    done = threading.Event()

    def sample():
        while not done.wait(0.5):
            anon, total = tree_memory_kib(proc.pid)
            peak["anon"], peak["total"] = max(peak["anon"], anon), max(peak["total"], total)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    secs = time.perf_counter() - t0
    # CPU time of other processes while the phase ran (ours: the child and everything it waited for).
    other = max(0.0, machine_busy_s() - busy0 - usage.ru_utime - usage.ru_stime)
    if proc.returncode:
        raise SystemExit(f"phase {phase} failed (exit {proc.returncode})")
    out = json.loads((work / f"{phase}.json").read_text())
    stats = {"seconds": secs, "other_cpu_share": other / (secs * (os.cpu_count() or 1)),
             "peak_rss_gib": max(usage.ru_maxrss / 2**20, out.get("peak_rss_gib", 0), peak["total"] / 2**20),
             "peak_anon_gib": peak["anon"] / 2**20}
    return out, stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--irpa", help="fp32 parameter archive from `punet import`")
    p.add_argument("--vmfb", help="`punet compile --target cpu` module (its build record .json beside it)")
    p.add_argument("--packed", help="the packed archive of a module compiled with --pack-weights (`punet pack`); "
                   "--irpa stays the unpacked one torch and OpenVINO read")
    p.add_argument("--size", type=int, default=256, help="image size in pixels (default 256)")
    p.add_argument("--batch", type=int, default=1, help="batch of the UNet step (default 1; 2 is a CFG step's "
                   "batch, run as one plain step)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/cpu-profile.md")
    p.add_argument("--runners", nargs="+", choices=RUNNERS, default=list(RUNNERS))
    p.add_argument("--mlir", help="the exported .mlir of the .vmfb (default: the build record's); 'none' skips the "
                   "flow-level IR")
    p.add_argument("--iree-profiler", choices=("perf", "host-execution"), default=None,
                   help="perf: `perf record` samples IREE's calls in punet's own runtime, named by the module's "
                   "embedded code (default where perf is on PATH; costs the call next to nothing); host-execution: "
                   "IREE's per-dispatch events under iree-benchmark-module (slows the call)")
    p.add_argument("--iree-calls", type=int, default=None, help="IREE calls in the profile (default: 5 under perf, "
                   "averaged; 2 under host-execution, the last kept)")
    p.add_argument("--perf-freq", type=int, default=1000, help="perf samples per second per thread (default 1000)")
    p.add_argument("--ov-xml", help="OpenVINO IR to profile (bench/suite.py saves one per size: unet_f32_<size>.xml); "
                   "default: convert the torch model in the process")
    p.add_argument("--rounds", type=int, default=1, help="profile IREE and OpenVINO this many times, in rotation, "
                   "and average (default 1): on a shared host their calls drift by 10-30%% from minute to minute")
    p.add_argument("--ov-calls", type=int, default=5, help="OpenVINO calls profiled after two warm-ups, averaged "
                   "(default 5)")
    p.add_argument("--gemm-size", type=int, default=4096)
    p.add_argument("--gemm-reps", type=int, default=5)
    p.add_argument("--work", help="scratch folder (default: a new temporary one, removed afterwards)")
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.phase:
        work = Path(a.work)
        args = json.loads((work / "args.json").read_text())
        fn = {"peak": phase_peak, "flops": phase_flops, "iree": phase_iree, "torch": phase_torch,
              "openvino": phase_openvino}[a.phase]
        res = fn(args)
        res.setdefault("peak_rss_gib", peak_rss_gib())
        (work / f"{a.phase}.json").write_text(json.dumps(res, indent=1, default=str))
        return
    if not a.irpa:
        p.error("--irpa is required")
    if "iree" in a.runners and not a.vmfb:
        p.error("--vmfb is required with the iree runner")
    for f in (a.irpa, a.vmfb):
        if f and not Path(f).is_file():
            p.error(f"{f}: file not found")
    if a.iree_profiler is None:
        a.iree_profiler = "perf" if shutil.which("perf") else "host-execution"
    if a.iree_calls is None:
        a.iree_calls = 5 if a.iree_profiler == "perf" else 2
    keep = a.work is not None
    work = Path(a.work or tempfile.mkdtemp(prefix="punet-profile-"))
    work.mkdir(parents=True, exist_ok=True)
    if a.vmfb and json.loads(Path(a.vmfb + ".json").read_text()).get("packed") and not a.packed:
        p.error(f"{a.vmfb} reads packed weights: give them with --packed (punet pack)")
    args = {**vars(a), "irpa": str(Path(a.irpa).resolve()), "vmfb": str(Path(a.vmfb).resolve()) if a.vmfb else None,
            "packed": str(Path(a.packed).resolve()) if a.packed else None,
            "ov_xml": str(Path(a.ov_xml).resolve()) if a.ov_xml else None,
            "work": str(work), "argv": sys.argv[1:]}
    (work / "args.json").write_text(json.dumps(args, indent=1))
    runners = [r for r in RUNNERS if r in a.runners]
    # IREE and OpenVINO again, in rotation, for --rounds: drift on a shared host falls on both alike
    phases = ["peak", "flops"] + runners + [r for _ in range(a.rounds - 1) for r in runners if r in ROUNDED]
    res: dict = {"phases": {}}
    rounds: dict[str, list[dict]] = defaultdict(list)
    t_all = time.perf_counter()
    try:
        for i, ph in enumerate(phases, 1):
            k = len(rounds[ph]) + 1
            print(f"== [{i}/{len(phases)}] {ph}" + (f" (round {k} of {a.rounds})" if ph in ROUNDED and a.rounds > 1
                                                     else ""), flush=True)
            out, stats = run_phase(ph, work)
            rounds[ph].append(out)
            res["phases"][ph if k == 1 else f"{ph} {k}"] = stats
            print(f"   {ph}: {stats['seconds']:.1f} s, peak RSS {stats['peak_rss_gib']:.1f} GiB (anonymous "
                  f"{stats['peak_anon_gib']:.1f} GiB); other processes used {100 * stats['other_cpu_share']:.0f}% "
                  "of the CPUs meanwhile", flush=True)
        for ph, outs in rounds.items():
            res[ph] = merge_rounds(ph, outs) if ph in ROUNDED else outs[0]
            res[ph].pop("nodes", None)  # every OpenVINO node: needed for the merge, too long to keep
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    now = datetime.datetime.now()
    date = now.strftime("%Y-%m-%d")
    out_md = Path(a.out)
    json_path = out_md.parent / "data" / f"{out_md.stem}-{date}.json"  # cpu-profile-512.md: cpu-profile-512-<date>
    res.update({"date": now.strftime("%Y-%m-%d %H:%M"), "versions": versions(), "args_threads": a.threads,
                "json_rel": os.path.relpath(json_path, out_md.parent), "args": {k: v for k, v in args.items()
                                                                                 if k != "work"}})
    md = render(res, args)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md)
    json_path.write_text(json.dumps(res, indent=1, default=str))
    print(f"== wrote {out_md} and {json_path} in {time.perf_counter() - t_all:.0f} s", flush=True)
    if "iree" in res:
        print(f"   IREE unclassified: {100 * res['iree']['unclassified_share']:.1f}% of dispatch time", flush=True)


if __name__ == "__main__":
    main()
