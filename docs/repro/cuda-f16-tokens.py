"""Which op of the SDXL UNet IREE 3.13's CUDA code gets wrong in float16 at 64 text tokens.

    python docs/repro/cuda-f16-tokens.py prepare DIR   # CPU machine with iree-compile + iree-turbine
    python docs/repro/cuda-f16-tokens.py run DIR --json R.json   # NVIDIA machine with iree-base-runtime (numpy only)
    python docs/repro/cuda-f16-tokens.py report R.json ...        # markdown table: case x flag variant

`prepare` builds builtin:tiny-sdxl in float16 with punet's random weights and attention decomposed (as
`punet compile --target sm_80` derives it), runs one batch-2 step in torch with 64 and with 77 text
tokens, and captures the inputs of the whole UNet and of submodules down to single matmuls. Each case
is exported on its own with iree-turbine (weights external, one .irpa per case), compiled with punet's tuned `sm_80` flags
and with variants of them, and saved beside its inputs and two references computed here: the same
float16 weights and inputs in float32, and torch float16 on the CPU (the float16 noise floor).

`run` loads every module on the `cuda` driver and prints, per case and variant, the relative L2 error
of IREE's output against the float32 reference next to torch float16's. A case is wrong when IREE's
error is far above the noise floor (GPU runs 4-7 in docs/benchmarks.md: 0.3-1.1 for the whole model).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

TOKENS = (64, 77)

# name -> (flags removed from the tuned set, flags added)
VARIANTS = {
    "tuned": ((), ()),
    "plain": (("TUNED",), ()),
    "no-hfuse": (("--iree-dispatch-creation-enable-fuse-horizontal-contractions=true",), ()),
    "no-pad": (("PREPROCESS",), ("--iree-preprocessing-pass-pipeline=builtin.module(iree-preprocessing-transpose-convolution-pipeline)",)),
    "no-aggr": (("--iree-dispatch-creation-enable-aggressive-fusion=true",), ()),
    "no-generalize": (("--iree-opt-generalize-matmul=true",), ()),
    "no-transposes": (("--iree-opt-aggressively-propagate-transposes=true",), ()),
    "no-vd": ((), ("--iree-codegen-llvmgpu-use-vector-distribution=false",)),
    "no-smem-reuse": ((), ("--iree-llvmgpu-enable-shared-memory-reuse=false",)),
    "tf-matmul": ((), ("--iree-codegen-llvmgpu-use-tile-and-fuse-matmul=true",)),
    "no-hfuse-no-vd": (("--iree-dispatch-creation-enable-fuse-horizontal-contractions=true",),
                       ("--iree-codegen-llvmgpu-use-vector-distribution=false",)),
    # Round 4 found each of these two flags alone makes the plain set wrong on the transformer's exit;
    # without both is punet's CUDA set today.
    "no-generalize-no-transposes": (("--iree-opt-generalize-matmul=true", "--iree-opt-aggressively-propagate-transposes=true"), ()),
    "no-hfuse-no-transposes": (("--iree-dispatch-creation-enable-fuse-horizontal-contractions=true",
                                "--iree-opt-aggressively-propagate-transposes=true"), ()),
}


def prepare(out: Path, only: set[str] | None, target: str, variants: list[str], each_flag: bool, keep_mlir: bool) -> None:
    import copy

    import torch
    from iree.turbine import aot
    from torch import nn

    from punet.builtin import config_dict, random_state_dict
    from punet.compile import iree_compile
    from punet.compile.targets import CUDA_DROPPED, compile_flags, get_target
    from punet.config import UNetConfig
    from punet.model import UNet2DConditionModel

    out.mkdir(parents=True, exist_ok=True)
    config = UNetConfig.from_dict(config_dict("tiny-sdxl"))
    model = UNet2DConditionModel(config).eval()
    model.load_state_dict(random_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()}))
    model = model.half().set_decomposed_attention(True)
    # "tuned" below is punet's CUDA set as it was when this was measured (runs 9-13 of docs/benchmarks.md):
    # today's set plus the two flags it now leaves out (CUDA_DROPPED); "no-generalize-no-transposes" is today's set.
    current = compile_flags(get_target(target), tuned=True)
    dropped = list(CUDA_DROPPED) if get_target(target).backend == "cuda" else []
    tuned = current + [f for f in dropped if f not in current]
    plain = compile_flags(get_target(target), tuned=False)
    variant_flags = {}
    for variant in variants:
        drop, add = VARIANTS[variant]
        variant_flags[variant] = [
            f for f in tuned
            if f not in drop
            and not ("PREPROCESS" in drop and f.startswith("--iree-preprocessing-pass-pipeline"))
            and not ("TUNED" in drop and f not in plain)
        ] + list(add)
    if each_flag:  # every flag of the tuned set alone on top of the plain set, and the tuned set without it
        for f in tuned:
            if f not in plain:
                short = f.removeprefix("--iree-").split("=")[0]
                variant_flags[f"plus-{short}"] = plain + [f]
                variant_flags[f"minus-{short}"] = [g for g in tuned if g != f]

    class Fn(nn.Module):  # a piece of a module: `fn(mods, *args)` with the modules' weights as parameters
        def __init__(self, fn, **mods):
            super().__init__()
            self.mods = nn.ModuleDict(mods)
            self.fn = fn

        def forward(self, *args):
            return self.fn(self.mods, *args)

    def split(lin, x, heads):  # a projection and its head split, as layers.Attention writes it
        return lin(x).view(x.shape[0], -1, heads, lin.out_features // heads).transpose(1, 2)

    def projections(linears):  # the given Linears applied to one input (horizontal fusion's pattern)
        return Fn(lambda m, c: tuple(lin(c) for lin in m["l"]), l=nn.ModuleList(linears))

    def scores(q, k):  # punet's decomposed attention (layers.Attention, decomposed=True), its first matmul
        return torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)

    whole = Fn(lambda m, sample, timestep, context, text_embeds, time_ids: m["u"](
        sample=sample, timestep=timestep, encoder_hidden_states=context, text_embeds=text_embeds, time_ids=time_ids),
        u=model)
    blk = model.down_blocks[1].attentions[0].transformer_blocks[0]
    attn2s = [m for name, m in model.named_modules() if name.endswith("attn2")]
    targets = {
        "whole": whole,
        "down2": model.down_blocks[2],
        "mid": model.mid_block,
        "transformer2d": model.down_blocks[1].attentions[0],
        "block": blk,
        "attn1": blk.attn1,
        "attn2": blk.attn2,
        "ff": blk.ff,
    }
    captured: dict[str, tuple] = {}

    def hook(name):
        def f(module, args, kwargs):
            captured.setdefault(name, (tuple(a.detach().clone() if torch.is_tensor(a) else a for a in args), kwargs))
        return f

    for tokens in TOKENS:
        g = torch.Generator().manual_seed(tokens)
        x = (torch.randn(2, 4, 32, 32, generator=g).half(), torch.tensor([999.0, 999.0]).half(),
             torch.randn(2, tokens, config.cross_attention_dim, generator=g).half(),
             torch.randn(2, 64, generator=g).half(),
             torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]] * 2).half())
        captured.clear()
        handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in targets.items()]
        with torch.no_grad():
            whole(*x)
        for h in handles:
            h.remove()
        cases = {n: (targets[n], captured[n][0]) for n in targets}
        ctx = x[2]
        cases["kv"] = (projections([blk.attn2.to_k, blk.attn2.to_v]), (ctx,))
        cases["kv-all"] = (projections([lin for a in attn2s for lin in (a.to_k, a.to_v)]), (ctx,))
        cases["k"] = (projections([blk.attn2.to_k]), (ctx,))
        xb = captured["attn2"][0][0]
        with torch.no_grad():
            b, heads, hd = xb.shape[0], blk.attn2.heads, blk.attn2.head_dim
            q = blk.attn2.to_q(xb).view(b, -1, heads, hd).transpose(1, 2).contiguous()
            k = blk.attn2.to_k(ctx).view(b, -1, heads, hd).transpose(1, 2).contiguous()
            v = blk.attn2.to_v(ctx).view(b, -1, heads, hd).transpose(1, 2).contiguous()
            probs = torch.softmax((q @ k.transpose(-1, -2)).float() * hd**-0.5, -1).half()
        cases["core"] = (Fn(lambda m, q, k, v: torch.matmul(torch.softmax(scores(q, k).float(), -1).to(v.dtype), v)),
                         (q, k, v))
        cases["qk"] = (Fn(lambda m, q, k, v: scores(q, k)), (q, k, v))
        cases["pv"] = (Fn(lambda m, p, v: torch.matmul(p, v)), (probs, v))
        t2d = model.down_blocks[1].attentions[0]
        xt = captured["transformer2d"][0][0]
        with torch.no_grad():
            tokens_in = t2d.enter(xt)
            tokens_out = blk(tokens_in, ctx)
        cases["t2d-norm"] = (Fn(lambda m, x: m["t"].norm(x), t=t2d), (xt,))
        cases["t2d-enter"] = (Fn(lambda m, x: m["t"].enter(x), t=t2d), (xt,))
        cases["t2d-leave"] = (Fn(lambda m, h, x: m["t"].leave(h, x), t=t2d), (tokens_out, xt))
        cases["t2d-no-blocks"] = (Fn(lambda m, x: m["t"].leave(m["t"].enter(x), x), t=t2d), (xt,))
        cases["t2d-enter-block"] = (Fn(lambda m, x, c: m["b"](m["t"].enter(x), c), t=t2d, b=blk), (xt, ctx))
        cases["t2d-block-leave"] = (Fn(lambda m, h, x, c: m["t"].leave(m["b"](h, c), x), t=t2d, b=blk), (tokens_in, xt, ctx))
        # The transformer's exit alone, in smaller and smaller forms and other shapes (no text involved).
        for label, (c, hw, dtype) in {"": (64, 16, torch.float16), "-c640-hw32": (640, 32, torch.float16),
                                      "-f32": (64, 16, torch.float32)}.items():
            g = torch.Generator().manual_seed(c * hw)
            lin = nn.Linear(c, c).to(dtype)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(c, c, generator=g) * c**-0.5)
                lin.bias.copy_(torch.randn(c, generator=g) * 0.1)
            h = torch.randn(2, hw * hw, c, generator=g).to(dtype)
            r = torch.randn(2, c, hw, hw, generator=g).to(dtype)

            def nchw(t, r):
                return t.reshape(r.shape[0], r.shape[2], r.shape[3], r.shape[1]).permute(0, 3, 1, 2)

            cases[f"leave{label}"] = (Fn(lambda m, t, r: nchw(m["l"](t), r) + r, l=lin), (h, r))
            if label == "":
                cases["leave-no-add"] = (Fn(lambda m, t, r: nchw(m["l"](t), r), l=lin), (h, r))
                cases["leave-no-linear"] = (Fn(lambda m, t, r: nchw(t, r) + r), (h, r))
                rt = r.flatten(2).transpose(1, 2).contiguous()  # the residual in token layout
                cases["leave-no-permute"] = (Fn(lambda m, t, rt: m["l"](t) + rt, l=lin), (h, rt))
                cases["leave-no-bias"] = (Fn(lambda m, t, r: nchw(t @ m["l"].weight.T, r) + r, l=lin), (h, r))
                cases["leave-args"] = (Fn(lambda m, t, r, w, b: nchw(t @ w.T + b, r) + r), (h, r, lin.weight.detach(), lin.bias.detach()))
        heads = blk.attn1.heads
        xa = captured["attn1"][0][0]
        cases["q-split"] = (Fn(lambda m, x: split(m["a"].to_q, x, heads), a=blk.attn1), (xa,))
        cases["qk-proj"] = (Fn(lambda m, x: split(m["a"].to_q, x, heads) @ split(m["a"].to_k, x, heads).transpose(-1, -2),
                               a=blk.attn1), (xa,))
        for name, (module, args) in cases.items():
            if only and name not in only:
                continue
            stem = f"{name}-t{tokens}"
            with torch.no_grad():
                ref16 = module(*args)
                ref32 = copy.deepcopy(module).float()(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args])
            flat16, flat32 = _flatten(ref16), _flatten(ref32)
            np.savez(out / f"{stem}.npz", **{f"in{i}": a.numpy() for i, a in enumerate(args)},
                     **{f"ref16_{i}": t.float().numpy() for i, t in enumerate(flat16)},
                     **{f"ref32_{i}": t.numpy() for i, t in enumerate(flat32)})
            mlir = out / f"{stem}.mlir"
            t0 = time.perf_counter()
            # Weights are external (scope "model"), as in punet's own export: one archive per case.
            aot.externalize_module_parameters(module, external_scope="model")
            if not (out / f"{name}.irpa").exists():
                aot.save_module_parameters(out / f"{name}.irpa", module)
            aot.export(module, args=args, strict_export=False).save_mlir(str(mlir))
            for variant, flags in variant_flags.items():
                vmfb = out / f"{stem}.{variant}.vmfb"
                proc = subprocess.run([iree_compile(), str(mlir), *flags, "-o", str(vmfb)], capture_output=True, text=True)
                status = "ok" if proc.returncode == 0 else f"compile failed: {proc.stderr.strip().splitlines()[0][:200] if proc.stderr.strip() else proc.returncode}"
                print(f"{stem:20} {variant:24} {status}", flush=True)
                (out / f"{stem}.{variant}.flags.txt").write_text("\n".join(flags) + "\n")
            if not keep_mlir:
                mlir.unlink()
            print(f"  {stem}: {time.perf_counter() - t0:.0f} s", flush=True)


def _flatten(x):
    import torch

    if torch.is_tensor(x):
        return [x]
    return [t for item in x for t in _flatten(item)]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run(out: Path, json_path: Path | None, driver: str) -> None:
    import iree.runtime as rt

    rows = []
    config = rt.Config(driver)
    print(f"{'case':20} {'variant':9} {'IREE vs fp32':>13} {'torch fp16 vs fp32':>19}  verdict")
    for npz in sorted(out.glob("*.npz")):
        data = np.load(npz)
        ins = [data[f"in{i}"] for i in range(sum(k.startswith("in") for k in data.files))]
        n_out = sum(k.startswith("ref32_") for k in data.files)
        index = rt.ParameterIndex()
        irpa = out / f"{npz.stem.rsplit('-t', 1)[0]}.irpa"
        if irpa.exists():
            index.load(str(irpa))
        for vmfb in sorted(out.glob(f"{npz.stem}.*.vmfb")):
            variant = vmfb.name[len(npz.stem) + 1:-len(".vmfb")]
            try:
                params = rt.create_io_parameters_module(config.vm_instance, index.create_provider(scope="model"))
                modules = rt.load_vm_modules(params, rt.VmModule.mmap(config.vm_instance, str(vmfb)), config=config)
                res = modules[-1].main(*ins)
                res = res if isinstance(res, (list, tuple)) else [res]
                got = [np.asarray(r.to_host()) for r in res]
                err = max(rel_l2(got[i], data[f"ref32_{i}"]) for i in range(n_out))
            except Exception as e:  # one failing module is reported, the others still run
                rows.append({"case": npz.stem, "variant": variant, "error": f"{type(e).__name__}: {e}"[:500]})
                print(f"{npz.stem:20} {variant:9} error: {type(e).__name__}: {str(e)[:150]}", flush=True)
                continue
            finally:
                params = modules = None
            noise = max(rel_l2(data[f"ref16_{i}"], data[f"ref32_{i}"]) for i in range(n_out))
            verdict = "WRONG" if err > max(10 * noise, 1e-2) else "ok"
            rows.append({"case": npz.stem, "variant": variant, "rel_l2_iree": err, "rel_l2_torch_fp16": noise, "verdict": verdict})
            print(f"{npz.stem:20} {variant:9} {err:13.2e} {noise:19.2e}  {verdict}", flush=True)
            if json_path:  # after every row: a run cut short keeps what it measured
                json_path.write_text(json.dumps({"driver": driver, "rows": rows}, indent=2))


def report(paths: list[Path]) -> None:
    """A markdown table of `run`'s rows: case x flag variant (transposed when there are more variants)."""
    rows = [r for path in paths for r in json.loads(path.read_text())["rows"]]
    seen = list(dict.fromkeys(r["variant"] for r in rows))
    variants = [v for v in VARIANTS if v in seen] + sorted(v for v in seen if v not in VARIANTS)
    cases = list(dict.fromkeys(r["case"] for r in rows))
    cell = {(r["case"], r["variant"]): r for r in rows}

    def text(case: str, variant: str) -> str:
        r = cell.get((case, variant))
        if r is None:
            return ""
        if "error" in r:
            return "error"
        value = f"{r['rel_l2_iree']:.1e}"
        return f"**{value}**" if r["verdict"] == "WRONG" else value

    noise = {c: next(r["rel_l2_torch_fp16"] for r in rows if r["case"] == c and "rel_l2_torch_fp16" in r) for c in cases}
    if len(variants) <= len(cases):
        print("| case | torch fp16 | " + " | ".join(variants) + " |")
        print("| --- | ---: | " + " | ".join("---:" for _ in variants) + " |")
        for case in cases:
            print(f"| {case} | {noise[case]:.1e} | " + " | ".join(text(case, v) for v in variants) + " |")
    else:
        print("| flags | " + " | ".join(cases) + " |")
        print("| --- | " + " | ".join("---:" for _ in cases) + " |")
        print("| torch fp16 | " + " | ".join(f"{noise[c]:.1e}" for c in cases) + " |")
        for v in variants:
            print(f"| {v} | " + " | ".join(text(c, v) for c in cases) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["prepare", "run", "report"])
    p.add_argument("dir", type=Path, nargs="+", help="prepare/run: the folder of modules; report: run's JSON files")
    p.add_argument("--only", nargs="*", help="prepare: only these cases")
    p.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS), help="prepare: flag variants")
    p.add_argument("--each-flag", action="store_true", help="prepare: also each tuned flag alone on the plain set, and the tuned set without it")
    p.add_argument("--keep-mlir", action="store_true", help="prepare: keep each case's exported .mlir")
    p.add_argument("--json", type=Path, help="run: write the rows here")
    p.add_argument("--driver", default="cuda", help="run: the IREE driver (local-task for modules of --target cpu)")
    p.add_argument("--target", default="sm_80", help="prepare: the punet target whose tuned flags are the base")
    a = p.parse_args()
    if a.mode == "report":
        report(a.dir)
    elif a.mode == "prepare":
        prepare(a.dir[0], set(a.only) if a.only else None, a.target, a.variants, a.each_flag, a.keep_mlir)
    else:
        run(a.dir[0], a.json, a.driver)


if __name__ == "__main__":
    sys.exit(main())
