"""Quantized punet: int8 layers (and fp8 attention) swapped into the float model from an archive's scheme.

`punet.model` stays the float model; this package adds the quantized
modules (`layers`), the plan of what is quantized (`scheme`), calibration
(`calibrate`: `punet quantize`) and the Brevitas interchange format
(`brevitas`: `punet import` of a Brevitas folder, `punet quantize --format brevitas`).
Imports need torch alone.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import UNetConfig
from .layers import QuantConv2d, QuantLinear, quantize_model
from .scheme import SCHEMES, LayerPlan, Scheme, get_scheme, plan

__all__ = [
    "SCHEMES",
    "LayerPlan",
    "QuantConv2d",
    "QuantLinear",
    "Scheme",
    "cast_state",
    "get_scheme",
    "plan",
    "quantize_from_metadata",
    "quantize_model",
]

# Quantizer tensors: float32 whatever the model's dtype (float64 when the model runs in float64).
SCALE_SUFFIXES = (".weight_scale", ".input_scale", ".smoothquant_mul", ".q_scale", ".k_scale", ".v_scale", ".softmax_scale")


def quantize_from_metadata(model: torch.nn.Module, config: UNetConfig, quantization: dict[str, Any]) -> None:
    """Swap in the quantized layers an archive's `quantization` metadata describes.

    The metadata names the scheme and the layers with asymmetric weights
    (`asymmetric`: they carry a `weight_zp`).
    """
    scheme = get_scheme(quantization["scheme"])
    fp8 = quantization.get("fp8_dtype", "") if scheme.fp8_attention else ""
    quantize_model(model, plan(config), frozenset(quantization.get("asymmetric", ())), fp8)


def cast_state(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Float tensors to `dtype`; int8 tensors as they are; scales float32 (float64 with a float64 model)."""
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    out = {}
    for k, v in state.items():
        if not v.is_floating_point():
            out[k] = v
        elif k.endswith(SCALE_SUFFIXES):
            out[k] = v.to(scale_dtype)
        else:
            out[k] = v.to(dtype)
    return out
