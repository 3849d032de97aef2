"""Write a full-size random-weight checkpoint (config.json + safetensors, save_pretrained layout).

    python bench/make_checkpoint.py ../shared/configs/sdxl-base-1.0-unet.json artifacts/sdxl-f16 --dtype float16

Nothing is downloaded: the weights are punet's deterministic random weights,
a fair stand-in for timing, memory and numerics on the real architecture.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from punet.builtin import write_checkpoint


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="config.json of the architecture")
    p.add_argument("output", help="output folder")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    t0 = time.perf_counter()
    config = json.loads(open(a.config).read())
    write_checkpoint(a.output, config, seed=a.seed, dtype=getattr(torch, a.dtype))
    print(f"wrote {a.output} in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
