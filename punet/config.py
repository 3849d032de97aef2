"""UNet configuration: the keys of a diffusers `unet/config.json`, validated.

`UNetConfig` is a frozen dataclass whose fields are exactly the config.json
keys of diffusers' `UNet2DConditionModel`. Loading normalises "int or
per-block list" values into tuples and raises `ConfigError` (a `ValueError`)
on any key or value the punet model does not implement, naming both.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import PunetError
from .fileio import read_json_object

__all__ = ["ConfigError", "UNetConfig"]


class ConfigError(PunetError, ValueError):
    """A config.json key or value punet does not implement or cannot parse."""


DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Keys whose only implemented values are listed. Anything else names a model
# feature punet does not have, so it is an error rather than a silent ignore.
_ONLY: dict[str, tuple[Any, ...]] = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu",),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None, "text_time"),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
}

# diffusers' own defaults where the dataclass holds the normalised form.
_RAW_DEFAULTS: dict[str, Any] = {"layers_per_block": 2, "attention_head_dim": 8, "transformer_layers_per_block": 1}

# Metadata keys diffusers writes next to the architecture.
_META_KEYS = ("_class_name", "_diffusers_version", "_name_or_path", "_use_default_values")


@dataclass(frozen=True)
class UNetConfig:
    """diffusers `UNet2DConditionModel` config; defaults are diffusers' defaults."""

    sample_size: int | tuple[int, ...] | None = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    only_cross_attention: bool | tuple[bool, ...] = False
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    dropout: float = 0.0  # inference only: dropout is the identity
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    # Per down block, per layer; mid uses the last block's count.
    transformer_layers_per_block: tuple[tuple[int, ...], ...] = ((1, 1), (1, 1), (1, 1), (1, 1))
    # Per up block, per layer (layers_per_block + 1); from_dict fills it with
    # diffusers' default (the reversed down counts) when config.json has null.
    reverse_transformer_layers_per_block: tuple[tuple[int, ...], ...] | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: tuple[int, ...] = (8, 8, 8, 8)
    num_attention_heads: tuple[int, ...] | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False  # SDPA accumulates in fp32 already
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64

    # ---- loading -------------------------------------------------------

    @classmethod
    def from_json(cls, path: str | Path) -> "UNetConfig":
        path = Path(path)
        data = read_json_object(path, "a diffusers unet config.json", ConfigError)
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UNetConfig":
        d = dict(d)
        class_name = d.get("_class_name", "UNet2DConditionModel")
        if class_name != "UNet2DConditionModel":
            raise ConfigError(f"unsupported config: _class_name={class_name!r} (expected 'UNet2DConditionModel')")
        for k in _META_KEYS:
            d.pop(k, None)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown config key {unknown[0]!r} (not a UNet2DConditionModel argument)")
        for key, allowed in _ONLY.items():
            if key in d and not any(_same(d[key], a) for a in allowed):
                raise ConfigError(_unsupported(key, d[key], allowed))

        defaults = cls()

        def get(k: str) -> Any:
            # diffusers' defaults for per-block keys are single ints.
            return d.get(k, _RAW_DEFAULTS.get(k, getattr(defaults, k)))

        n = len(_str_list(get("down_block_types"), "down_block_types"))

        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            kw[f.name] = get(f.name)
        kw["down_block_types"] = _str_list(get("down_block_types"), "down_block_types")
        kw["up_block_types"] = _str_list(get("up_block_types"), "up_block_types")
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES), ("up_block_types", UP_BLOCK_TYPES)):
            for t in kw[key]:
                if t not in allowed:
                    raise ConfigError(_unsupported(key, t, allowed))
        kw["block_out_channels"] = _per_block(get("block_out_channels"), n, "block_out_channels")
        kw["layers_per_block"] = _per_block(get("layers_per_block"), n, "layers_per_block")
        kw["attention_head_dim"] = _per_block(get("attention_head_dim"), n, "attention_head_dim")
        if get("num_attention_heads") is not None:
            kw["num_attention_heads"] = _per_block(get("num_attention_heads"), n, "num_attention_heads")
        oca = get("only_cross_attention")
        if any(v is not False for v in (oca if isinstance(oca, (list, tuple)) else [oca])):
            raise ConfigError(_unsupported("only_cross_attention", oca, (False,)))
        kw["only_cross_attention"] = False
        if not isinstance(get("cross_attention_dim"), int) or isinstance(get("cross_attention_dim"), bool):
            raise ConfigError(
                f"unsupported config: cross_attention_dim={get('cross_attention_dim')!r} (expected one int)"
            )
        kw["upcast_attention"] = bool(get("upcast_attention"))
        sample_size = get("sample_size")
        kw["sample_size"] = tuple(sample_size) if isinstance(sample_size, list) else sample_size

        # Transformer depth: int, per block, or per block per layer.
        layers = kw["layers_per_block"]
        tl = get("transformer_layers_per_block")
        if isinstance(tl, (list, tuple)) and any(isinstance(v, (list, tuple)) for v in tl):
            if d.get("reverse_transformer_layers_per_block") is None:
                raise ConfigError(
                    "unsupported config: transformer_layers_per_block is a nested list but "
                    "reverse_transformer_layers_per_block is not set (diffusers requires both)"
                )
        per_block = _per_block(tl, n, "transformer_layers_per_block", nested=True)
        kw["transformer_layers_per_block"] = tuple(
            _per_layer(v, layers[i], f"transformer_layers_per_block[{i}]") for i, v in enumerate(per_block)
        )
        rtl = get("reverse_transformer_layers_per_block")
        if rtl is None:
            # diffusers reverses the per-block counts, each repeated over the
            # up block's layers_per_block + 1 layers.
            rtl = [kw["transformer_layers_per_block"][i][0] for i in reversed(range(n))]
        per_block = _per_block(rtl, n, "reverse_transformer_layers_per_block", nested=True)
        kw["reverse_transformer_layers_per_block"] = tuple(
            _per_layer(v, layers[n - 1 - i] + 1, f"reverse_transformer_layers_per_block[{i}]")
            for i, v in enumerate(per_block)
        )
        for key in ("in_channels", "out_channels", "norm_num_groups", "downsample_padding"):
            if not isinstance(kw[key], int) or isinstance(kw[key], bool) or kw[key] < 0:
                raise ConfigError(f"unsupported config: {key}={kw[key]!r} (expected a non-negative int)")
        for key in ("conv_in_kernel", "conv_out_kernel"):
            if not isinstance(kw[key], int) or kw[key] < 1 or kw[key] % 2 == 0:
                raise ConfigError(f"unsupported config: {key}={kw[key]!r} (expected an odd positive int)")
        cfg = cls(**kw)
        cfg._check()
        return cfg

    def _check(self) -> None:
        n = len(self.down_block_types)
        if len(self.up_block_types) != n:
            raise ConfigError(
                f"unsupported config: up_block_types has {len(self.up_block_types)} entries, "
                f"down_block_types has {n} (expected equal)"
            )
        g = self.norm_num_groups
        for c in self.block_out_channels:
            if g <= 0 or c % g:
                raise ConfigError(
                    f"unsupported config: norm_num_groups={g} does not divide block_out_channels entry {c}"
                )
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.heads)):
            if h <= 0 or c % h:
                raise ConfigError(
                    f"unsupported config: {h} attention heads do not divide block_out_channels[{i}]={c}"
                )
        if self.addition_embed_type == "text_time":
            for key in ("addition_time_embed_dim", "projection_class_embeddings_input_dim"):
                if not isinstance(getattr(self, key), int):
                    raise ConfigError(
                        f"unsupported config: {key}={getattr(self, key)!r} "
                        "(addition_embed_type='text_time' needs an int)"
                    )

    # ---- derived values --------------------------------------------------

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per down block.

        diffusers' naming quirk: `attention_head_dim` actually holds the
        number of heads (issue diffusers#2011); `num_attention_heads`, where
        set, takes precedence.
        """
        return self.num_attention_heads or self.attention_head_dim

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or self.block_out_channels[0] * 4

    @property
    def has_text_time(self) -> bool:
        return self.addition_embed_type == "text_time"

    @property
    def up_transformer_layers(self) -> tuple[tuple[int, ...], ...]:
        """Transformer depth per up block, per layer."""
        return self.reverse_transformer_layers_per_block

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict with the same keys as config.json."""
        d = dataclasses.asdict(self)
        return {"_class_name": "UNet2DConditionModel", **_jsonable(d)}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def _same(value: Any, allowed: Any) -> bool:
    if isinstance(allowed, bool) or allowed is None:
        return value is allowed
    if isinstance(allowed, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and float(value) == allowed
    return value == allowed


def _unsupported(key: str, value: Any, allowed: tuple[Any, ...]) -> str:
    return f"unsupported config: {key}={value!r} (supported: {', '.join(repr(a) for a in allowed)})"


def _str_list(v: Any, key: str) -> tuple[str, ...]:
    if not isinstance(v, (list, tuple)) or not v or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"unsupported config: {key}={v!r} (expected a non-empty list of block names)")
    return tuple(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _per_block(v: Any, n: int, key: str, nested: bool = False) -> tuple:
    """int -> (int,) * n; list of length n -> tuple."""
    if _is_int(v):
        return (v,) * n
    if isinstance(v, (list, tuple)) and len(v) == n:
        ok = all(_is_int(x) or (nested and isinstance(x, (list, tuple))) for x in v)
        if ok:
            return tuple(tuple(x) if isinstance(x, list) else x for x in v)
    raise ConfigError(f"unsupported config: {key}={v!r} (expected an int or a list of {n} ints, one per block)")


def _per_layer(v: Any, layers: int, key: str) -> tuple[int, ...]:
    if _is_int(v):
        return (v,) * layers
    if isinstance(v, (list, tuple)) and len(v) == layers and all(_is_int(x) for x in v):
        return tuple(v)
    raise ConfigError(f"unsupported config: {key}={v!r} (expected an int or a list of {layers} ints)")
