"""The SDXL UNet's projection matmuls alone: IREE (punet's packed CPU flags, and variants) vs torch and
OpenVINO (`--openvino`), one process.

    python bench/cpu_matmul.py --size 512 --variant tile-bytes-1m=--iree-llvmcpu-matmul-tile-bytes=1048576
    python bench/cpu_matmul.py --size 512 --cold-mib 400 --shapes "geglu 1280"
    python bench/cpu_matmul.py --size 256 --cold-mib 400 --openvino   # the kernels IREE and OpenVINO run
    python bench/cpu_matmul.py --size 512 --cold-mib 400 --openvino --dtype bfloat16

Each shape is `y = x @ W^T + b` with x [1, M, K] and W [N, K] as a parameter (scope "model"), the form
every attention and feed-forward projection of the UNet takes (no b for the cross-attention keys and
values, as in the UNet); M is the token count at that level
(`--size` 256: 64 / 256 tokens at the two attention levels; 512: 256 / 1024). The module is compiled
with the flags of `punet compile --target cpu --pack-weights` for a UNet module of that size (data tiling,
data-tiled convolutions, in fp32 only their microkernel and the matmuls through the code generator, no
transpose propagation, the size's matmul tile budget) plus each `--variant NAME=FLAG[,FLAG...]`; its weights are packed when the
module loads (the same packing `punet pack` does ahead of time), so the timed calls are the matmuls.
With `--cold-mib`, each call runs the shape on as many distinct weights as make up that many MiB (one
module, outputs returned together) and the figures are per matmul: weights read from memory, as in a
UNet call, which reads each of its 10 GB of weights once. One weight repeated stays in cache and hides
how a kernel streams it. With `--openvino`, OpenVINO's CPU plugin runs the same module
(`ov.convert_model` of it, f32 precision hint, the same threads), as the suite's OpenVINO runner does.
With `--dtype bfloat16`, torch and IREE run bf16 weights and activations (IREE with the `cpu` tuned set
for bf16 modules) and OpenVINO the float32 module with the bf16 precision hint, as the suite does;
*rel L2* is then against float32 on the same bf16-rounded weights and inputs, and *of peak* still
against the fp32 sgemm.
Prints, per shape and runner, the median of `--repeat` calls, GFLOP/s and % of a measured sgemm peak
(torch.mm 4096^3), and the CPU's model, ISA flags and thread count.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from punet import host

# (M at 256x256 / 512x512 latent tokens, N, K): the SDXL UNet's two attention levels (640 and 1280 wide).
SHAPES = {
    "q/k/v/out 640": ((256, 1024), 640, 640),
    "geglu 640": ((256, 1024), 5120, 640),
    "ff out 640": ((256, 1024), 640, 2560),
    "q/k/v/out 1280": ((64, 256), 1280, 1280),
    "geglu 1280": ((64, 256), 10240, 1280),
    "ff out 1280": ((64, 256), 1280, 5120),
    # cross-attention keys and values: the 77 text tokens (2048 wide) at either level; no bias, as in the UNet
    "cross k/v 640": ((77, 77), 640, 2048),
    "cross k/v 1280": ((77, 77), 1280, 2048),
}
NO_BIAS = {"cross k/v 640", "cross k/v 1280"}


def timed(fn, repeat: int) -> float:
    fn()
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


class Copies(torch.nn.Module):
    """`copies` Linear layers of one shape applied to the same input; every output returned."""

    def __init__(self, copies: int, k: int, n: int, bias: bool = True):
        super().__init__()
        self.lins = torch.nn.ModuleList(torch.nn.Linear(k, n, bias=bias) for _ in range(copies))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(lin(x) for lin in self.lins)


def openvino_time(
    module: torch.nn.Module, x: torch.Tensor, ref: tuple, threads: int, repeat: int, precision: str = "f32"
) -> tuple[float, float]:
    """OpenVINO's CPU plugin on float32 `module` (converted from torch) with inference `precision`:
    (median seconds per call, worst rel L2 vs `ref`)."""
    import openvino as ov

    compiled = ov.Core().compile_model(
        ov.convert_model(module, example_input=x), "CPU",
        {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision},
    )
    request = compiled.create_infer_request()
    xn = x.numpy()

    request.infer([xn])
    outs = [torch.from_numpy(request.get_output_tensor(i).data.copy()) for i in range(len(compiled.outputs))]
    err = max(((o - r).norm() / r.norm()).item() for o, r in zip(outs, ref))
    return timed(lambda: request.infer([xn]), repeat), err


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    """`--variant NAME=FLAG[,FLAG...]` options -> {NAME: [FLAG, ...]} (a flag keeps its own `=`)."""
    out = {}
    for spec in specs:
        name, sep, flags = spec.partition("=")
        if not sep or not name or not flags:
            raise SystemExit(f"--variant {spec!r}: expected NAME=FLAG[,FLAG...]")
        out[name] = flags.split(",")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=[256, 512], default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--variant", action="append", default=[], help="NAME=FLAG[,FLAG...] added to the packed flag set")
    p.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--cold-mib", type=int, default=0,
                   help="distinct weights per call, this many MiB in all (more than the last-level cache: weights "
                        "come from memory, as in a UNet call); 0: one weight, hot in cache")
    p.add_argument("--openvino", action="store_true", help="also time OpenVINO's CPU plugin on each shape")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="weights and activations (bfloat16: OpenVINO with its bf16 precision hint)")
    a = p.parse_args()

    import iree.runtime as rt
    from iree.turbine import aot

    from punet.compile import iree_compile
    from punet.compile.targets import get_target, module_flags
    from punet.runtime import device_buffer, host_tensor

    torch.set_num_threads(a.threads)
    bf16 = a.dtype == "bfloat16"
    dtype = getattr(torch, a.dtype)
    level = 0 if a.size == 256 else 1  # which of SHAPES' token counts
    # As `punet compile --pack-weights` builds the UNet module at --size: its smallest feature map (the
    # 1280-wide level's tokens) sets the matmul tile budget.
    base = module_flags(get_target("cpu"), tuned=True, dtype=a.dtype, min_tokens=SHAPES["q/k/v/out 1280"][0][level],
                        packed=True)
    variants = {"packed": []} | parse_variants(a.variant)
    a4 = torch.randn(4096, 4096)
    peak = 2 * 4096**3 / timed(lambda: a4 @ a4, 3) / 1e9
    weights = f"cold weights ({a.cold_mib} MiB per call), ms per matmul" if a.cold_mib else "one weight, hot"
    print(f"{host.describe()}; {a.threads} threads; {a.dtype}; fp32 sgemm peak (torch.mm 4096^3) {peak:.0f} GFLOP/s; {weights}",
          flush=True)
    print(f"{'shape':16} {'M x N x K':>18} {'runner':14} {'ms':>8} {'GFLOP/s':>8} {'of peak':>8}")
    config = rt.Config("local-task")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.shapes:
            ms_, n, k = SHAPES[name]
            m = ms_[level]
            copies = max(1, a.cold_mib * 2**20 // (dtype.itemsize * n * k))
            gflop = 2 * m * n * k / 1e9
            torch.manual_seed(0)
            lin = Copies(copies, k, n, bias=name not in NO_BIAS).to(dtype)
            x = torch.randn(1, m, k).to(dtype)
            lin32 = Copies(copies, k, n, bias=name not in NO_BIAS)  # float32 on the same (rounded) values
            lin32.load_state_dict({key: v.float() for key, v in lin.state_dict().items()})
            with torch.no_grad():
                ref = lin32(x.float())
                t = timed(lambda: lin(x), a.repeat) / copies
            print(f"{name:16} {f'{m}x{n}x{k}':>18} {'torch':14} {t * 1e3:8.2f} {gflop / t:8.0f} {gflop / t / peak:8.0%}", flush=True)
            if a.openvino:
                t, err = openvino_time(lin32, x.float(), ref, a.threads, a.repeat, "bf16" if bf16 else "f32")
                t /= copies
                print(f"{name:16} {f'{m}x{n}x{k}':>18} {'openvino':14} {t * 1e3:8.2f} {gflop / t:8.0f} {gflop / t / peak:8.0%}"
                      + (f"  rel L2 {err:.1e}" if err > 1e-5 else ""), flush=True)
            aot.externalize_module_parameters(lin, external_scope="model")
            irpa, mlir = Path(tmp, f"{n}x{k}.irpa"), Path(tmp, "m.mlir")
            aot.save_module_parameters(irpa, lin)
            aot.export(lin, args=(x,)).save_mlir(str(mlir))
            index = rt.ParameterIndex()
            index.load(str(irpa))
            for vname, extra in variants.items():
                vmfb = Path(tmp, f"{vname}.vmfb")
                proc = subprocess.run([iree_compile(), str(mlir), *base, *extra, "-o", str(vmfb)], capture_output=True, text=True)
                if proc.returncode:
                    print(f"{'':35} {vname:14} compile failed: {proc.stderr.strip().splitlines()[0][:100]}", flush=True)
                    continue
                params = rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope="model"))
                mods = rt.load_vm_modules(params, rt.VmModule.mmap(config.vm_instance, str(vmfb)), config=config)
                xn = device_buffer(config.device, x)

                def call():
                    outs = mods[-1].main(xn)
                    return outs if isinstance(outs, (tuple, list)) else [outs]

                err = max(((host_tensor(o).float() - r).norm() / r.norm()).item() for o, r in zip(call(), ref))
                t = timed(lambda: [o.to_host() for o in call()], a.repeat) / copies
                print(f"{name:16} {f'{m}x{n}x{k}':>18} {vname:14} {t * 1e3:8.2f} {gflop / t:8.0f} {gflop / t / peak:8.0%}"
                      + (f"  rel L2 {err:.1e}" if err > 1e-5 else ""), flush=True)
                mods = params = None  # unload before the next variant


if __name__ == "__main__":
    sys.exit(main())
