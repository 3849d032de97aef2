# Copyright 2026 the punet authors. Apache-2.0.
"""The Brevitas / AMD interchange format: a folder with config.json, params.safetensors, quant_params.json.

As published in `amd-shark/sdxl-quant-models` (unet/int8/) and read by
sharktank's `import_brevitas_dataset`:

- params.safetensors: float weights under diffusers keys after
  `fuse_qkv_projections()`: `attn1.to_qkv.weight` (3D, D) and
  `attn2.to_kv.weight` (2D, Dctx) (`attn2.to_q` stays unfused). The unfused
  to_q/to_k/to_v may be present too; the fused ones are used. Weights have
  absorbed the SmoothQuant factors.
- quant_params.json: one object per quantized layer (fused name for fused
  projections). Each tensor field is a number or a (nested) list with
  `<field>_shape` beside it; zero points carry `<field>_dtype`.

`read_folder` validates everything and returns the quantized archive's
tensors (int8 weights, split into diffusers' to_q/to_k/to_v, with their
scales: see scheme.py); `write_folder` writes an archive back in this format,
so that read(write(x)) == x bit for bit.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, UNetConfig
from ..errors import PunetError
from ..fileio import read_json_object
from .calibrate import quantize_weight
from ..tensors import load_tensors
from .scheme import INT8_MAX, INT8_MIN, group_layers, plan

QUANT_PARAMS = "quant_params.json"
PARAMS = "params.safetensors"
# Attention activation quantizers (the fp8 attention flow): Q, K, V and the softmax output, and
# the archive key (under the attention module) each becomes.
ATTENTION_QUANTIZERS = {"out_q": "q_scale", "out_k": "k_scale", "out_v": "v_scale", "output_softmax_quant": "softmax_scale"}
_ACT_FIELDS = {"act_scale", "act_zp"}
_ZP_DTYPES = {"torch.int8": 0, "torch.uint8": -128}  # offset into the signed int8 domain
_KNOWN_DTYPES = {"torch.int8", "torch.uint8", "torch.float8_e4m3fn", "torch.float8_e4m3fnuz", "torch.float32"}
_LAYER_FIELDS = {"smoothquant_mul", "input_scale", "input_zp", "weight_scale", "weight_zp", "output_scale"}


def is_brevitas_folder(folder: Path) -> bool:
    return (folder / QUANT_PARAMS).is_file()


class _Fields:
    """Reads one layer's JSON entry, each fault one line naming the file, layer and field."""

    def __init__(self, where: Path, layer: str, entry: Any):
        self.where, self.layer = where, layer
        if not isinstance(entry, dict):
            self.fail("", f"expected an object of quantization fields, got {type(entry).__name__}")
        self.entry = entry

    def only(self, allowed: set[str]) -> None:
        """Refuse a field (or its `_shape` / `_dtype`) that is not one of `allowed`."""
        for field in self.entry:
            if field.removesuffix("_shape").removesuffix("_dtype") not in allowed:
                self.fail(field, f"unknown field (expected: {', '.join(sorted(allowed))})")

    def fail(self, field: str, msg: str):
        at = f"{self.layer}.{field}" if field else self.layer
        raise PunetError(f"{self.where}: {at}: {msg}")

    def tensor(self, field: str, expect_numel: int | None = None) -> torch.Tensor | None:
        if field not in self.entry:
            return None
        value = self.entry[field]
        shape = self.entry.get(f"{field}_shape", [] if isinstance(value, (int, float)) else None)
        if shape is None:
            self.fail(field, f"has no {field}_shape beside it")
        try:
            t = torch.tensor(value, dtype=torch.float64)
        except (TypeError, ValueError):
            self.fail(field, "expected a number or a (nested) list of numbers")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            self.fail(f"{field}_shape", f"expected a list of sizes, got {shape!r}")
        if t.numel() != math.prod(shape):
            self.fail(f"{field}_shape", f"{shape} holds {math.prod(shape)} values, the list has {t.numel()}")
        if expect_numel is not None and t.numel() != expect_numel:
            self.fail(field, f"has {t.numel()} values ({shape}), the layer needs {expect_numel}")
        if not torch.isfinite(t).all():
            self.fail(field, "has NaN or inf values")
        return t.reshape(shape)

    def scale(self, field: str, expect_numel: int | None = None, required: bool = True) -> torch.Tensor | None:
        t = self.tensor(field, expect_numel)
        if t is None:
            if required:
                self.fail(field, "missing (every quantized layer needs it)")
            return None
        if (t <= 0).any():
            self.fail(field, "has zero or negative values (a scale must be > 0)")
        return t.to(torch.float32)

    def zero_point(self, field: str, expect_numel: int) -> torch.Tensor | None:
        t = self.tensor(field, expect_numel)
        if t is None:
            return None
        dtype = self.entry.get(f"{field}_dtype", "torch.int8")
        if dtype not in _KNOWN_DTYPES:
            self.fail(f"{field}_dtype", f"unknown dtype string {dtype!r} (expected e.g. 'torch.int8')")
        if dtype not in _ZP_DTYPES:
            self.fail(f"{field}_dtype", f"{dtype} weights are not int8 (punet reads int8 and uint8 zero points)")
        t = t + _ZP_DTYPES[dtype]
        if (t != t.round()).any() or (t < INT8_MIN).any() or (t > INT8_MAX).any():
            self.fail(field, "expected integers in the int8 range")
        return t.to(torch.int8)


def read_folder(folder: Path) -> tuple[UNetConfig, dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(config, config.json as found, quantized archive tensors, quantization metadata) of a Brevitas folder."""
    try:
        config = UNetConfig.from_json(folder / "config.json")
    except ConfigError as e:
        raise PunetError(str(e)) from None
    config_json = read_json_object(folder / "config.json", "a diffusers UNet config.json")
    qpath = folder / QUANT_PARAMS
    quant = read_json_object(qpath, "Brevitas quantization parameters")
    params = load_tensors(folder / PARAMS)
    layers = plan(config)
    groups = group_layers(layers)

    attention_scales = {}
    for name in quant:
        parent, _, leaf = name.rpartition(".")
        if leaf in ATTENTION_QUANTIZERS and parent.rpartition(".")[2] in ("attn1", "attn2"):
            attention_scales[name] = quant[name]
        elif name not in groups:
            raise PunetError(f"{qpath}: layer {name!r} is not a quantizable layer of the model config.json describes")
    missing = [g for g in groups if g not in quant]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise PunetError(f"{qpath}: no entry for quantized layer {missing[0]!r}{more}")
    fp8_dtype = ""
    attention_state: dict[str, torch.Tensor] = {}
    if attention_scales:
        from .scheme import attention_modules

        attentions = set(attention_modules(config))
        for name, entry in attention_scales.items():
            attn, _, leaf = name.rpartition(".")
            f = _Fields(qpath, name, entry)
            f.only(_ACT_FIELDS)
            if attn not in attentions:
                raise PunetError(f"{qpath}: layer {name!r}: no attention {attn!r} in the model config.json describes")
            zp = f.tensor("act_zp", 1)
            if zp is not None and (zp != 0).any():
                f.fail("act_zp", "is nonzero; punet's fp8 quantizers are symmetric")
            dtype = f.entry.get("act_zp_dtype")
            if dtype not in _KNOWN_DTYPES:
                f.fail("act_zp_dtype", f"unknown dtype string {dtype!r} (expected torch.float8_e4m3fn or torch.float8_e4m3fnuz)")
            if not dtype.startswith("torch.float8"):
                f.fail("act_zp_dtype", f"{dtype}: attention quantizers must be fp8")
            if fp8_dtype and dtype.removeprefix("torch.") != fp8_dtype:
                f.fail("act_zp_dtype", f"{dtype} differs from the other attention quantizers' torch.{fp8_dtype}")
            fp8_dtype = dtype.removeprefix("torch.")
            attention_state[f"{attn}.{ATTENTION_QUANTIZERS[leaf]}"] = f.scale("act_scale", 1).reshape(())
        for attn in sorted(attentions):
            for leaf, key in ATTENTION_QUANTIZERS.items():
                if f"{attn}.{key}" not in attention_state:
                    raise PunetError(f"{qpath}: no entry for attention quantizer {attn}.{leaf!r} (the fp8 scheme needs all four)")

    from ..weights import expected_shapes

    expected = expected_shapes(config)
    quantized_keys = {f"{layer.name}.weight" for layer in layers}
    fused = {g: members for g, members in groups.items() if len(members) > 1}
    fused_keys = {f"{g}.{p}" for g in fused for p in ("weight", "bias")}
    fused_members = {m.name for members in fused.values() for m in members}
    state: dict[str, torch.Tensor] = {}
    for key, shape in expected.items():
        if key in quantized_keys:
            continue
        if key not in params:
            if key.rpartition(".")[0] in fused_members:
                continue  # comes from the fused tensor
            raise PunetError(f"{folder / PARAMS}: missing tensor {key!r} (required by config.json)")
        if tuple(params[key].shape) != shape:
            raise PunetError(f"{folder / PARAMS}: tensor {key!r} has shape {list(params[key].shape)}, config.json implies {list(shape)}")
        state[key] = params[key]
    unexpected = [k for k in params if k not in expected and k not in fused_keys]
    if unexpected:
        raise PunetError(f"{folder / PARAMS}: unexpected tensor {unexpected[0]!r} (not in the model config.json describes)")
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    if len(dtypes) != 1:
        raise PunetError(f"{folder / PARAMS}: float tensors have dtypes {dtypes}; expected one")

    asymmetric = []
    for group, members in groups.items():
        f = _Fields(qpath, group, quant[group])
        f.only(_LAYER_FIELDS)
        if "output_scale" in f.entry:
            f.fail("output_scale", "the fp8 layer flow (output quantizer) is not supported: punet imports int8 layers")
        first = members[0]
        wkey = f"{group}.weight"
        if wkey not in params:
            raise PunetError(f"{folder / PARAMS}: missing tensor {wkey!r} (quant_params.json quantizes {group!r})")
        w = params[wkey]
        rows = sum(m.out_features for m in members)
        want = (rows,) + first.weight_shape[1:]
        if tuple(w.shape) != want:
            raise PunetError(f"{folder / PARAMS}: tensor {wkey!r} has shape {list(w.shape)}, the model needs {list(want)}")
        input_scale = f.scale("input_scale", 1).reshape(())
        zp_in = f.tensor("input_zp", 1)
        if zp_in is not None and (zp_in != 0).any():
            f.fail("input_zp", f"is {zp_in.reshape(-1)[0].item():g}; punet's activations are symmetric (zero point 0)")
        if "input_zp_dtype" in f.entry and f.entry["input_zp_dtype"] not in _KNOWN_DTYPES:
            f.fail("input_zp_dtype", f"unknown dtype string {f.entry['input_zp_dtype']!r} (expected e.g. 'torch.int8')")
        if f.entry.get("input_zp_dtype", "torch.int8") != "torch.int8":
            f.fail("input_zp_dtype", f"{f.entry['input_zp_dtype']} activations are not supported (expected torch.int8)")
        mul = f.scale("smoothquant_mul", first.in_features, required=False)
        mul = torch.ones(first.in_features) if mul is None else mul.reshape(-1)
        wscale = f.scale("weight_scale", rows).reshape(-1)
        zp = f.zero_point("weight_zp", rows)
        zp = None if zp is None else zp.reshape(-1)
        if zp is not None and bool((zp != 0).any()):
            asymmetric += [m.name for m in members]
        else:
            zp = None
        bias = params.get(f"{group}.bias") if group in fused else None
        offset = 0
        for m in members:
            rows_m = slice(offset, offset + m.out_features)
            offset += m.out_features
            state[f"{m.name}.weight"] = quantize_weight(w[rows_m], wscale[rows_m], None if zp is None else zp[rows_m])
            state[f"{m.name}.weight_scale"] = wscale[rows_m].clone()
            state[f"{m.name}.input_scale"] = input_scale.clone()
            state[f"{m.name}.smoothquant_mul"] = mul.clone()
            if zp is not None:
                state[f"{m.name}.weight_zp"] = zp[rows_m].clone()
            if bias is not None:
                state[f"{m.name}.bias"] = bias[rows_m].clone()
    state.update(attention_state)
    quantization = {
        "scheme": "int8-fp8attn" if fp8_dtype else "int8",
        "layers": len(layers),
        "asymmetric": asymmetric,
        **({"fp8_dtype": fp8_dtype} if fp8_dtype else {}),
        "method": "brevitas",
    }
    return config, config_json, state, quantization


def write_folder(
    folder: str | Path, config: UNetConfig, config_json: dict[str, Any], state: dict[str, torch.Tensor], fp8_dtype: str = ""
) -> Path:
    """Write a quantized archive's tensors as a Brevitas folder (atomically: a temporary folder, then renamed).

    Weights are written dequantized, (q - zp) * scale, in float32: exact, so reading them back
    gives the same int8 codes.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise PunetError(f"-o {folder}: exists and is not a folder (--format brevitas writes a folder)")
    if folder.is_dir() and any(folder.iterdir()):
        raise PunetError(f"-o {folder}: folder is not empty")
    layers = plan(config)
    groups = group_layers(layers)
    layer_names = {m.name for m in layers}
    attention_keys = set(ATTENTION_QUANTIZERS.values())
    params = {
        k: v for k, v in state.items()
        if k.rpartition(".")[0] not in layer_names and k.rpartition(".")[2] not in attention_keys
    }
    quant: dict[str, Any] = {}
    for group, members in groups.items():
        weights, biases = [], []
        for m in members:
            q = state[f"{m.name}.weight"].float()
            zp = state.get(f"{m.name}.weight_zp")
            shape = (-1,) + (1,) * (q.dim() - 1)
            if zp is not None:
                q = q - zp.float().view(shape)
            weights.append(q * state[f"{m.name}.weight_scale"].view(shape))
            if f"{m.name}.bias" in state:
                biases.append(state[f"{m.name}.bias"])
        params[f"{group}.weight"] = torch.cat(weights)
        if biases:
            params[f"{group}.bias"] = torch.cat(biases)
        first = members[0].name
        wscale = torch.cat([state[f"{m.name}.weight_scale"] for m in members])
        ndim = state[f"{first}.weight"].dim()
        entry = {
            "smoothquant_mul": state[f"{first}.smoothquant_mul"].tolist(),
            "smoothquant_mul_shape": [1, members[0].in_features],
            "input_scale": state[f"{first}.input_scale"].item(),
            "input_scale_shape": [],
            "input_zp": 0,
            "input_zp_shape": [],
            "input_zp_dtype": "torch.int8",
            "weight_scale": wscale.tolist(),
            "weight_scale_shape": [wscale.numel()] + [1] * (ndim - 1),
        }
        if f"{first}.weight_zp" in state:
            zp = torch.cat([state[f"{m.name}.weight_zp"] for m in members])
            entry.update(weight_zp=zp.tolist(), weight_zp_shape=[zp.numel()] + [1] * (ndim - 1), weight_zp_dtype="torch.int8")
        quant[group] = entry
    if fp8_dtype:
        from .scheme import attention_modules

        for attn in attention_modules(config):
            for leaf, key in ATTENTION_QUANTIZERS.items():
                quant[f"{attn}.{leaf}"] = {
                    "act_scale": state[f"{attn}.{key}"].item(), "act_scale_shape": [],
                    "act_zp": 0.0, "act_zp_shape": [], "act_zp_dtype": f"torch.{fp8_dtype}",
                }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        (tmp / QUANT_PARAMS).write_text(json.dumps(quant) + "\n")
        save_file({k: v.contiguous() for k, v in params.items()}, str(tmp / PARAMS), metadata={"format": "pt"})
        if folder.is_dir():
            folder.rmdir()
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
