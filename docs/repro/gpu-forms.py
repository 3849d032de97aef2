"""Model-form variants of the SDXL CFG step for the CUDA target, timed side by side by bench/gpu.py.

    python docs/repro/gpu-forms.py artifacts/gpu   # after `bash bench/gpu.sh --prepare artifacts/gpu`
    python docs/repro/gpu-forms.py artifacts/gpu --tokens 64 --variants base cross-only fused --vmfb-dir artifacts/gpu/vmfb64

Each variant exports the prepared fp16 1024x1024 CFG step (artifacts/gpu/unet_f16.irpa) with one change
to punet's model forms, compiles it with punet's tuned `sm_80` set (which derives the decomposed
attention in this process, so the change reaches it), and writes the .vmfb and its build record,
labelled, into DIR/vmfb beside the prepared modules (the same signature, so one `bench/gpu.py` call
times them all against the same torch reference):

- base: punet's forms as they are: attention decomposed, all (row, head) pairs in one batched matmul
  (for another token count than the prepared module's 77);
- sliced: attention decomposed by slices of (row, head) pairs, the CPU's form, which every target
  compiled from 2026-11-27 until run 15 of docs/benchmarks.md (run 15 built the unsliced form by
  raising the slice budget; the form is the same as base today);
- cross-only: only cross-attention decomposed, self-attention left to IREE's fused op
  (191 vs 203 ms on an H100 in run 2 of docs/benchmarks.md);
- fused: every attention as IREE's fused op (465 vs 203 ms at 77 tokens in run 1, when the 64-token
  modules were still miscompiled);
- conv-shortcut: the ResNet 1x1 shortcuts as nn.Conv2d again (punet's PointwiseConv2d matmul form
  since 2026-11-27 was chosen on the CPU); run 15 timed it with the slices.

The changes are patches of this process's punet modules: the model code on disk is not touched.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch.nn.functional as F
from torch import nn

import punet.compile.targets as targets
import punet.model.layers as layers
from punet.cli import main as punet

NAME = "unet_b1_1024x1024_f16_cfg"
SHAPE = ["--cfg", "--batch", "1", "--height", "1024", "--width", "1024"]


def base() -> str:
    return "attention decomposed"


def sliced() -> str:
    targets.Target.slice_attention = property(lambda self: True)
    return "attention decomposed in (row, head) slices"


def _attention(fused_if) -> None:
    decomposed = layers._softmax_attention

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v) if fused_if(q, k) else decomposed(q, k, v)

    layers._softmax_attention = attention


def cross_only() -> str:
    _attention(lambda q, k: q.shape[-2] == k.shape[-2])  # self-attention: IREE's fused attention op
    return "cross-attention decomposed, self-attention fused"


def fused() -> str:
    _attention(lambda q, k: True)
    return "fused attention"


def conv_shortcut() -> str:
    layers.PointwiseConv2d.forward = nn.Conv2d.forward
    return "attention decomposed, 1x1 shortcuts as nn.Conv2d"


VARIANTS = {"base": base, "sliced": sliced, "cross-only": cross_only, "fused": fused, "conv-shortcut": conv_shortcut}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", type=Path, help="the folder `bench/gpu.sh --prepare` wrote")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["sliced", "cross-only", "conv-shortcut"],
                   help="each built in its own process (default: sliced cross-only conv-shortcut)")
    p.add_argument("--variant", choices=list(VARIANTS), help=argparse.SUPPRESS)  # one, in this process
    p.add_argument("--target", default="sm_80")
    p.add_argument("--tokens", type=int, default=77)
    p.add_argument("--vmfb-dir", type=Path, help="where the .vmfb files go (default: DIR/vmfb)")
    a = p.parse_args()
    vmfb_dir = a.vmfb_dir or a.dir / "vmfb"
    if a.variant is None:
        import subprocess

        for v in a.variants:
            subprocess.run([sys.executable, __file__, str(a.dir), "--variant", v, "--target", a.target,
                            "--tokens", str(a.tokens), "--vmfb-dir", str(vmfb_dir)], check=True)
        return
    label = VARIANTS[a.variant]()
    name = NAME if a.tokens == 77 else f"{NAME}_t{a.tokens}"
    mlir = a.dir / f"{name}.{a.variant}.mlir"
    vmfb_dir.mkdir(parents=True, exist_ok=True)
    vmfb = vmfb_dir / f"{name}.{a.variant}.{a.target}.vmfb"
    # Exported fused: `punet compile` derives the target's decomposed form here, with the patches in place.
    rc = punet(["export", str(a.dir / "unet_f16.irpa"), *SHAPE, "--tokens", str(a.tokens), "--force", "-o", str(mlir)])
    rc = rc or punet(["compile", str(mlir), "--target", a.target, "--force", "-o", str(vmfb)])
    if rc:
        sys.exit(rc)
    record = Path(f"{vmfb}.json")
    info = json.loads(record.read_text())
    info["label"] = f"{a.target} tuned, {label}"
    record.write_text(json.dumps(info, indent=2))
    print(f"{vmfb}: {info['label']}")


if __name__ == "__main__":
    main()
