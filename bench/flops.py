"""FLOPs of one UNet call, counted by torch.utils.flop_counter on the meta device (no weights).

    python bench/flops.py ../shared/configs/sdxl-base-1.0-unet.json --sizes 256 512 1024
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from punet import UNetConfig, UNet2DConditionModel
from punet.signature import Signature


def count_flops(config: UNetConfig, sig: Signature) -> int:
    with torch.device("meta"):
        model = UNet2DConditionModel(config).eval()
        x = {s.name: torch.empty(s.shape, dtype=torch.float32) for s in sig.inputs(config)}
    if sig.cfg:
        from punet.model import GuidedUNet

        model = GuidedUNet(model)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(**x)
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    a = p.parse_args()
    cfg = UNetConfig.from_json(a.config)
    for size in a.sizes:
        n = count_flops(cfg, Signature(1, size, size))
        print(f"{size}x{size} batch 1: {n / 1e12:.2f} TFLOP")
        n = count_flops(cfg, Signature(1, size, size, cfg=True))
        print(f"{size}x{size} CFG (batch 1 latent, 2 UNet rows): {n / 1e12:.2f} TFLOP")


if __name__ == "__main__":
    main()
