"""The tensor-parallel plan, as data: how every weight splits over N ranks, and where partials meet.

`RULES` is the table: one row per layer kind that splits (attention, feed-forward, ResNet), naming
how each of its weights splits, the one communication that follows, and what the rank count must
divide. Every other layer is replicated, for the reason `REPLICATED` gives beside it.
`make_plan(config, tp)` applies the table to a model and returns a `Plan`: every state-dict key
with its `Split`, and every all-reduce. It can be printed,
tested, diffed, and is stored as JSON in a sharded archive.

Megatron-LM's tensor parallelism, for a UNet: a column-parallel layer splits its output features
(dim 0 of the weight); a row-parallel one splits its input features (dim 1) and leaves partial
sums, which one all-reduce adds up; its bias is added once, after the all-reduce.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..config import UNetConfig
from ..errors import PunetError

RANK_COUNTS = (2, 4, 8)


@dataclass(frozen=True)
class Split:
    """How one tensor splits over the ranks: along `dim` (None: replicated), in `halves` equal parts alike.

    `halves=2` is GEGLU's projection: its output is [value; gate], and rank r takes the r-th slice
    of each half, so that its value and gate features stay paired.
    """

    dim: int | None
    halves: int = 1

    @property
    def name(self) -> str:
        if self.dim is None:
            return "replicated"
        kind = {0: "column", 1: "row"}[self.dim]
        return kind + (f", {self.halves} halves alike" if self.halves > 1 else "")


REPLICATE = Split(None)
COLUMN = Split(0)  # output features / output channels
ROW = Split(1)  # input features / input channels: partial sums
GEGLU_COLUMN = Split(0, halves=2)


@dataclass(frozen=True)
class LayerRule:
    """A layer kind that splits: its weights' splits, the communication after it, the counts it needs divided."""

    kind: str
    module: str  # class name in punet/model/layers.py
    splits: dict[str, Split]  # weight name inside the layer -> split
    summary: str  # the splits in a few words, for the plan's table
    communication: str
    divides: str  # what the rank count must divide, said to the user


RULES: tuple[LayerRule, ...] = (
    LayerRule(
        "attention",
        "Attention",
        {
            "to_q.weight": COLUMN,
            "to_k.weight": COLUMN,
            "to_v.weight": COLUMN,
            "to_out.0.weight": ROW,
            "to_out.0.bias": REPLICATE,  # added once, after the all-reduce
        },
        "heads: to_q, to_k, to_v column; to_out.0 row (its bias after the all-reduce)",
        "1 all-reduce, after to_out.0",
        "heads",
    ),
    LayerRule(
        "feed-forward",
        "FeedForward",
        {
            "net.0.proj.weight": GEGLU_COLUMN,
            "net.0.proj.bias": GEGLU_COLUMN,
            "net.2.weight": ROW,
            "net.2.bias": REPLICATE,  # added once, after the all-reduce
        },
        "GEGLU proj column (value and gate halves alike); net.2 row (its bias after the all-reduce)",
        "1 all-reduce, after net.2",
        "inner features",
    ),
    LayerRule(
        "resnet",
        "ResnetBlock2D",
        {
            "norm1.weight": REPLICATE,  # the block's input is replicated
            "norm1.bias": REPLICATE,
            "conv1.weight": COLUMN,
            "conv1.bias": COLUMN,
            "time_emb_proj.weight": COLUMN,
            "time_emb_proj.bias": COLUMN,
            "norm2.weight": COLUMN,  # GroupNorm on the local channels: whole groups per rank
            "norm2.bias": COLUMN,
            "conv2.weight": ROW,
            "conv2.bias": REPLICATE,  # added once, after the all-reduce
            "conv_shortcut.weight": ROW,  # on the rank's slice of the replicated input, summed with conv2's partial
            "conv_shortcut.bias": REPLICATE,
        },
        "conv1, time_emb_proj, norm2 column (whole groups per rank); conv2, conv_shortcut row; norm1 replicated",
        "1 all-reduce, after conv2 (with the shortcut's partial sum)",
        "norm groups",
    ),
)

# Layers left whole on every rank, and why (matched by the key's module path, first match wins).
REPLICATED: tuple[tuple[str, str], ...] = (
    ("conv_in", "4 input channels: 0.01% of the weights; a split would need an all-gather before the first block"),
    ("time_embedding", "two small linears on a (B, C) vector: splitting saves nothing, an all-gather would cost"),
    ("add_embedding", "as time_embedding: the SDXL text/size embedding is a (B, 1280) vector"),
    ("conv_norm_out", "normalises the replicated output of the last block"),
    ("conv_out", "4 output channels: 0.01% of the weights; the result is wanted whole"),
    ("downsamplers", "<1% of SDXL's weights; split, each would add an all-reduce of a full feature map"),
    ("upsamplers", "<1% of SDXL's weights; split, each would add an all-reduce of a full feature map"),
    ("norm", "GroupNorm / LayerNorm of the replicated residual stream (no weights to speak of)"),
    ("proj_in", "the transformer's residual stream is replicated; split, it would add an all-gather (0.9% of SDXL)"),
    ("proj_out", "as proj_in; split, it would add an all-reduce per transformer"),
)


@dataclass(frozen=True)
class Plan:
    """Every weight's split over `tp` ranks, and every all-reduce."""

    tp: int
    splits: dict[str, Split]  # every state-dict key of the float model
    layers: dict[str, str]  # module path -> rule kind, for every split layer
    all_reduces: tuple[str, ...]  # the split layer each all-reduce ends (one each; module order)
    reasons: dict[str, str] = field(default_factory=dict)  # replicated key -> why

    def is_sharded(self, key: str) -> bool:
        return self.splits[key].dim is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "tp": self.tp,
            "splits": {k: asdict(s) for k, s in self.splits.items()},
            "layers": self.layers,
            "all_reduces": list(self.all_reduces),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        return cls(
            d["tp"], {k: Split(**s) for k, s in d["splits"].items()}, dict(d["layers"]), tuple(d["all_reduces"])
        )

    def rows(self, shapes: dict[str, tuple[int, ...]], itemsize: int) -> list[dict[str, Any]]:
        """The plan as a table: per layer kind, its split, communication and bytes per rank (whole model)."""
        out = []
        for rule in RULES:
            keys = [k for k in self.splits if _layer_of(k, self.layers) is not None
                    and self.layers[_layer_of(k, self.layers)] == rule.kind]
            out.append(_row(rule.kind, rule.summary, rule.communication, keys, self, shapes, itemsize))
        rest = [k for k in self.splits if _layer_of(k, self.layers) is None]
        out.append(_row("everything else", "replicated", "none", rest, self, shapes, itemsize))
        return out


def _row(kind, split, comm, keys, plan: Plan, shapes, itemsize) -> dict[str, Any]:
    whole = sum(_numel(shapes[k]) for k in keys) * itemsize
    per_rank = sum(_numel(shapes[k]) // (plan.tp if plan.is_sharded(k) else 1) for k in keys) * itemsize
    count = sum(1 for p in plan.all_reduces if plan.layers.get(p) == kind) if kind != "everything else" else 0
    return {"kind": kind, "split": split, "communication": comm, "all_reduces": count,
            "bytes": whole, "bytes_per_rank": per_rank}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _layer_of(key: str, layers: dict[str, str]) -> str | None:
    """The split layer `key` belongs to (its longest module-path prefix in `layers`), if any."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = ".".join(parts[:i])
        if path in layers:
            return path
    return None


def replicated_reason(key: str) -> str:
    parts = key.split(".")
    for name, reason in REPLICATED:
        if name in parts:
            return reason
    return "replicated"


def _divided(module, rule: LayerRule) -> int:
    """The count of `module` the rank count must divide."""
    if rule.kind == "attention":
        return module.heads
    if rule.kind == "feed-forward":
        return module.net[2].in_features
    return module.norm2.num_groups


def make_plan(config: UNetConfig, tp: int) -> Plan:
    """Apply RULES to the model `config` describes, for `tp` ranks; refuse a count that does not divide a layer."""
    from ..model import UNet2DConditionModel

    if tp not in RANK_COUNTS:
        raise PunetError(f"--tp {tp}: expected one of {', '.join(map(str, RANK_COUNTS))}")
    with torch.device("meta"):
        model = UNet2DConditionModel(config)
    by_class = {r.module: r for r in RULES}
    splits: dict[str, Split] = {}
    layers: dict[str, str] = {}
    for path, module in model.named_modules():
        rule = by_class.get(type(module).__name__)
        if rule is None:
            continue
        n = _divided(module, rule)
        if n % tp:
            raise PunetError(f"--tp {tp}: layer {path} ({rule.kind}) has {n} {rule.divides}, not divisible by {tp}")
        if rule.kind == "resnet" and module.conv_shortcut is not None and module.conv_shortcut.in_channels % tp:
            raise PunetError(
                f"--tp {tp}: layer {path}.conv_shortcut has {module.conv_shortcut.in_channels} input channels, "
                f"not divisible by {tp}"
            )
        layers[path] = rule.kind
        for name, _ in module.named_parameters():
            if name in rule.splits:
                splits[f"{path}.{name}"] = rule.splits[name]
    reasons = {}
    for key in model.state_dict():
        if key not in splits:
            splits[key] = REPLICATE
            reasons[key] = replicated_reason(key)
    return Plan(tp, splits, layers, tuple(layers), reasons)


def split_tensor(t: torch.Tensor, split: Split, tp: int, rank: int) -> torch.Tensor:
    """Rank `rank`'s part of `t` (a view where the slice is one block, else a new tensor)."""
    if split.dim is None:
        return t
    halves = t.chunk(split.halves, dim=split.dim)
    parts = [h.chunk(tp, dim=split.dim)[rank] for h in halves]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=split.dim)


def local_shape(shape: tuple[int, ...], split: Split, tp: int) -> tuple[int, ...]:
    if split.dim is None:
        return tuple(shape)
    s = list(shape)
    s[split.dim] //= tp
    return tuple(s)
