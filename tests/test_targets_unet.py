"""A small UNet of the SDXL architecture compiles for every target in the table (tuned flags).

tests/test_targets.py checks every flag set on a toy block; this one compiles the real model
(GroupNorm in fp32, text_time embedding, cross-attention, up/down sampling) in the dtype each
target is deployed in: fp16 for GPUs (fp32 for generic Vulkan), fp32 for CPUs, attention
decomposed where the target needs it.
"""

from __future__ import annotations

import json

import pytest

from punet.artifacts import build_info_path
from punet.builtin import write_checkpoint
from punet.compile import TARGETS, compile_vmfb
from punet.compile.targets import compile_flags
from punet.export import export_mlir
from punet.signature import Signature
from punet.weights import import_checkpoint

from .test_targets import FP32_ONLY
from .vmfb_check import check_vmfb

# Two levels, one layer each: every op kind of SDXL's UNet at the lowest compile cost.
MICRO_SDXL = {
    "_class_name": "UNet2DConditionModel",
    "addition_embed_type": "text_time",
    "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "attention_head_dim": [1, 2],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 32 + 6 * 8,
}


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro")
    write_checkpoint(root / "ckpt", MICRO_SDXL)
    cache = {}

    def mlir(dtype: str, decompose: bool):
        if (dtype, decompose) not in cache:
            irpa = root / f"u_{dtype}.irpa"
            if not irpa.exists():
                import_checkpoint(str(root / "ckpt"), irpa, dtype=dtype)
            cache[dtype, decompose] = export_mlir(irpa, sig=Signature(1, 64, 64, dtype), decompose_attention=decompose).mlir
        return cache[dtype, decompose]

    return mlir


@pytest.mark.parametrize("name", list(TARGETS))
def test_unet_compiles_for_target(name, micro):
    t = TARGETS[name]
    dtype = "float32" if t.backend == "llvm-cpu" or name in FP32_ONLY else "float16"
    res = compile_vmfb(micro(dtype, t.decompose_attention), name)
    check_vmfb(res.vmfb, t, "main", 5)  # sample, timestep, encoder_hidden_states, text_embeds, time_ids
    build = json.loads(build_info_path(res.vmfb).read_text())
    assert build["target"] == name and build["flags"] == compile_flags(t, tuned=True)
    assert build["entry"] == "main" and [i["name"] for i in build["inputs"]][-1] == "time_ids"
