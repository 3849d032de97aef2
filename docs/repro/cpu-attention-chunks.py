"""Self-attention alone (heads x N x N, batch 1): per-pair slices (0) vs query chunks of R rows, IREE packed flags.

    python docs/repro/cpu-attention-chunks.py 10 4096 0 1024 512 256 128 64   # heads, tokens, then R values
"""
import subprocess, sys, tempfile, time, statistics
from pathlib import Path
import torch, torch.nn.functional as F
import iree.runtime as rt
from iree.turbine import aot
import punet.model.layers as L
from punet.compile import iree_compile
from punet.compile.targets import compile_flags, get_target, packed_flags
torch.set_num_threads(2)
H, N = int(sys.argv[1]), int(sys.argv[2])

class Core(torch.nn.Module):
    def __init__(self, rows): super().__init__(); self.rows = rows
    def forward(self, q, k, v):
        if self.rows == 0:
            return L.decomposed_attention(q, k, v)
        b, h, n, d = q.shape
        qs, ks, vs = (t.reshape(b * h, -1, d) for t in (q, k, v))
        outs = [torch.cat([L._softmax_attention(qs[i:i + 1, c:c + self.rows], ks[i:i + 1], vs[i:i + 1])
                           for c in range(0, n, self.rows)], 1) for i in range(b * h)]
        return torch.cat(outs).reshape(b, h, n, d)

def timed(fn, n=5):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)
torch.manual_seed(0)
q, k, v = (torch.randn(1, H, N, 64) for _ in range(3))
ref = F.scaled_dot_product_attention(q, k, v)
gf = 4 * H * N * N * 64 / 1e9
print(f"{H}x{N}x{N}: torch sdpa {timed(lambda: F.scaled_dot_product_attention(q, k, v)) * 1e3:.1f} ms", flush=True)
flags = packed_flags(compile_flags(get_target("cpu"), tuned=True), True)
flags = [f for f in flags if "parameter-encoder" not in f]
cfg = rt.Config("local-task")
with tempfile.TemporaryDirectory() as tmp:
    for rows in [int(r) for r in sys.argv[3:]]:
        mlir, vmfb = Path(tmp, "a.mlir"), Path(tmp, "a.vmfb")
        aot.export(Core(rows), args=(q, k, v)).save_mlir(str(mlir))
        p = subprocess.run([iree_compile(), str(mlir), *flags, "-o", str(vmfb)], capture_output=True, text=True)
        if p.returncode:
            print(rows, "compile failed:", p.stderr.strip().splitlines()[0][:200], flush=True); continue
        mods = rt.load_vm_modules(rt.VmModule.mmap(cfg.vm_instance, str(vmfb)), config=cfg)
        a = [x.numpy() for x in (q, k, v)]
        out = torch.from_numpy(mods[-1].main(*a).to_host())
        err = ((out - ref).norm() / ref.norm()).item()
        t = timed(lambda: mods[-1].main(*a).to_host())
        print(f"rows {rows or 'pair'}: {t * 1e3:.1f} ms {gf / t:.0f} GFLOP/s rel L2 {err:.1e}", flush=True)
        mods = None
