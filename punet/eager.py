"""Eager stages: run punet's torch model on an .irpa, run diffusers as the reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import UNetConfig
from .errors import PunetError
from .signature import Signature, dtype_from_name, dtype_name, make_inputs, signature_from_inputs
from .tensors import load_tensors, save_tensors


def call_model(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One UNet step on signature-named tensors (the CFG step when guidance_scale is present)."""
    from .model import GuidedUNet

    if "guidance_scale" in tensors and not isinstance(model, GuidedUNet):
        model = GuidedUNet(model)
    with torch.inference_mode():
        return model(**tensors)


def prepare_inputs(
    config: UNetConfig,
    *,
    inputs: str | Path | None,
    sig: Signature | None,
    seed: int = 0,
    save_inputs: str | Path | None = None,
) -> tuple[Signature, dict[str, torch.Tensor]]:
    """Inputs from a file (checked against the config) or made from `sig` and `seed`."""
    if inputs is not None:
        tensors = load_tensors(inputs)
        sig = signature_from_inputs(config, tensors, str(inputs))
    else:
        assert sig is not None
        tensors = make_inputs(config, sig, seed)
    if save_inputs is not None:
        save_tensors(save_inputs, tensors)
    return sig, tensors


def cast_inputs(tensors: dict[str, torch.Tensor], sig: Signature, dtype: str) -> dict[str, torch.Tensor]:
    """Cast the model-dtype inputs (not timestep/time_ids/guidance) to `dtype`."""
    src = dtype_from_name(sig.dtype)
    return {k: v.to(dtype_from_name(dtype)) if v.dtype == src and k in _MODEL_DTYPE_INPUTS else v for k, v in tensors.items()}


_MODEL_DTYPE_INPUTS = ("sample", "encoder_hidden_states", "text_embeds")


def run_eager(
    irpa: str | Path,
    output: str | Path,
    *,
    inputs: str | Path | None = None,
    sig: Signature | None = None,
    seed: int = 0,
    save_inputs: str | Path | None = None,
    dtype: str | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """punet's torch model on the .irpa's weights; writes {"sample": noise} to `output`."""
    from .weights import load_model, read_metadata

    meta = read_metadata(irpa)
    dtype = dtype or (sig.dtype if sig and inputs is None else None) or meta["dtype"]
    model, config = load_model(irpa, dtype=dtype, device=device)
    # float64 (the exact reference of a quantized model) runs on float32 inputs made float64.
    sig_dtype = "float32" if dtype == "float64" else dtype
    if sig is not None and inputs is None and sig.dtype != sig_dtype:
        sig = Signature(sig.batch, sig.height, sig.width, sig_dtype, sig.tokens, sig.cfg)
    sig, tensors = prepare_inputs(config, inputs=inputs, sig=sig, seed=seed, save_inputs=save_inputs)
    if dtype == "float64":
        tensors = {k: v.double() if v.is_floating_point() else v for k, v in tensors.items()}
    else:
        tensors = cast_inputs(tensors, sig, dtype)
    tensors = {k: v.to(device) for k, v in tensors.items()}
    out = call_model(model, tensors)
    save_tensors(output, {"sample": out}, metadata={"producer": "punet-eager", "dtype": dtype, "device": device})
    return {"signature": sig, "dtype": dtype, "device": device, "output": str(output)}


def diffusers_model(source: str | Path, dtype: str = "float32", progress: Callable[[str], None] | None = None):
    """diffusers' UNet2DConditionModel from an import source or an .irpa."""
    try:
        from diffusers import UNet2DConditionModel as DiffusersUNet
        from diffusers.utils import logging as diffusers_logging
    except ImportError:
        raise PunetError(
            "punet reference needs diffusers, the reference implementation: pip install 'punet[test]'"
        ) from None
    from .weights import load_irpa, read_metadata, resolve_source

    # diffusers' notes ("accelerate was not found", "modules that should be kept in float32: []") are
    # not the user's business here.
    diffusers_logging.set_verbosity_error()
    torch_dtype = dtype_from_name(dtype)
    source = str(source)
    if source.endswith(".irpa"):
        meta = read_metadata(source)
        config, state = load_irpa(source)
        raw = {k: v for k, v in meta["config_json"].items() if not k.startswith("_")}
        model = DiffusersUNet(**raw)
        model.load_state_dict({k: v.to(torch_dtype) for k, v in state.items()}, strict=True)
        return model.to(torch_dtype).eval()
    src = resolve_source(source, progress=progress)
    UNetConfig.from_json(src.unet_dir / "config.json")  # the same strict check punet applies
    return DiffusersUNet.from_pretrained(str(src.unet_dir), torch_dtype=torch_dtype).eval()


def diffusers_call(model, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One diffusers UNet step on signature-named tensors (with CFG when guidance_scale is given)."""
    t = dict(tensors)
    scale = t.pop("guidance_scale", None)
    b = t["sample"].shape[0]
    timestep = t["timestep"].reshape(-1).expand(b)
    sample = t["sample"]
    if scale is not None:
        sample, timestep = torch.cat([sample, sample]), torch.cat([timestep, timestep])
    added = {k: t[k] for k in ("text_embeds", "time_ids") if k in t} or None
    with torch.inference_mode():
        noise = model(sample, timestep, t["encoder_hidden_states"], added_cond_kwargs=added).sample
    if scale is None:
        return noise
    uncond, text = noise.chunk(2)
    return uncond + scale.reshape(()).to(noise.dtype) * (text - uncond)


def run_reference(
    source: str | Path,
    output: str | Path,
    *,
    inputs: str | Path,
    dtype: str = "float32",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """diffusers' output for the inputs file; writes {"sample": noise} to `output`."""
    model = diffusers_model(source, dtype, progress)
    config = UNetConfig.from_dict(dict(model.config))
    tensors = load_tensors(inputs)
    sig = signature_from_inputs(config, tensors, str(inputs))
    out = diffusers_call(model, cast_inputs(tensors, sig, dtype))
    save_tensors(output, {"sample": out}, metadata={"producer": "diffusers", "dtype": dtype_name(out.dtype)})
    return {"signature": sig, "dtype": dtype}
