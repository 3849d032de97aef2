# Copyright 2026 the punet authors. Apache-2.0.
# Mirrors modules of Hugging Face diffusers (Apache-2.0): the attribute names
# equal diffusers' so that state-dict keys match with no rename table.
"""Building blocks of the UNet: norms, attention, transformer, resnet, resampling."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 for fp16/bf16/fp32 activations; float64 stays float64 (the quantized model's exact reference)."""
    return torch.promote_types(x.dtype, torch.float32)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm with fp32 statistics whatever the activation dtype.

    fp16 GroupNorm compiled for llvm-cpu is badly inaccurate (relative L2 > 1
    on a single SDXL GroupNorm), so the reduction always runs in fp32 (or wider).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = stats_dtype(x)
        w = self.weight.to(dt) if self.weight is not None else None
        b = self.bias.to(dt) if self.bias is not None else None
        return F.group_norm(x.to(dt), self.num_groups, w, b, self.eps).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm with fp32 statistics whatever the activation dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = stats_dtype(x)
        w = self.weight.to(dt) if self.weight is not None else None
        b = self.bias.to(dt) if self.bias is not None else None
        return F.layer_norm(x.to(dt), self.normalized_shape, w, b, self.eps).to(x.dtype)


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """Sinusoidal embedding of `t` (shape (B,)) -> (B, dim) fp32.

    Mirrors diffusers `get_timestep_embedding` (max_period 10000, scale 1),
    including its `freq_shift` (the predecessor used 1 where SDXL uses 0).
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    if flip_sin_to_cos:
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    else:
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers `embeddings.TimestepEmbedding` (no cond projection, no post-act)."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


# Decomposed attention computes its (B, heads, N, M) scores a slice of (batch row, head) pairs at a time,
# each slice at most this many elements (4 MiB in fp32) unless one pair alone is larger. SDXL's
# self-attention at the 64x64 latent (512x512 pixels) has 10 x 1024 x 1024 scores: as one tensor (40 MiB)
# the compiled CPU step writes, normalises and re-reads it through memory; one pair (4 MiB) at a time
# stays in cache. Smaller levels (every level at 256x256) stay one slice, so their modules do not change.
SCORES_PER_SLICE = 1 << 20


def attention_slices(batch: int, heads: int, queries: int, keys: int, scores_per_slice: int | None = None) -> int:
    """How many slices `decomposed_attention` cuts the (batch row, head) pairs into (default budget:
    SCORES_PER_SLICE scores per slice)."""
    pairs = batch * heads
    return min(pairs, -(-pairs * queries * keys // (scores_per_slice or SCORES_PER_SLICE)))


def decomposed_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scores_per_slice: int | None = None
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v on (B, heads, N, d) tensors as matmul + fp32 softmax + matmul, by slices of
    the (batch row, head) pairs (`attention_slices`)."""
    b, heads, n, d = q.shape
    slices = attention_slices(b, heads, n, k.shape[2], scores_per_slice)
    if slices == 1:
        return _softmax_attention(q, k, v)
    # One flat batch of (row, head) pairs: iree-compile 3.13 fails on slices that keep two batch dimensions
    # ([2, 1, 4096, 4096] scores at 1024x1024 CFG: "operations with large vector sizes").
    parts = zip(*(t.reshape(b * heads, -1, d).tensor_split(slices) for t in (q, k, v)))
    return torch.cat([_softmax_attention(*part) for part in parts]).reshape(b, heads, n, d)


def _softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """On (..., N, d) queries and (..., M, d) keys and values; the leading dimensions are batch dimensions."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)  # (..., N, M)
    probs = torch.softmax(scores.to(stats_dtype(scores)), dim=-1).to(v.dtype)
    return torch.matmul(probs, v)  # (..., N, d)


class Attention(nn.Module):
    """diffusers `attention_processor.Attention` with `AttnProcessor2_0`.

    `decomposed=True` writes attention as matmul + fp32 softmax + matmul
    instead of `scaled_dot_product_attention` (Vulkan cannot compile the
    fused attention op; the CPU's data-tiled build needs it too). With
    `sliced=True` (the CPU's form) it computes a slice of (batch row, head)
    pairs at a time (`decomposed_attention`); with `sliced=False` all pairs in
    one batched matmul (the GPUs' form: on CUDA the slices made the SDXL CFG
    step 1.4x slower, docs/benchmarks.md).
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.head_dim = head_dim
        self.decomposed = False
        self.sliced = True
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # Index 1 is diffusers' dropout slot.
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Identity()])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b = x.shape[0]
        q = self.to_q(x).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, N, head_dim)
        k = self.to_k(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, M, head_dim)
        v = self.to_v(context).view(b, -1, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, M, head_dim)
        if self.decomposed:
            out = decomposed_attention(q, k, v) if self.sliced else _softmax_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        out = out.transpose(1, 2).reshape(b, -1, self.heads * self.head_dim)  # (B, N, inner)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """diffusers `activations.GEGLU` (exact GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """diffusers `attention.FeedForward` with GEGLU, mult 4."""

    def __init__(self, dim: int):
        super().__init__()
        # Index 1 is diffusers' dropout slot.
        self.net = nn.ModuleList([GEGLU(dim, dim * 4), nn.Identity(), nn.Linear(dim * 4, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """diffusers `attention.BasicTransformerBlock` (layer_norm, self + cross attention)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm2 = LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, head_dim, context_dim)
        self.norm3 = LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class RowwiseConv2d(nn.Conv2d):
    """An nn.Conv2d (same parameters and state-dict keys) that can run its batch one row at a time.

    With `by_rows` set, a batch of B > 1 rows is B batch-1 convolutions, concatenated: the CPU's form of a
    bf16 module with two or more rows (CFG, batch 2). iree-compile 3.13 runs bf16 convolutions fast only
    as im2col matmuls (`--iree-global-opt-use-im2col-for-convs`: 3.0-3.3x on the SDXL UNet at batch 1),
    and that pass fails on a 16-bit convolution with batch > 1 (docs/repro/cpu-bf16-im2col-rows.py). One
    2x1280x16x16 3x3 bf16 convolution: 480 ms batched and direct, 44 ms by rows with im2col (torch 36 ms).
    Same sums per row as the batched convolution.
    """

    by_rows = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.by_rows or x.shape[0] == 1:
            return super().forward(x)
        return torch.cat([super(RowwiseConv2d, self).forward(row) for row in x.split(1)])


class PointwiseConv2d(nn.Conv2d):
    """A 1x1 nn.Conv2d (same parameters and state-dict keys) computed as one 2-D matmul over the B*H*W pixels.

    iree-compile 3.13 turns a 1x1 conv2d with batch > 1 into a contraction with two parallel output
    dimensions (batch and pixels, apart in NCHW) that it neither data-tiles nor runs fast: at 1024x1024
    CFG (batch 2) SDXL's shortcut convolutions took 9.8 s of an 88 s CPU call at 4% of peak
    (docs/cpu-profile-1024-b2.md). At batch 1 the pixels are one dimension and it was already a matmul.
    Same sums as the convolution; torch eager runs this form about as fast (0.8-1.03x the time).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__(in_channels, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pointwise_conv2d(x, self.weight, self.bias)


def pointwise_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """conv2d(x, weight, bias) for a 1x1 `weight` (C_out, C_in, 1, 1), as one matmul (see `PointwiseConv2d`)."""
    b, c, h, w = x.shape
    cols = x.transpose(0, 1).reshape(c, b * h * w)  # (C_in, B*H*W)
    weight = weight.reshape(-1, c)
    y = weight @ cols if bias is None else torch.addmm(bias[:, None], weight, cols)
    return y.reshape(-1, b, h, w).transpose(0, 1)


class Transformer2DModel(nn.Module):
    """diffusers `transformers.transformer_2d.Transformer2DModel` (continuous input)."""

    def __init__(
        self,
        heads: int,
        channels: int,
        depth: int,
        context_dim: int,
        groups: int,
        linear_projection: bool,
    ):
        super().__init__()
        head_dim = channels // heads
        self.linear_projection = linear_projection
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        if linear_projection:
            self.proj_in = nn.Linear(channels, channels)
        else:
            self.proj_in = PointwiseConv2d(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(channels, heads, head_dim, context_dim) for _ in range(depth)
        )
        if linear_projection:
            self.proj_out = nn.Linear(channels, channels)
        else:
            self.proj_out = PointwiseConv2d(channels, channels)

    def enter(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the blocks' tokens (B, HW, C): norm, proj_in."""
        b, c, h, w = x.shape
        x = self.norm(x)
        if not self.linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)  # (B, HW, C)
        return self.proj_in(x) if self.linear_projection else x

    def leave(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Tokens (B, HW, C) -> proj_out, back to the residual's (B, C, H, W), plus the residual."""
        b, c, h, w = residual.shape
        if self.linear_projection:
            x = self.proj_out(x)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear_projection:
            x = self.proj_out(x.contiguous())
        return x + residual

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        residual = x
        x = self.enter(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        return self.leave(x, residual)


class ResnetBlock2D(nn.Module):
    """diffusers `resnet.ResnetBlock2D` (time_embedding_norm "default", pre-norm, SiLU)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        groups: int,
        eps: float,
        output_scale_factor: float = 1.0,
    ):
        super().__init__()
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = RowwiseConv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = RowwiseConv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = PointwiseConv2d(in_channels, out_channels) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nn.Module):
    """diffusers `downsampling.Downsample2D` (use_conv, stride-2 3x3 conv)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = RowwiseConv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """diffusers `upsampling.Upsample2D` (nearest, then 3x3 conv)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = RowwiseConv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        # An explicit target size equals scale_factor=2 on even sizes and
        # matches diffusers' `upsample_size` path on odd ones.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
