# Copyright 2026 the punet authors. Apache-2.0.
"""Post-training quantization of a float archive: `punet quantize`.

1. Run the float model on calibration inputs and record, for every quantized
   layer's input, the max |x| of each input channel.
2. SmoothQuant per input group (layers that read the same tensor share it):
   s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); the weights absorb s, the
   input is multiplied by 1/s (`smoothquant_mul`).
3. Static per-tensor input scale max|x * smoothquant_mul| / 127, and
   per-output-channel symmetric int8 weights max|W'_n| / 127.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import UNetConfig
from ..errors import PunetError
from .scheme import FP8_DTYPES, INT8_MAX, INT8_MIN, LayerPlan, get_scheme, group_layers, plan

DEFAULT_ALPHA = 0.5
DEFAULT_SAMPLES = 4
DEFAULT_SIZE = 256  # pixels: the calibration inputs' height and width


def quantize_weight(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None = None) -> torch.Tensor:
    """int8 codes of float32 `w` (out, ...) with per-output-channel `scale` (out,) and zero point."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = torch.round(w.float() / scale.float().view(shape))
    if zp is not None:
        q = q + zp.float().view(shape)
    return torch.clamp(q, INT8_MIN, INT8_MAX).to(torch.int8)


def _channel_max(x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    dims = [d for d in range(x.dim()) if d != channel_dim]
    return x.detach().abs().amax(dim=dims).double()


def _keep_max(stats: dict[str, torch.Tensor], key: str, m: torch.Tensor) -> None:
    stats[key] = m if key not in stats else torch.maximum(stats[key], m)


def collect_maxima(
    model: torch.nn.Module,
    layers: list[LayerPlan],
    inputs: list[dict[str, torch.Tensor]],
    *,
    attention: bool = False,
    on_sample=None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """One pass of the float model over the calibration inputs, recording two maxima.

    Per input group, the max |x| of each input channel; with `attention`, per attention module `A`
    the max |Q|, |K|, |V| (keys `A.q`, `A.k`, `A.v`).
    """
    from ..eager import call_model
    from ..model.layers import Attention

    inputs_max: dict[str, torch.Tensor] = {}
    attention_max: dict[str, torch.Tensor] = {}

    def input_hook(layer: LayerPlan):
        channel_dim = 1 if layer.kind == "conv" else -1

        def hook(_module, args):
            _keep_max(inputs_max, layer.group, _channel_max(args[0], channel_dim % args[0].dim()))

        return hook

    def output_hook(key: str):
        def hook(_module, _args, out):
            _keep_max(attention_max, key, out.detach().abs().max().double())

        return hook

    handles = [model.get_submodule(layer.name).register_forward_pre_hook(input_hook(layer)) for layer in layers]
    if attention:
        for name, m in model.named_modules():
            if isinstance(m, Attention):
                handles += [getattr(m, f"to_{p}").register_forward_hook(output_hook(f"{name}.{p}")) for p in "qkv"]
    try:
        for i, tensors in enumerate(inputs):
            call_model(model, tensors)
            if on_sample:
                on_sample(i + 1, len(inputs))
    finally:
        for h in handles:
            h.remove()
    return inputs_max, attention_max


def fp8_attention_scales(stats: dict[str, torch.Tensor], fp8_dtype: str) -> dict[str, torch.Tensor]:
    """q/k/v scales max|x| / fp8 max, and the softmax output's 1 / fp8 max (probabilities are <= 1)."""
    fmax = float(torch.finfo(FP8_DTYPES[fp8_dtype]).max)
    out = {}
    for key, m in stats.items():
        attn, _, p = key.rpartition(".")
        out[f"{attn}.{p}_scale"] = torch.tensor(m.item() / fmax if m > 0 else 1.0, dtype=torch.float32)
        out[f"{attn}.softmax_scale"] = torch.tensor(1.0 / fmax, dtype=torch.float32)
    return out


def smooth_and_quantize(
    state: dict[str, torch.Tensor], layers: list[LayerPlan], input_max: dict[str, torch.Tensor], alpha: float
) -> dict[str, torch.Tensor]:
    """The quantized archive's tensors for `layers` (weight, weight_scale, input_scale, smoothquant_mul)."""
    out: dict[str, torch.Tensor] = {}
    for group, members in group_layers(layers).items():
        a = input_max.get(group)
        if a is None:
            raise PunetError(f"calibration: layer {members[0].name!r} never ran (no input recorded)")
        weights = [state[f"{m.name}.weight"].double() for m in members]
        w_max = torch.stack([_channel_max(w, 1) for w in weights]).amax(0)  # (in,)
        s = a.clamp(min=1e-5) ** alpha / w_max.clamp(min=1e-5) ** (1 - alpha)
        s = torch.where((a > 0) & (w_max > 0), s, torch.ones_like(s))
        mul = (1.0 / s).float()
        x_max = (a * mul.double()).max().item()
        input_scale = torch.tensor(x_max / INT8_MAX if x_max > 0 else 1.0, dtype=torch.float32)
        for m, w in zip(members, weights):
            shape = (1, -1) + (1,) * (w.dim() - 2)
            ws = (w * s.view(shape)).float()  # the weight absorbs the smoothing factor
            row_max = ws.abs().reshape(ws.shape[0], -1).amax(1)
            scale = torch.where(row_max > 0, row_max / INT8_MAX, torch.ones_like(row_max))
            out[f"{m.name}.weight"] = quantize_weight(ws, scale)
            out[f"{m.name}.weight_scale"] = scale
            out[f"{m.name}.input_scale"] = input_scale.clone()
            out[f"{m.name}.smoothquant_mul"] = mul.clone()
    return out


def calibration_inputs(
    config: UNetConfig, samples: int, seed: int, height: int, width: int, dtype: str
) -> list[dict[str, torch.Tensor]]:
    """`samples` SDXL-shaped random inputs, timesteps spread evenly from 999 down to 0."""
    from ..signature import Signature, make_inputs

    if samples < 1:
        raise PunetError(f"--calibration-samples must be >= 1, got {samples}")
    sig = Signature(1, height, width, dtype)  # eager: any size the model takes
    out = []
    for i in range(samples):
        tensors = make_inputs(config, sig, seed + i)
        t = 999.0 if samples == 1 else round(999 * (1 - i / (samples - 1)))
        tensors["timestep"] = torch.full_like(tensors["timestep"], t)
        out.append(tensors)
    return out


def quantize_archive(
    irpa: str | Path,
    output: str | Path,
    *,
    scheme: str = "int8",
    alpha: float = DEFAULT_ALPHA,
    calibration_inputs_file: str | Path | None = None,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    height: int = DEFAULT_SIZE,
    width: int = DEFAULT_SIZE,
    fmt: str = "irpa",
    fp8_dtype: str = "float8_e4m3fn",
    progress: Callable[[str], None] | None = None,
    on_sample: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Calibrate and quantize the float archive `irpa` into `output`; return its metadata.

    `fmt` "irpa": a quantized archive; "brevitas": a Brevitas folder (config.json,
    params.safetensors, quant_params.json) that `punet import` reads back bit-exactly.
    """
    from ..fileio import check_output
    from ..tensors import load_tensors
    from ..weights import load_model, read_metadata, write_irpa

    sch = get_scheme(scheme)
    if fp8_dtype not in FP8_DTYPES:
        raise PunetError(f"--fp8-dtype {fp8_dtype}: expected one of {', '.join(FP8_DTYPES)}")
    if not 0.0 <= alpha <= 1.0:
        raise PunetError(f"--smoothquant-alpha must be within [0, 1], got {alpha}")
    if fmt not in ("irpa", "brevitas"):
        raise PunetError(f"--format {fmt}: expected irpa or brevitas")
    irpa = Path(irpa)
    meta = read_metadata(irpa)
    if meta.get("quantization"):
        raise PunetError(f"{irpa}: already quantized ({meta['quantization']['scheme']}); quantize a float archive")
    if fmt == "irpa":
        check_output(output)
    model, config = load_model(irpa)
    layers = plan(config)
    if calibration_inputs_file is not None:
        from ..signature import check_inputs, signature_from_inputs

        tensors = load_tensors(calibration_inputs_file)
        sig = signature_from_inputs(config, tensors, str(calibration_inputs_file))
        check_inputs(config, sig, tensors, str(calibration_inputs_file))
        inputs = [tensors]
        calibration = {"inputs": str(calibration_inputs_file), "batch": sig.batch}
    else:
        inputs = calibration_inputs(config, samples, seed, height, width, meta["dtype"])
        calibration = {"samples": samples, "seed": seed, "height": height, "width": width, "timesteps": "999..0, evenly"}
    if progress:
        progress(f"calibrating {len(layers)} layers on {len(inputs)} input(s)")
    input_max, attention_max = collect_maxima(model, layers, inputs, attention=sch.fp8_attention, on_sample=on_sample)
    state = {k: v for k, v in model.state_dict().items()}
    state.update(smooth_and_quantize(state, layers, input_max, alpha))
    if sch.fp8_attention:
        state.update(fp8_attention_scales(attention_max, fp8_dtype))
    quantization = {
        "scheme": scheme,
        "layers": len(layers),
        "asymmetric": [],
        **({"fp8_dtype": fp8_dtype} if sch.fp8_attention else {}),
        "method": "punet quantize",
        "smoothquant_alpha": alpha,
        "calibration": calibration,
        "float_archive": {"path": str(irpa), "weights_sha256": meta["weights_sha256"]},
    }
    keep = {k: meta[k] for k in ("source", "source_dir", "revision", "variant", "dtype", "config", "config_json")}
    if fmt == "brevitas":
        from .brevitas import write_folder

        if progress:
            progress(f"writing {output}/ (Brevitas format)")
        write_folder(output, config, meta["config_json"], state, quantization.get("fp8_dtype", ""))
        return {**keep, "quantization": quantization}
    return write_irpa(output, state, {**keep, "quantization": quantization}, progress)
