"""Opt-in: the full-size SDXL UNet (random weights) through every stage on CPU.

    python -m pytest -m slow tests/test_full_size.py      # ~10 min and ~12 GB of RAM on 2 cores

Set PUNET_SDXL_CHECKPOINT to an existing checkpoint folder to skip generating one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from punet.builtin import write_checkpoint
from punet.compile import compile_vmfb
from punet.eager import call_model
from punet.export import export_mlir
from punet.runtime import Session
from punet.signature import Signature, make_inputs
from punet.weights import import_checkpoint, load_model

from .conftest import CONFIG_DIR, rel_l2

pytestmark = pytest.mark.slow


def test_full_sdxl_fp32_export_compile_run(tmp_path):
    import json

    import torch

    ckpt = os.environ.get("PUNET_SDXL_CHECKPOINT")
    if not ckpt:
        ckpt = tmp_path / "ckpt"
        write_checkpoint(ckpt, json.loads((CONFIG_DIR / "sdxl-base-1.0-unet.json").read_text()), dtype=torch.float16)
    irpa = tmp_path / "unet_f32.irpa"
    meta = import_checkpoint(str(ckpt), irpa, dtype="float32")
    assert meta["num_parameters"] == 2_567_463_684
    sig = Signature(1, 256, 256)
    session = Session.load(compile_vmfb(export_mlir(irpa, sig=sig).mlir, "cpu").vmfb, irpa)
    x = make_inputs(session.config, sig, 0)
    got = session(x)
    del session
    model, _ = load_model(Path(irpa))
    err = rel_l2(got, call_model(model, x))
    assert err <= 1e-4, f"full-size SDXL fp32: relative L2 {err:.2e}"
