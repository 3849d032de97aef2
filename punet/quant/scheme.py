# Copyright 2026 the punet authors. Apache-2.0.
"""What is quantized, and how: the schemes and the per-layer plan, as data.

The plan is a table built from the float model's structure (`plan(config)`),
so it can be printed, tested and diffed: every Linear and Conv2d is
quantized except those whose name contains one of `EXCLUDED` (the time and
text-time embeddings, conv_in and conv_out), which stay float with the
norms, activations and softmax.

Archive keys of a quantized layer `L` (e.g. `mid_block.resnets.0.conv1`),
written by `punet import` (Brevitas folder) and `punet quantize`:

    L.weight           int8   (out, in) or (out, in, kh, kw): diffusers' shape
    L.bias             float  (out,), unchanged (added after the scales)
    L.weight_scale     float32 (out,)   per output channel
    L.input_scale      float32 ()       per tensor (symmetric: no zero point)
    L.smoothquant_mul  float32 (in,)    the input is multiplied by it before quantizing
    L.weight_zp        int8   (out,)    only for asymmetric weights

A layer computes, with int32 accumulation:

    q = clamp(round(x * smoothquant_mul / input_scale), -128, 127)
    y = (q @ (weight - weight_zp)^T) * (input_scale * weight_scale) + bias

The fp8-attention scheme adds, per attention module `A` (`...attn1`):

    A.q_scale, A.k_scale, A.v_scale, A.softmax_scale   float32 ()

and quantizes Q, K, V and the softmax output to fp8 (x / scale, saturated)
before the two attention matmuls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import UNetConfig
from ..errors import PunetError

# A Linear or Conv2d whose name contains one of these stays float.
EXCLUDED = ("time_emb", "conv_in", "conv_out", "add_embedding")

INT8_MIN, INT8_MAX = -128, 127

# fp8 element types: AMD's MI300 (gfx942) uses the "fnuz" variant, everything else the OCP one.
FP8_DTYPES: dict[str, torch.dtype] = {
    "float8_e4m3fn": torch.float8_e4m3fn,
    "float8_e4m3fnuz": torch.float8_e4m3fnuz,
}


@dataclass(frozen=True)
class Scheme:
    name: str
    fp8_attention: bool
    description: str


SCHEMES: dict[str, Scheme] = {
    s.name: s
    for s in (
        Scheme("int8", False, "int8 weights (per channel) and activations (per tensor), SmoothQuant, int32 accumulation"),
        Scheme("int8-fp8attn", True, "int8 as above, plus Q, K, V and the softmax output in fp8 for the attention matmuls"),
    )
}


def get_scheme(name: str) -> Scheme:
    try:
        return SCHEMES[name]
    except KeyError:
        raise PunetError(f"unknown quantization scheme {name!r} (expected one of: {', '.join(SCHEMES)})") from None


@dataclass(frozen=True)
class LayerPlan:
    """One quantized layer: its module path, kind and shape, and the group that shares its input."""

    name: str
    kind: str  # "linear" | "conv"
    in_features: int
    out_features: int
    kernel: int = 1  # conv kernel size (square)
    stride: int = 1
    # Layers that read the same tensor share one input quantizer (and SmoothQuant multiplier):
    # self-attention's to_q/to_k/to_v are Brevitas' fused `attn1.to_qkv`, cross-attention's
    # to_k/to_v its `attn2.to_kv`. Every other layer is its own group.
    group: str = ""

    @property
    def weight_shape(self) -> tuple[int, ...]:
        if self.kind == "linear":
            return (self.out_features, self.in_features)
        return (self.out_features, self.in_features, self.kernel, self.kernel)


def fused_group(name: str) -> str:
    """Brevitas' fused layer name for a projection that shares its input, else `name` itself."""
    parent, _, leaf = name.rpartition(".")
    if parent.endswith("attn1") and leaf in ("to_q", "to_k", "to_v"):
        return f"{parent}.to_qkv"
    if parent.endswith("attn2") and leaf in ("to_k", "to_v"):
        return f"{parent}.to_kv"
    return name


def group_layers(layers: list[LayerPlan]) -> dict[str, list[LayerPlan]]:
    """The layers by input group (a fused projection's members together, in plan order)."""
    groups: dict[str, list[LayerPlan]] = {}
    for layer in layers:
        groups.setdefault(layer.group, []).append(layer)
    return groups


def is_quantized(name: str) -> bool:
    return not any(token in name for token in EXCLUDED)


def plan(config: UNetConfig) -> list[LayerPlan]:
    """Every quantized layer of the UNet `config` describes, in module order."""
    from ..model import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(config)
    layers = []
    for name, m in model.named_modules():
        if not is_quantized(name):
            continue
        if isinstance(m, torch.nn.Linear):
            layers.append(LayerPlan(name, "linear", m.in_features, m.out_features, group=fused_group(name)))
        elif isinstance(m, torch.nn.Conv2d):
            layers.append(
                LayerPlan(
                    name, "conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], group=fused_group(name)
                )
            )
    return layers


def attention_modules(config: UNetConfig) -> list[str]:
    """Module paths of every attention (the fp8 scheme's quantizers live there)."""
    from ..model import UNet2DConditionModel
    from ..model.layers import Attention

    with torch.device("meta"):
        model = UNet2DConditionModel(config)
    return [name for name, m in model.named_modules() if isinstance(m, Attention)]
