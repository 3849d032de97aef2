# Copyright 2026 the punet authors. Apache-2.0.
"""Quantized Linear and Conv2d, swapped into the float model by `quantize_model`.

The integer part is real integer arithmetic: int8 x int8 products summed in
int32 by `torch._int_mm`, in eager mode (exact: the largest SDXL sum,
11520 x 128 x 128, is far below 2^31) and in the exported MLIR, where it
becomes a `linalg.matmul` on i8 operands with an i32 result (IREE's int8
microkernels). Convolutions are written as im2col + that matmul. Only the
scaling that follows is float: in float32 (float64 when the model runs in
float64, which makes the whole quantized model exact up to its float layers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model.layers import Attention, stats_dtype
from .scheme import FP8_DTYPES, INT8_MAX, INT8_MIN, LayerPlan


class _QuantBase(nn.Module):
    """Buffers shared by both kinds; names are the archive's keys (see scheme.py)."""

    def __init__(self, layer: LayerPlan, bias: bool, asymmetric: bool, device=None):
        super().__init__()
        self.in_features = layer.in_features
        self.out_features = layer.out_features
        self.register_buffer("weight", torch.empty(layer.weight_shape, dtype=torch.int8, device=device))
        f32 = {"dtype": torch.float32, "device": device}
        self.register_buffer("bias", torch.empty(layer.out_features, **f32) if bias else None)
        self.register_buffer("weight_scale", torch.empty(layer.out_features, **f32))
        self.register_buffer("input_scale", torch.empty((), **f32))
        self.register_buffer("smoothquant_mul", torch.empty(layer.in_features, **f32))
        zp = torch.empty(layer.out_features, dtype=torch.int8, device=device) if asymmetric else None
        self.register_buffer("weight_zp", zp)

    def quantize_input(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        """int8 codes of x * smoothquant_mul / input_scale (round half to even, saturated)."""
        dt = stats_dtype(x)
        shape = [1] * x.dim()
        shape[channel_dim] = self.in_features
        x = x.to(dt) * self.smoothquant_mul.to(dt).view(shape)
        return torch.clamp(torch.round(x / self.input_scale.to(dt)), INT8_MIN, INT8_MAX).to(torch.int8)

    def int_matmul(self, q: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        """(M, K) int8 codes -> (M, N) dequantized output with bias, in `out_dtype`."""
        w = self.weight.reshape(self.out_features, -1)  # (N, K)
        acc = torch._int_mm(q, w.t())  # (M, N) int32, exact
        if self.weight_zp is not None:
            acc = acc - q.to(torch.int32).sum(-1, keepdim=True) * self.weight_zp.to(torch.int32)
        dt = torch.promote_types(out_dtype, torch.float32)  # as stats_dtype: float32, float64 stays
        y = acc.to(dt) * (self.input_scale.to(dt) * self.weight_scale.to(dt))
        if self.bias is not None:
            y = y + self.bias.to(dt)
        return y.to(out_dtype)


class QuantLinear(_QuantBase):
    """nn.Linear with int8 weights and int8 input codes."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        q = self.quantize_input(x, x.dim() - 1).reshape(-1, self.in_features)  # (M, K)
        return self.int_matmul(q, x.dtype).reshape(*lead, self.out_features)


class QuantConv2d(_QuantBase):
    """nn.Conv2d (square kernel, no groups, no dilation) as im2col + int8 matmul."""

    def __init__(self, layer: LayerPlan, bias: bool, asymmetric: bool, padding: int, device=None):
        super().__init__(layer, bias, asymmetric, device)
        self.kernel = layer.kernel
        self.stride = layer.stride
        self.padding = padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        q = self.quantize_input(x, 1)  # (B, C, H, W) int8; zero padding is code 0
        k, s, p = self.kernel, self.stride, self.padding
        if p:
            q = F.pad(q, (p, p, p, p))
        h = (q.shape[2] - k) // s + 1
        w = (q.shape[3] - k) // s + 1
        if k == 1:
            cols = q[:, :, ::s, ::s].permute(0, 2, 3, 1)  # (B, H', W', C)
        else:
            taps = [q[:, :, i : i + s * (h - 1) + 1 : s, j : j + s * (w - 1) + 1 : s] for i in range(k) for j in range(k)]
            cols = torch.stack(taps, dim=2).permute(0, 3, 4, 1, 2)  # (B, H', W', C, k*k): weight's (c, i, j) order
        y = self.int_matmul(cols.reshape(b * h * w, -1), x.dtype)  # (B*H'*W', N)
        return y.reshape(b, h, w, self.out_features).permute(0, 3, 1, 2)  # (B, N, H', W')


class Fp8Attention(Attention):
    """Attention whose Q, K, V and softmax output are quantized to fp8 before the two matmuls.

    Each is divided by its per-tensor scale, saturated to the fp8 range and rounded to fp8; the
    matmuls multiply fp8 values (exact in float64, and in the float32 of IREE's kernels up to the
    sum's rounding), and the scales come back after each matmul. The projections around it are
    the int8 layers.
    """

    def __init__(self, old: Attention, fp8_dtype: str):
        nn.Module.__init__(self)  # not Attention.__init__: the projections are old's (quantized) ones
        self.heads, self.head_dim, self.decomposed = old.heads, old.head_dim, True
        self.to_q, self.to_k, self.to_v, self.to_out = old.to_q, old.to_k, old.to_v, old.to_out
        self.fp8 = FP8_DTYPES[fp8_dtype]
        self.fp8_max = float(torch.finfo(self.fp8).max)
        device = old.to_out[0].weight.device
        for name in ("q_scale", "k_scale", "v_scale", "softmax_scale"):
            self.register_buffer(name, torch.empty((), dtype=torch.float32, device=device))

    def _to_fp8(self, x: torch.Tensor, scale: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
        return torch.clamp(x.to(dt) / scale.to(dt), -self.fp8_max, self.fp8_max).to(self.fp8)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]
        dt = stats_dtype(x)
        q = self.to_q(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)
        k = self.to_k(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, M, head_dim)
        v = self.to_v(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, M, head_dim)
        q8, k8, v8 = self._to_fp8(q, self.q_scale, dt), self._to_fp8(k, self.k_scale, dt), self._to_fp8(v, self.v_scale, dt)
        qk_scale = self.q_scale.to(dt) * self.k_scale.to(dt) * (self.head_dim**-0.5)
        scores = torch.matmul(q8.to(dt), k8.to(dt).transpose(-1, -2)) * qk_scale  # (B, heads, N, M)
        probs = torch.softmax(scores, dim=-1)
        p8 = self._to_fp8(probs, self.softmax_scale, dt)
        out = torch.matmul(p8.to(dt), v8.to(dt)) * (self.softmax_scale.to(dt) * self.v_scale.to(dt))  # (B, heads, N, head_dim)
        out = out.to(x.dtype).transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)  # (B, N, inner)
        return self.to_out[0](out)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, nn.ModuleList):
        parent[int(leaf)] = new
    else:
        setattr(parent, leaf, new)


def quantize_model(
    model: nn.Module, layers: list[LayerPlan], asymmetric: frozenset[str] = frozenset(), fp8_dtype: str = ""
) -> nn.Module:
    """Swap every planned Linear/Conv2d of `model` for its quantized twin (empty buffers, same device).

    With `fp8_dtype`, every attention also becomes an Fp8Attention around its quantized projections.
    """
    for layer in layers:
        old = model.get_submodule(layer.name)
        device = old.weight.device
        has_bias = old.bias is not None
        zp = layer.name in asymmetric
        if layer.kind == "linear":
            new = QuantLinear(layer, has_bias, zp, device)
        else:
            new = QuantConv2d(layer, has_bias, zp, old.padding[0], device)
        _replace(model, layer.name, new)
    if fp8_dtype:
        for name, m in list(model.named_modules()):
            if isinstance(m, Attention) and not isinstance(m, Fp8Attention):
                _replace(model, name, Fp8Attention(m, fp8_dtype))
    return model
