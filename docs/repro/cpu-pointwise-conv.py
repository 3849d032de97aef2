"""1x1 conv at batch 2: nn.Conv2d vs per-row loop vs permute+matmul vs broadcast bmm, IREE packed CPU flags vs torch.

    python docs/repro/cpu-pointwise-conv.py 2 2560 1280 32 conv rows perm bmm   # B C_in C_out H, then forms
"""
import subprocess, sys, tempfile, time, statistics
from pathlib import Path
import torch, torch.nn.functional as F
import iree.runtime as rt
from iree.turbine import aot
from punet.compile import iree_compile
from punet.compile.targets import compile_flags, get_target, packed_flags

torch.set_num_threads(2)
B, CIN, COUT, H = [int(x) for x in sys.argv[1:5]]

class Conv(torch.nn.Module):
    def __init__(self, form):
        super().__init__(); self.form = form
        torch.manual_seed(0)
        self.c = torch.nn.Conv2d(CIN, COUT, 1)
    def forward(self, x):
        w, b = self.c.weight, self.c.bias
        if self.form == "conv":
            return F.conv2d(x, w, b)
        if self.form == "rows":
            return torch.cat([F.conv2d(x[i:i + 1], w, b) for i in range(x.shape[0])])
        if self.form == "perm":  # [Cin, B*HW] columns: one 2-D matmul
            bsz, c, h, wd = x.shape
            cols = x.permute(1, 0, 2, 3).reshape(c, bsz * h * wd)
            y = torch.addmm(b[:, None], w.reshape(w.shape[0], c), cols)
            return y.reshape(-1, bsz, h, wd).permute(1, 0, 2, 3)
        if self.form == "bmm":  # weight broadcast over the batch
            bsz, c, h, wd = x.shape
            y = torch.matmul(w.reshape(w.shape[0], c), x.reshape(bsz, c, h * wd)) + b[:, None]
            return y.reshape(bsz, -1, h, wd)

def timed(fn, n=5):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)

x = torch.randn(B, CIN, H, H)
flags = packed_flags(compile_flags(get_target("cpu"), tuned=True), True)
flags = [f for f in flags if "parameter-encoder" not in f]
gf = 2 * B * CIN * COUT * H * H / 1e9
ref = Conv("conv")(x)
print(f"{B}x{CIN}x{H}x{H} -> {COUT}: torch {timed(lambda: Conv('conv')(x)) * 1e3:.1f} ms ({gf:.1f} GFLOP)", flush=True)
cfg = rt.Config("local-task")
with tempfile.TemporaryDirectory() as tmp:
    for form in sys.argv[5:]:
        m = Conv(form)
        assert (m(x) - ref).abs().max() < 1e-3
        mlir, vmfb = Path(tmp, "a.mlir"), Path(tmp, "a.vmfb")
        aot.export(m, args=(x,)).save_mlir(str(mlir))
        p = subprocess.run([iree_compile(), str(mlir), *flags, "-o", str(vmfb)], capture_output=True, text=True)
        if p.returncode:
            print(form, "compile failed:", p.stderr[:300]); continue
        mods = rt.load_vm_modules(rt.VmModule.mmap(cfg.vm_instance, str(vmfb)), config=cfg)
        xn = x.numpy()
        out = torch.from_numpy(mods[-1].main(xn).to_host())
        err = ((out - ref).norm() / ref.norm()).item()
        t = timed(lambda: mods[-1].main(xn).to_host())
        print(f"{form:6} {t * 1e3:8.1f} ms  {gf / t:6.0f} GFLOP/s  rel L2 {err:.1e}", flush=True)
        mods = None
