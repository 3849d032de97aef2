"""IREE 3.13: --iree-global-opt-use-im2col-for-convs fails on a bf16 / f16 conv2d with batch > 1.

    python docs/repro/cpu-bf16-im2col-rows.py repro                  # the failure, smallest case
    python docs/repro/cpu-bf16-im2col-rows.py time 2 1280 32 conv rows   # B C H, then forms to time

`repro`: one `F.conv2d` (no bias, weights as arguments) exported by iree-turbine and compiled with
`--iree-global-opt-use-im2col-for-convs` alone, for batch 1 and 2 and three dtypes. Batch 2 fails for
bf16 and f16 in ConvertConv2DToImg2ColPass (global optimisation): its batched NCHW form writes the
contraction body as `arith.mulf bf16, bf16 -> bf16; arith.addf bf16, f32`, without extending the inputs
to the f32 accumulator, which the verifier rejects ("'arith.addf' op requires the same type for all
operands and results"). Batch 1 takes the pass's matmul form and compiles; f32 compiles at both.

`time`: a 3x3 conv at batch B in bf16, with the `cpu` target's tuned flags for bf16 (weights as
arguments, not packed): `conv` as one batch-B convolution (no im2col: what punet compiles for multi-row
bf16 modules) and `rows` as a concatenation of batch-1 convolutions, which im2col takes.
"""
import subprocess, sys, tempfile, time, statistics
from pathlib import Path
import torch, torch.nn.functional as F
from iree.turbine import aot
from punet.compile import iree_compile
from punet.compile.targets import compile_flags, get_target

IM2COL = "--iree-global-opt-use-im2col-for-convs"
CPU = ["--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
       "--iree-llvmcpu-target-cpu=host"]


class Conv(torch.nn.Module):
    def __init__(self, form="conv"):
        super().__init__(); self.form = form

    def forward(self, x, w):
        if self.form == "rows":
            return torch.cat([F.conv2d(x[i:i + 1], w, None, padding=1) for i in range(x.shape[0])])
        return F.conv2d(x, w, None, padding=1)


def compile_rc(module, args, flags, vmfb):
    with tempfile.TemporaryDirectory() as tmp:
        mlir = Path(tmp, "a.mlir")
        aot.export(module, args=args).save_mlir(str(mlir))
        p = subprocess.run([iree_compile(), str(mlir), *flags, "-o", str(vmfb)], capture_output=True, text=True)
    first = next((ln for ln in p.stderr.splitlines() if "error" in ln), "")
    return p.returncode, first


def repro():
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for rows in (1, 2):
                args = (torch.randn(rows, 4, 8, 8, dtype=dtype), torch.randn(8, 4, 3, 3, dtype=dtype))
                rc, err = compile_rc(Conv(), args, CPU + [IM2COL], Path(tmp, "a.vmfb"))
                print(f"{str(dtype):15} batch {rows}: {'compiles' if rc == 0 else 'FAILS ' + err.strip()[:120]}")


def timed(fn, n=5):
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def time_forms(b, c, h, forms):
    import iree.runtime as rt
    from punet.runtime import device_buffer, host_tensor
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x = torch.randn(b, c, h, h).to(torch.bfloat16)
    w = (torch.randn(c, c, 3, 3) / (3 * c ** 0.5)).to(torch.bfloat16)
    ref = F.conv2d(x.double(), w.double(), None, padding=1)
    gf = 2 * b * c * c * 9 * h * h / 1e9
    print(f"{b}x{c}x{h}x{h} 3x3 -> {c}, bf16: torch eager {timed(lambda: F.conv2d(x, w, None, padding=1)) * 1e3:.1f} ms "
          f"({gf:.1f} GFLOP, 2 threads)", flush=True)
    cfg = rt.Config("local-task")
    with tempfile.TemporaryDirectory() as tmp:
        for form in forms:
            rows = 1 if form == "rows" else b  # the rule punet.compile applies: im2col at one row only
            flags = compile_flags(get_target("cpu"), tuned=True, dtype="bfloat16", rows=rows)
            vmfb = Path(tmp, f"{form}.vmfb")
            rc, err = compile_rc(Conv(form), (x, w), flags, vmfb)
            if rc:
                print(form, "compile failed:", err); continue
            mods = rt.load_vm_modules(rt.VmModule.mmap(cfg.vm_instance, str(vmfb)), config=cfg)
            bufs = [device_buffer(cfg.device, t) for t in (x, w)]
            call = lambda: mods[-1].main(*bufs).to_host()
            out = host_tensor(mods[-1].main(*bufs)).double()
            err = ((out - ref).norm() / ref.norm()).item()
            t = timed(call)
            print(f"{form:5} {'im2col' if IM2COL in flags else 'direct':6} {t * 1e3:8.1f} ms  {gf / t:6.0f} GFLOP/s  "
                  f"rel L2 vs float64 {err:.1e}", flush=True)
            mods = None


if __name__ == "__main__":
    if sys.argv[1] == "repro":
        repro()
    else:
        time_forms(*(int(a) for a in sys.argv[2:5]), sys.argv[5:])
