# Copyright 2026 the punet authors. Apache-2.0.
"""The UNet over N ranks: rank-local layers, the communication between them, and the sharded forward.

Each rank holds a rank-local copy of punet's float model in which the layers `plan.RULES` splits are
swapped for their rank-local parts (`local_unet`): the state-dict keys stay diffusers', the shapes are
the rank's slices. `ShardedUNet` runs the ranks side by side, one list entry per rank, and meets them
only where the plan says: one `Comm.all_reduce` per split layer. The same forward runs eagerly (N ranks
simulated on one device: `EagerComm`) and exports to one IREE multi-device program (`DeviceComm`:
tensors moved with iree-turbine's `transfer_to_logical_device`). `punet/model` is not changed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from ..model import UNet2DConditionModel
from ..model.layers import GEGLU, Attention, FeedForward, GroupNorm, ResnetBlock2D, pointwise_conv2d
from .plan import Plan

# ---- communication -------------------------------------------------------------------------


class EagerComm:
    """N ranks simulated in one process: a 'transfer' is the tensor itself."""

    def __init__(self, n: int):
        self.n = n
        self.log: list[str] = []  # one name per all-reduce, in the order the forward met them

    def to(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        return t

    def replicate(self, t: torch.Tensor) -> list[torch.Tensor]:
        """The same tensor on every rank (from rank 0)."""
        return [t if r == 0 else self.to(r, t) for r in range(self.n)]

    def all_reduce(self, parts: list[torch.Tensor], name: str) -> list[torch.Tensor]:
        """Every rank gets the sum of every rank's partial, added in rank order (bitwise the same on all)."""
        self.log.append(name)
        out = []
        for r in range(self.n):
            total = None
            for i, p in enumerate(parts):
                p = p if i == r else self.to(r, p)
                total = p if total is None else total + p
            out.append(total)
        return out

    def gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """The result, on rank 0 (every rank holds the same replicated value)."""
        return parts[0]


class DeviceComm(EagerComm):
    """Ranks as IREE logical devices: a transfer is `flow.tensor.transfer` to `__device_<rank>`."""

    def to(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        from iree.turbine.ops.iree import transfer_to_logical_device

        return transfer_to_logical_device(str(rank), t)

    def gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        from iree.turbine.ops.iree import barrier_on_logical_device

        return barrier_on_logical_device("0", parts[0])


# ---- rank-local layers ---------------------------------------------------------------------


class RowParallelLinear(nn.Linear):
    """The rank's input-feature slice of a Linear: a partial sum; the bias is added after the all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def finish(self, total: torch.Tensor) -> torch.Tensor:
        return total + self.bias


class RowParallelConv2d(nn.Conv2d):
    """The rank's input-channel slice of a Conv2d: a partial sum; the bias is added after the all-reduce."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_size == (1, 1):  # the shortcut: one matmul, as the unsharded model's `PointwiseConv2d`
            return pointwise_conv2d(x, self.weight)
        return F.conv2d(x, self.weight, None, self.stride, self.padding)


def _local_attention(a: Attention, tp: int) -> Attention:
    """Attention with this rank's heads: q/k/v column slices, to_out a row slice (partial sums)."""
    local = Attention(a.to_q.in_features, a.heads // tp, a.head_dim, a.to_k.in_features)
    local.to_out[0] = RowParallelLinear(a.to_out[0].in_features // tp, a.to_out[0].out_features)
    local.decomposed, local.sliced = a.decomposed, a.sliced
    return local


def _local_feed_forward(ff: FeedForward, tp: int) -> FeedForward:
    """GEGLU with this rank's value and gate features, then net.2 on them (partial sums)."""
    dim, inner = ff.net[2].out_features, ff.net[2].in_features
    local = FeedForward(dim)
    local.net[0] = GEGLU(dim, inner // tp)
    local.net[2] = RowParallelLinear(inner // tp, dim)
    return local


class ResnetBlock2DShard(nn.Module):
    """One rank's part of diffusers `resnet.ResnetBlock2D` (punet's `ResnetBlock2D`).

    conv1 and the time projection give this rank's output channels; GroupNorm normalises them in
    whole groups (no communication); conv2 and the 1x1 shortcut (on this rank's slice of the
    replicated input) leave partial sums that one all-reduce adds up; `finish` adds the biases and the
    identity residual once.
    """

    def __init__(self, block: ResnetBlock2D, tp: int, rank: int):
        super().__init__()
        cin, cout, k = block.conv1.in_channels, block.conv1.out_channels, block.conv1.kernel_size
        self.tp, self.rank = tp, rank
        self.output_scale_factor = block.output_scale_factor
        self.norm1 = GroupNorm(block.norm1.num_groups, cin, eps=block.norm1.eps)
        self.conv1 = nn.Conv2d(cin, cout // tp, k, padding=block.conv1.padding)
        self.time_emb_proj = nn.Linear(block.time_emb_proj.in_features, cout // tp)
        self.norm2 = GroupNorm(block.norm2.num_groups // tp, cout // tp, eps=block.norm2.eps)
        self.conv2 = RowParallelConv2d(cout // tp, cout, k, padding=block.conv2.padding)
        self.conv_shortcut = RowParallelConv2d(cin // tp, cout, 1) if block.conv_shortcut is not None else None

    def partial(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C/tp, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            c = x.shape[1] // self.tp
            h = h + self.conv_shortcut(x[:, self.rank * c : (self.rank + 1) * c])  # (B, C_in/tp, H, W) slice
        return h

    def finish(self, total: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = total + self.conv2.bias[:, None, None]  # (C, 1, 1)
        if self.conv_shortcut is not None:
            out = self.conv_shortcut.bias[:, None, None] + h
        else:
            out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


def local_unet(config: UNetConfig, plan: Plan, rank: int) -> UNet2DConditionModel:
    """Rank `rank`'s model: punet's UNet with every split layer swapped for its rank-local part.

    Built where the caller's default device is (meta: no memory); its state-dict keys are the float
    model's, with the rank's shapes.
    """
    model = UNet2DConditionModel(config)
    swaps = {
        "attention": lambda m: _local_attention(m, plan.tp),
        "feed-forward": lambda m: _local_feed_forward(m, plan.tp),
        "resnet": lambda m: ResnetBlock2DShard(m, plan.tp, rank),
    }
    for path, kind in plan.layers.items():
        parent, _, name = path.rpartition(".")
        owner = model.get_submodule(parent)
        owner.register_module(name, swaps[kind](owner.get_submodule(name)))
    return model


# ---- the sharded forward --------------------------------------------------------------------


def _each(fn: Callable, *lists):
    """`fn` on every rank: one call per entry of the (equal-length) per-rank lists."""
    return [fn(*args) for args in zip(*lists)]


class ShardedUNet(nn.Module):
    """punet's UNet over `plan.tp` ranks, with the float model's keyword forward (so GuidedUNet wraps it).

    Mirrors `UNet2DConditionModel.forward` phase by phase; every value is a list with one tensor per
    rank, replicated except inside a split layer.
    """

    def __init__(self, config: UNetConfig, plan: Plan, comm: EagerComm):
        super().__init__()
        self.config, self.plan, self.comm = config, plan, comm
        self.ranks = nn.ModuleList(local_unet(config, plan, r) for r in range(plan.tp))

    def set_decomposed_attention(self, enabled: bool = True, sliced: bool = True) -> ShardedUNet:
        for m in self.ranks:
            m.set_decomposed_attention(enabled, sliced)
        return self

    def forward(
        self,
        *,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg, comm, ranks = self.config, self.comm, list(self.ranks)
        timestep = ranks[0]._check_inputs(sample, timestep, encoder_hidden_states, text_embeds, time_ids)

        # 0. every input on every rank
        samples, timesteps, contexts = (comm.replicate(t) for t in (sample, timestep, encoder_hidden_states))
        texts, times = (comm.replicate(t) if t is not None else [None] * len(ranks) for t in (text_embeds, time_ids))

        # 1. time embedding (replicated)
        embs = _each(lambda m, t, text, ids: m.embed(t, text, ids, sample.dtype), ranks, timesteps, texts, times)

        # 2. conv_in (replicated)
        if cfg.center_input_sample:
            samples = [2 * s - 1.0 for s in samples]
        xs = _each(lambda m, s: m.conv_in(s), ranks, samples)

        # 3. down
        skips = [xs]
        for i in range(len(ranks[0].down_blocks)):
            blocks = [m.down_blocks[i] for m in ranks]
            for j in range(len(blocks[0].resnets)):
                xs = self._resnet(f"down_blocks.{i}.resnets.{j}", [bl.resnets[j] for bl in blocks], xs, embs)
                if blocks[0].attentions is not None:
                    xs = self._transformer(f"down_blocks.{i}.attentions.{j}", [bl.attentions[j] for bl in blocks],
                                           xs, contexts)
                skips.append(xs)
            if blocks[0].downsamplers is not None:
                xs = _each(lambda bl, x: bl.downsamplers[0](x), blocks, xs)
                skips.append(xs)

        # 4. mid
        mids = [m.mid_block for m in ranks]
        xs = self._resnet("mid_block.resnets.0", [mb.resnets[0] for mb in mids], xs, embs)
        xs = self._transformer("mid_block.attentions.0", [mb.attentions[0] for mb in mids], xs, contexts)
        xs = self._resnet("mid_block.resnets.1", [mb.resnets[1] for mb in mids], xs, embs)

        # 5. up
        for i in range(len(ranks[0].up_blocks)):
            blocks = [m.up_blocks[i] for m in ranks]
            for j in range(len(blocks[0].resnets)):
                xs = _each(lambda x, s: torch.cat([x, s], dim=1), xs, skips.pop())
                xs = self._resnet(f"up_blocks.{i}.resnets.{j}", [bl.resnets[j] for bl in blocks], xs, embs)
                if blocks[0].attentions is not None:
                    xs = self._transformer(f"up_blocks.{i}.attentions.{j}", [bl.attentions[j] for bl in blocks],
                                           xs, contexts)
            if blocks[0].upsamplers is not None:
                size = tuple(skips[-1][0].shape[-2:])
                xs = _each(lambda bl, x, size=size: bl.upsamplers[0](x, size), blocks, xs)

        # 6. out (replicated; rank 0's result is the output)
        xs = _each(lambda m, x: m.conv_out(F.silu(m.conv_norm_out(x))), ranks, xs)
        return comm.gather(xs)

    def _resnet(self, name: str, blocks: list[ResnetBlock2DShard], xs, embs):
        totals = self.comm.all_reduce(_each(lambda bl, x, e: bl.partial(x, e), blocks, xs, embs), name)
        return _each(lambda bl, t, x: bl.finish(t, x), blocks, totals, xs)

    def _residual(self, name: str, layers: list[nn.Module], xs, f: Callable, finish: Callable, *extra):
        """x + all_reduce(f(layer, x, *extra)), the row-parallel bias added once after the all-reduce."""
        totals = self.comm.all_reduce(_each(f, layers, xs, *extra), name)
        return _each(lambda layer, t, x: x + finish(layer)(t), layers, totals, xs)

    def _transformer(self, name: str, models: list, xs, contexts):
        """diffusers `Transformer2DModel` (punet's) over the ranks: heads and GEGLU features split."""
        m0 = models[0]
        hs = _each(lambda m, x: m.enter(x), models, xs)
        for k in range(len(m0.transformer_blocks)):
            blocks = [m.transformer_blocks[k] for m in models]
            p = f"{name}.transformer_blocks.{k}"
            hs = self._residual(f"{p}.attn1", blocks, hs, lambda bl, x: bl.attn1(bl.norm1(x)),
                                lambda bl: bl.attn1.to_out[0].finish)
            hs = self._residual(f"{p}.attn2", blocks, hs, lambda bl, x, ctx: bl.attn2(bl.norm2(x), ctx),
                                lambda bl: bl.attn2.to_out[0].finish, contexts)
            hs = self._residual(f"{p}.ff", blocks, hs, lambda bl, x: bl.ff(bl.norm3(x)),
                                lambda bl: bl.ff.net[2].finish)
        return _each(lambda m, x, residual: m.leave(x, residual), models, hs, xs)


class DataParallelUNet(nn.Module):
    """The UNet with its batch rows split evenly over devices, the weights replicated on each.

    Wrapped in punet's `GuidedUNet`, it is the CFG step with its negative-prompt rows on device 0 and
    its positive-prompt rows on device 1 (`punet export --cfg --dp 2`); the guidance itself runs on
    device 0, where every device's noise comes back.
    """

    def __init__(self, unets: list[nn.Module], comm: EagerComm):
        super().__init__()
        self.unets = nn.ModuleList(unets)
        self.comm = comm

    def forward(
        self,
        *,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor | None = None,
        time_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        comm, rows = self.comm, sample.shape[0] // len(self.unets)
        noise = []
        for rank, unet in enumerate(self.unets):
            part = slice(rank * rows, (rank + 1) * rows)

            def mine(t, rank=rank, part=part):
                """This device's rows of input `t` (moved there)."""
                return None if t is None else t[part] if rank == 0 else comm.to(rank, t[part])

            out = unet(sample=mine(sample), timestep=mine(timestep), encoder_hidden_states=mine(encoder_hidden_states),
                       text_embeds=mine(text_embeds), time_ids=mine(time_ids))
            noise.append(out if rank == 0 else comm.to(0, out))
        return comm.gather([torch.cat(noise, dim=0)])
