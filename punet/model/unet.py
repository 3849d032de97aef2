# Copyright 2026 the punet authors. Apache-2.0.
# Mirrors diffusers' UNet2DConditionModel and its 2D blocks (Apache-2.0).
"""The SD-family UNet: `UNet2DConditionModel(config)`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .layers import (
    Attention,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    RowwiseConv2d,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    timestep_embedding,
)


class DownBlock(nn.Module):
    """diffusers `CrossAttnDownBlock2D` (with `depths`) or `DownBlock2D` (without)."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_ch: int,
        out_ch: int,
        layers: int,
        depths: tuple[int, ...] | None,
        heads: int,
        downsample: bool,
    ):
        super().__init__()
        temb = cfg.time_embed_dim
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_ch if i == 0 else out_ch, out_ch, temb, cfg.norm_num_groups, cfg.norm_eps)
            for i in range(layers)
        )
        if depths is not None:
            self.attentions = nn.ModuleList(
                Transformer2DModel(
                    heads, out_ch, depths[i], cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection
                )
                for i in range(layers)
            )
        else:
            self.attentions = None
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)])
        else:
            self.downsamplers = None

    def forward(
        self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """diffusers `CrossAttnUpBlock2D` (with `depths`) or `UpBlock2D` (without)."""

    def __init__(
        self,
        cfg: UNetConfig,
        in_ch: int,
        out_ch: int,
        prev_out_ch: int,
        layers: int,
        depths: tuple[int, ...] | None,
        heads: int,
        upsample: bool,
    ):
        super().__init__()
        temb = cfg.time_embed_dim
        resnets = []
        for i in range(layers):
            skip_ch = in_ch if i == layers - 1 else out_ch
            res_in = prev_out_ch if i == 0 else out_ch
            resnets.append(ResnetBlock2D(res_in + skip_ch, out_ch, temb, cfg.norm_num_groups, cfg.norm_eps))
        self.resnets = nn.ModuleList(resnets)
        if depths is not None:
            self.attentions = nn.ModuleList(
                Transformer2DModel(
                    heads, out_ch, depths[i], cfg.cross_attention_dim, cfg.norm_num_groups, cfg.use_linear_projection
                )
                for i in range(layers)
            )
        else:
            self.attentions = None
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        temb: torch.Tensor,
        context: torch.Tensor,
        upsample_size: tuple[int, int] | None,
    ) -> torch.Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(nn.Module):
    """diffusers `UNetMidBlock2DCrossAttn` (one resnet-attention-resnet layer)."""

    def __init__(self, cfg: UNetConfig, ch: int, depth: int, heads: int):
        super().__init__()
        temb, g, eps, scale = cfg.time_embed_dim, cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.attentions = nn.ModuleList(
            [Transformer2DModel(heads, ch, depth, cfg.cross_attention_dim, g, cfg.use_linear_projection)]
        )
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb, g, eps, scale) for _ in range(2))

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UNet2DConditionModel(nn.Module):
    """diffusers `UNet2DConditionModel` for the SD 1.x / 2.x / SDXL families.

    Build on the meta device (`with torch.device("meta"):`) to get the
    structure with no weight memory.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch = cfg.block_out_channels
        n = len(ch)
        heads = cfg.heads

        self.conv_in = RowwiseConv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2)
        self.time_embedding = TimestepEmbedding(ch[0], cfg.time_embed_dim)
        if cfg.has_text_time:
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, cfg.time_embed_dim)

        self.down_blocks = nn.ModuleList()
        out_ch = ch[0]
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, out_ch = out_ch, ch[i]
            depths = cfg.transformer_layers_per_block[i] if kind == "CrossAttnDownBlock2D" else None
            self.down_blocks.append(
                DownBlock(cfg, in_ch, out_ch, cfg.layers_per_block[i], depths, heads[i], downsample=i < n - 1)
            )

        self.mid_block = UNetMidBlock2DCrossAttn(cfg, ch[-1], cfg.transformer_layers_per_block[-1][0], heads[-1])

        self.up_blocks = nn.ModuleList()
        rch, rheads, rlayers = ch[::-1], heads[::-1], cfg.layers_per_block[::-1]
        up_depths = cfg.up_transformer_layers
        out_ch = rch[0]
        for i, kind in enumerate(cfg.up_block_types):
            prev_out, out_ch = out_ch, rch[i]
            in_ch = rch[min(i + 1, n - 1)]
            depths = up_depths[i] if kind == "CrossAttnUpBlock2D" else None
            self.up_blocks.append(
                UpBlock(cfg, in_ch, out_ch, prev_out, rlayers[i] + 1, depths, rheads[i], upsample=i < n - 1)
            )

        self.conv_norm_out = GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = RowwiseConv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=(cfg.conv_out_kernel - 1) // 2)

    def set_decomposed_attention(self, enabled: bool = True, sliced: bool = True) -> "UNet2DConditionModel":
        """Write attention as matmul + softmax (for targets without fused attention), by slices of
        (batch row, head) pairs (`sliced`: the CPU's form) or all pairs at once (the GPUs' form)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.decomposed = enabled
                m.sliced = sliced
        return self

    def set_conv_rows(self, enabled: bool = True) -> "UNet2DConditionModel":
        """Run each convolution one batch row at a time (`RowwiseConv2d`: the CPU's form for bf16 modules
        of two or more rows) or the whole batch at once."""
        for m in self.modules():
            if isinstance(m, RowwiseConv2d):
                m.by_rows = enabled
        return self

    def embed(
        self, timestep: torch.Tensor, text_embeds: torch.Tensor | None, time_ids: torch.Tensor | None, dtype: torch.dtype
    ) -> torch.Tensor:
        """The time embedding (sinusoids in fp32, then cast like diffusers), plus SDXL's text-time one."""
        cfg = self.config
        t_emb = timestep_embedding(timestep, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(dtype))
        if cfg.has_text_time:
            time_embeds = timestep_embedding(
                time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift
            ).reshape(timestep.shape[0], -1)  # (B, num_time_ids * addition_time_embed_dim)
            add_embeds = torch.cat([text_embeds.to(time_embeds.dtype), time_embeds], dim=-1).to(emb.dtype)
            emb = emb + self.add_embedding(add_embeds)
        return emb

    def forward(
        self,
        *,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.config
        timestep = self._check_inputs(sample, timestep, encoder_hidden_states, text_embeds, time_ids)

        # 1. time embedding
        emb = self.embed(timestep, text_embeds, time_ids, sample.dtype)

        # 2. conv_in
        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        x = self.conv_in(sample)

        # 3. down
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, encoder_hidden_states)
            skips.extend(block_skips)

        # 4. mid
        x = self.mid_block(x, emb, encoder_hidden_states)

        # 5. up
        for block in self.up_blocks:
            n = len(block.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = tuple(skips[-1].shape[-2:]) if block.upsamplers is not None else None
            x = block(x, block_skips, emb, encoder_hidden_states, size)

        # 6. out
        x = F.silu(self.conv_norm_out(x))
        return self.conv_out(x)

    def _check_inputs(self, sample, timestep, encoder_hidden_states, text_embeds, time_ids) -> torch.Tensor:
        """Validate shapes; return the timestep as a (B,) tensor."""
        cfg = self.config
        if sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample: expected shape (B, {cfg.in_channels}, H, W), got {tuple(sample.shape)}")
        b = sample.shape[0]
        if (
            encoder_hidden_states.dim() != 3
            or encoder_hidden_states.shape[0] != b
            or encoder_hidden_states.shape[2] != cfg.cross_attention_dim
        ):
            raise ValueError(
                f"encoder_hidden_states: expected shape ({b}, tokens, {cfg.cross_attention_dim}), "
                f"got {tuple(encoder_hidden_states.shape)}"
            )
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float32, device=sample.device)
        timestep = timestep.reshape(-1)  # 0-d -> (1,)
        if timestep.shape[0] not in (1, b):
            raise ValueError(f"timestep: expected a number or shape (), (1,) or ({b},), got {tuple(timestep.shape)}")
        if cfg.has_text_time:
            if text_embeds is None or time_ids is None:
                raise ValueError(
                    "text_embeds and time_ids are required: the config has addition_embed_type='text_time'"
                )
            proj = cfg.projection_class_embeddings_input_dim
            width = text_embeds.shape[-1] + time_ids.shape[-1] * cfg.addition_time_embed_dim
            if text_embeds.dim() != 2 or time_ids.dim() != 2 or text_embeds.shape[0] != b or time_ids.shape[0] != b:
                raise ValueError(
                    f"text_embeds/time_ids: expected shapes ({b}, D) and ({b}, N), "
                    f"got {tuple(text_embeds.shape)} and {tuple(time_ids.shape)}"
                )
            if width != proj:
                raise ValueError(
                    f"text_embeds/time_ids: D + N * {cfg.addition_time_embed_dim} must equal "
                    f"projection_class_embeddings_input_dim={proj}, got {tuple(text_embeds.shape)} "
                    f"and {tuple(time_ids.shape)}"
                )
        elif text_embeds is not None or time_ids is not None:
            raise ValueError("text_embeds/time_ids given, but the config has no addition_embed_type='text_time'")
        return timestep.expand(b)
