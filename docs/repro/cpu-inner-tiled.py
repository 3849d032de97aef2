"""inner_tiled + IREE's LLVM-bitcode ukernels on one UNet projection (1024x640 @ 640x5120, fp32) and its consumers.

    python docs/repro/cpu-inner-tiled.py

Each case is compiled with punet's packed CPU flags (mmt4d microkernels) and with
`--iree-llvmcpu-enable-inner-tiled --iree-llvmcpu-enable-llvm-ukernels=inner_tiled`, run on
local-task next to torch (2 threads); docs/cpu-tuning.md has the figures. Cases: the matmul followed
by GELU, by a residual add, and with its bias folded into the contraction (a ones column of x, the
bias as a last column of W). The plain `nn.Linear` with its bias does not compile with inner_tiled
(the broadcast bias add over the encoded result), see docs/cpu-tuning.md.
"""

import statistics
import subprocess
import time
from pathlib import Path

import iree.runtime as rt
import torch
from iree.turbine import aot
from punet.compile import iree_compile
from punet.compile.targets import compile_flags, get_target, packed_flags

torch.set_num_threads(2)
base = packed_flags(compile_flags(get_target("cpu"), tuned=True), True)
OUT = "/tmp/punet-inner-tiled"
Path(OUT).mkdir(exist_ok=True)
IT = ["--iree-llvmcpu-enable-inner-tiled", "--iree-llvmcpu-enable-llvm-ukernels=inner_tiled"]
m, n, k = 1024, 5120, 640


class Gelu(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.lin = torch.nn.Linear(k, n, bias=False)

    def forward(s, x):
        return torch.nn.functional.gelu(s.lin(x))


class Resid(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.lin = torch.nn.Linear(k, n, bias=False)

    def forward(s, x, r):
        return s.lin(x) + r


class Aug(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.lin = torch.nn.Linear(k, n)

    def forward(s, x):
        w = torch.cat([s.lin.weight, s.lin.bias[:, None]], 1)
        xa = torch.cat([x, torch.ones(x.shape[0], 1)], 1)
        return xa @ w.T


def timed(f, r=10):
    f()
    out = []
    for _ in range(r):
        t = time.perf_counter()
        f()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


cfg = rt.Config("local-task")
for name, mod, args in [
    ("gelu", Gelu(), (torch.randn(m, k),)),
    ("resid", Resid(), (torch.randn(m, k), torch.randn(m, n))),
    ("aug", Aug(), (torch.randn(m, k),)),
]:
    with torch.no_grad():
        ref = mod(*args)
        tt = timed(lambda: mod(*args))
    print(f"{name} torch {tt * 1e3:.2f} ms", flush=True)
    aot.externalize_module_parameters(mod, external_scope="model")
    aot.save_module_parameters(f"{OUT}/{name}.irpa", mod)
    aot.export(mod, args=args).save_mlir(f"{OUT}/{name}.mlir")
    idx = rt.ParameterIndex()
    idx.load(f"{OUT}/{name}.irpa")
    for v, extra in [("packed", []), ("inner-uk", IT)]:
        p = subprocess.run(
            [iree_compile(), f"{OUT}/{name}.mlir", *base, *extra, "-o", f"{OUT}/{name}_{v}.vmfb"],
            capture_output=True,
            text=True,
        )
        if p.returncode:
            print(f"  {v} failed:", [l[:150] for l in p.stderr.splitlines() if "error" in l][:1], flush=True)
            continue
        mods = rt.load_vm_modules(
            rt.create_io_parameters_module(cfg.vm_instance, idx.create_provider(scope="model")),
            rt.VmModule.mmap(cfg.vm_instance, f"{OUT}/{name}_{v}.vmfb"),
            config=cfg,
        )
        an = [a.numpy() for a in args]
        out = torch.from_numpy(mods[-1].main(*an).to_host())
        t = timed(lambda: mods[-1].main(*an).to_host())
        print(f"  {v} {t * 1e3:.2f} ms relL2 {((out - ref).norm() / ref.norm()).item():.1e}", flush=True)
