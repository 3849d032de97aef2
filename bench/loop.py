"""The denoising loop, three ways: the scheduled module, the bare CFG module plus the scheduler on the host, torch eager.

    python bench/loop.py RUNNER --irpa unet.irpa [--vmfb X.vmfb] --steps 20 --out DIR

RUNNER is one of:
  torch      punet's ScheduledUNet in torch eager (--torch-device cpu or cuda)
  scheduled  a scheduled .vmfb (`punet export --scheduled`): run_initialize, then run_forward per step;
             the latents stay on the device
  cfg        a CFG .vmfb (`punet export --cfg`, main_cfg) called once per step, with the scale and the
             Euler step done by punet's torch scheduler on the host (what a server without the
             scheduled module does); latents go to the device and back every step

Each runner is meant to run in its own process (its peak RSS is then its own): the row it measured
is written to DIR/RUNNER.json and its final latents to DIR/RUNNER.safetensors; `--report DIR`
prints the table, with each runner's latents against torch's (relative L2). Every runner gets the
same deterministic inputs (`make_loop_inputs`, seed 0) at the signature of the .vmfb (or of
--height/--width/--tokens/--dtype for torch alone), guidance 7.5, SDXL base's scheduler.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

from punet.host import cpu_id, cpu_model, isa

RUNNERS = ("torch", "scheduled", "cfg")


def host() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cpu_id": cpu_id(), "isa": isa(), "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu,
            "torch": torch.__version__}


def run(a) -> dict:
    import torch

    from punet.runtime import Session, load_build_info
    from punet.scheduled import SchedulerConfig, euler
    from punet.scheduled.generate import CompiledStepper, EagerStepper, eager_scheduled, make_loop_inputs, run_loop
    from punet.signature import Signature
    from punet.weights import read_metadata

    t0 = time.perf_counter()
    if a.vmfb:
        info = load_build_info(a.vmfb)
        sig = Signature(**{**info["signature"], "scheduled": True, "serving": False, "cfg": False, "module_name": ""})
    else:
        dtype = a.dtype or read_metadata(a.irpa)["dtype"]
        sig = Signature(1, a.height, a.width, dtype, tokens=a.tokens, scheduled=True)
    from punet.config import UNetConfig

    config = UNetConfig.from_dict(read_metadata(a.irpa)["config"])
    x = make_loop_inputs(config, sig, 0)
    sched = SchedulerConfig.sdxl()
    sync = torch.cuda.synchronize if a.torch_device == "cuda" else (lambda: None)
    if a.runner == "torch":
        model, _ = eager_scheduled(a.irpa, sig, sched, a.torch_device)
        stepper = EagerStepper(model, a.torch_device)
        label = f"torch eager {sig.dtype} ({a.torch_device})"
    elif a.runner == "scheduled":
        session = Session.load(a.vmfb, a.irpa, a.iree_device)
        stepper = CompiledStepper(session)
        label = f"IREE {info['target']} scheduled module ({a.iree_device})"
    else:
        stepper = _HostScheduler(Session.load(a.vmfb, a.irpa, a.iree_device), sched)
        label = f"IREE {info['target']} CFG module + host scheduler ({a.iree_device})"
    load_s = time.perf_counter() - t0
    # One untimed loop of 2 steps first: first calls JIT kernels (CUDA) and touch the weights.
    run_loop(stepper, x, sig, steps=2, guidance=7.5, runner=label)
    sync()
    res = run_loop(stepper, x, sig, steps=a.steps, guidance=7.5, runner=label, on_step=lambda i, ms: sync())
    from punet.tensors import save_tensors

    save_tensors(Path(a.out) / f"{a.runner}.safetensors", {"sample": res.latents})
    return {
        "runner": label, "key": a.runner, "steps": a.steps, "load_s": round(load_s, 2),
        "median_step_ms": statistics.median(res.step_ms), "min_step_ms": min(res.step_ms),
        "loop_ms": sum(res.step_ms) + res.initialize_ms, "step_ms": res.step_ms,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "signature": sig.to_dict(), "host": host(), "vmfb": a.vmfb, "tables": euler.MAX_STEPS,
    }


class _HostScheduler:
    """A CFG module called once per step; scale and Euler step in torch on the host (punet's scheduler)."""

    def __init__(self, session, sched):
        import torch

        from punet.scheduled import euler

        self.session, self.sched, self.euler, self.torch = session, sched, euler, torch

    def initialize(self, sample, steps):
        ts, ss = self.euler.tables(self.sched, steps)
        return (self.euler.scale_latents(sample, self.euler.init_noise_sigma(self.sched, ss).reshape(1)), ts, ss)

    def forward(self, state, tensors, guidance, i):
        torch, euler = self.torch, self.euler
        latents, ts, ss = state
        sig = self.session.signature
        x = {
            "sample": euler.scale_model_input(latents, ss[i : i + 1]),
            "timestep": ts[i : i + 1].expand(sig.batch).contiguous(),
            "encoder_hidden_states": tensors["encoder_hidden_states"],
            "text_embeds": tensors["text_embeds"],
            "time_ids": tensors["time_ids"],
            "guidance_scale": torch.tensor([guidance]),
        }
        noise = self.session(x)
        return (euler.step(noise, latents, ss[i : i + 1], ss[i + 1 : i + 2]), ts, ss)

    def latents(self, state):
        return state[0]


def report(out: Path) -> None:
    from punet.tensors import load_tensors

    rows = [json.loads((out / f"{k}.json").read_text()) for k in RUNNERS if (out / f"{k}.json").is_file()]
    if not rows:
        sys.exit(f"bench/loop.py: error: no runner results in {out}")
    ref = load_tensors(out / "torch.safetensors")["sample"].double() if (out / "torch.safetensors").is_file() else None
    base = next((r["median_step_ms"] for r in rows if r["key"] == "torch"), None)
    s = rows[0]["signature"]
    h = rows[0]["host"]
    print(f"SDXL UNet denoising loop: batch {s['batch']} (2 UNet rows), {s['height']}x{s['width']}, {s['dtype']}, "
          f"{s['tokens']} tokens, {rows[0]['steps']} steps, guidance 7.5")
    print(f"host: {h['cpu']} ({h['cores']} cores; {' '.join(h['isa'])}); gpu: {h['gpu']}; torch {h['torch']}, "
          f"{h['torch_threads']} threads")
    print(f"{'runner':58} {'load s':>7} {'ms/step':>9} {'vs torch':>9} {'loop s':>7} {'peak RSS':>9} {'rel L2 vs torch':>16}")
    for r in rows:
        lat = load_tensors(out / f"{r['key']}.safetensors")["sample"].double()
        err = ((lat - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
        r["rel_l2_vs_torch"] = err
        speed = f"{base / r['median_step_ms']:8.2f}x" if base else "n/a"
        print(f"{r['runner']:58} {r['load_s']:7.1f} {r['median_step_ms']:9.1f} {speed} {r['loop_ms'] / 1e3:7.1f} "
              f"{r['peak_rss_gib']:7.1f} GiB {err:16.2e}")
    (out / "report.json").write_text(json.dumps(rows, indent=2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runner", nargs="?", choices=RUNNERS)
    p.add_argument("--irpa")
    p.add_argument("--vmfb", help="the scheduled or CFG .vmfb (its signature sets the shapes)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--height", type=int, default=1024)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--dtype")
    p.add_argument("--torch-device", default="cpu")
    p.add_argument("--iree-device", default="local-task")
    p.add_argument("--threads", type=int, help="CPU threads for torch and IREE's local-task (default: all cores)")
    p.add_argument("--out", required=True, help="folder for each runner's row and latents")
    p.add_argument("--report", action="store_true", help="print the table of the rows in --out")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.report:
        report(out)
        return
    if not a.runner or not a.irpa or (a.runner != "torch" and not a.vmfb):
        p.error("a runner needs --irpa, and --vmfb unless it is torch")
    if a.threads:
        import torch

        from punet.runtime import set_threads

        torch.set_num_threads(a.threads)
        set_threads(a.threads)
    row = run(a)
    (out / f"{a.runner}.json").write_text(json.dumps(row, indent=2))
    print(f"{row['runner']}: median {row['median_step_ms']:.1f} ms/step, peak RSS {row['peak_rss_gib']:.1f} GiB", flush=True)


if __name__ == "__main__":
    main()
