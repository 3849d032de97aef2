"""The SDXL UNet's attention cores alone: IREE (punet's packed CPU flags) vs torch, one process.

    python bench/cpu_attention.py --size 512

Each shape is softmax(q k^T / sqrt(64)) v with q [1, heads, N, 64] and k, v [1, heads, M, 64] as
inputs: the self- and cross-attention of the UNet's two attention levels at `--size` (M = 77 text
tokens for cross-attention). IREE runs punet's decomposed attention (`decomposed_attention`, the
form every CPU module is exported with) compiled with the flags of `punet compile --target cpu
--pack-weights`, as the model slices it (`SCORES_PER_SLICE`) and, where that is more than one
slice, whole as well, so the figure shows what the head slices buy. torch runs its fused scaled_dot_product_attention.
Prints, per shape and runner, the median of `--repeat` calls, the slices, GFLOP/s, and the CPU's
model, ISA flags and thread count.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from cpu_matmul import parse_variants, timed  # bench/: this script's folder is first on sys.path

from punet import host

# name -> (heads, query tokens at 256x256 / 512x512 / 1024x1024, key tokens or None for self-attention)
SHAPES = {
    "self 640": (10, (256, 1024, 4096), None),
    "cross 640": (10, (256, 1024, 4096), 77),
    "self 1280": (20, (64, 256, 1024), None),
    "cross 1280": (20, (64, 256, 1024), 77),
}
SIZES = (256, 512, 1024)


class Core(torch.nn.Module):
    def __init__(self, scores_per_slice: int):
        super().__init__()
        self.scores_per_slice = scores_per_slice

    def forward(self, q, k, v):
        from punet.model.layers import decomposed_attention

        return decomposed_attention(q, k, v, self.scores_per_slice)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, choices=SIZES, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES))
    p.add_argument("--variant", action="append", default=[],
                   help="NAME=FLAG[,FLAG...] added to the packed flag set, timed on the sliced form beside it")
    a = p.parse_args()
    variants = parse_variants(a.variant)

    import iree.runtime as rt
    from iree.turbine import aot

    import punet.model.layers as layers
    from punet.compile import iree_compile
    from punet.compile.targets import get_target, module_flags

    torch.set_num_threads(a.threads)
    # As `punet compile --pack-weights` builds the fp32 UNet module at --size: its smallest feature map (the
    # 1280-wide level's tokens) sets the matmul tile budget.
    min_tokens = SHAPES["self 1280"][1][SIZES.index(a.size)]
    flags = module_flags(get_target("cpu"), tuned=True, min_tokens=min_tokens, packed=True)
    budget = layers.SCORES_PER_SLICE
    print(f"{host.describe()}; {a.threads} threads; fp32; {a.size}x{a.size}; SCORES_PER_SLICE {budget}", flush=True)
    print(f"{'shape':11} {'heads x N x M':>16} {'runner':16} {'slices':>6} {'ms':>8} {'GFLOP/s':>8}")
    config = rt.Config("local-task")
    with tempfile.TemporaryDirectory() as tmp:
        for name in a.shapes:
            heads, ns, m = SHAPES[name]
            n = ns[SIZES.index(a.size)]
            m = m or n
            torch.manual_seed(0)
            q, k, v = torch.randn(1, heads, n, 64), torch.randn(1, heads, m, 64), torch.randn(1, heads, m, 64)
            gflop = 4 * heads * n * m * 64 / 1e9
            dims = f"{heads}x{n}x{m}"
            ref = F.scaled_dot_product_attention(q, k, v)
            t = timed(lambda: F.scaled_dot_product_attention(q, k, v), a.repeat)
            print(f"{name:11} {dims:>16} {'torch sdpa':16} {'':>6} {t * 1e3:8.2f} {gflop / t:8.0f}", flush=True)
            sliced = layers.attention_slices(1, heads, n, m)
            builds = [("iree", budget, [])] + [("iree whole", 1 << 62, [])] * (sliced > 1)
            builds += [(f"iree {vname}", budget, extra) for vname, extra in variants.items()]
            for label, per_slice, extra in builds:
                slices = layers.attention_slices(1, heads, n, m, per_slice)
                mlir, vmfb = Path(tmp, "a.mlir"), Path(tmp, "a.vmfb")
                aot.export(Core(per_slice), args=(q, k, v)).save_mlir(str(mlir))
                proc = subprocess.run([iree_compile(), str(mlir), *flags, *extra, "-o", str(vmfb)],
                                      capture_output=True, text=True)
                if proc.returncode:
                    print(f"{'':28} {label:16} compile failed: {proc.stderr.strip().splitlines()[0][:100]}", flush=True)
                    continue
                mods = rt.load_vm_modules(rt.VmModule.mmap(config.vm_instance, str(vmfb)), config=config)
                args = [x.numpy() for x in (q, k, v)]
                out = torch.from_numpy(mods[-1].main(*args).to_host())
                err = ((out - ref).norm() / ref.norm()).item()
                t = timed(lambda: mods[-1].main(*args).to_host(), a.repeat)
                print(f"{name:11} {dims:>16} {label:16} {slices:6} {t * 1e3:8.2f} {gflop / t:8.0f}"
                      + (f"  rel L2 {err:.1e}" if err > 1e-5 else ""), flush=True)
                mods = None  # unload before the next module


if __name__ == "__main__":
    sys.exit(main())
