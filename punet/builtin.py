"""Built-in models: small configs of each SD family and deterministic random weights.

`punet demo` runs on `builtin:tiny-sdxl` so that a fresh machine needs no
download. The checkpoints written here have the on-disk form of diffusers'
`save_pretrained` (config.json + diffusion_pytorch_model.safetensors), so
they go through exactly the import path a real checkpoint does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .config import UNetConfig
from .errors import PunetError
from .fileio import atomic_path, write_text_atomic

PREFIX = "builtin:"

_SDXL_COMMON = {
    "addition_embed_type": "text_time",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "use_linear_projection": True,
}

# Small configs, one per family, with the real block structure of each.
TINY_CONFIGS: dict[str, dict] = {
    # SDXL base: 3 levels, no attention at the top, deeper transformers below.
    "tiny-sdxl": {
        **_SDXL_COMMON,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "attention_head_dim": [1, 2, 4],
        "transformer_layers_per_block": [1, 1, 2],
        "layers_per_block": 2,
        "norm_num_groups": 8,
        "cross_attention_dim": 64,
        "addition_time_embed_dim": 16,
        "projection_class_embeddings_input_dim": 64 + 6 * 16,
        "sample_size": 32,
    },
    # SDXL refiner: 4 levels, attention only in the middle two, 5 time ids. The text
    # embedding keeps SDXL's pooled width of 1280: config.json does not say how many time
    # ids there are, and punet reads 5 only off a projection width of 1280 + 5 * step
    # (signature.num_time_ids), as for the real refiner.
    "tiny-sdxl-refiner": {
        **_SDXL_COMMON,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [16, 32, 48, 48],
        "attention_head_dim": [1, 2, 3, 3],
        "transformer_layers_per_block": 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 40,
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 1280 + 5 * 8,
        "sample_size": 32,
    },
    # SD 1.5: attention_head_dim is a single head count; conv proj_in/out.
    "tiny-sd15": {
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 32, 64, 64],
        "attention_head_dim": 2,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 48,
        "sample_size": 32,
    },
    # SD 2.x: linear projection, per-block head counts, upcast_attention.
    "tiny-sd2": {
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64, 64],
        "attention_head_dim": [1, 2, 4, 4],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 56,
        "use_linear_projection": True,
        "upcast_attention": True,
        "sample_size": 32,
    },
}


def config_dict(name: str) -> dict:
    try:
        d = TINY_CONFIGS[name]
    except KeyError:
        raise PunetError(
            f"unknown built-in model {PREFIX}{name} (expected one of: {', '.join(PREFIX + n for n in TINY_CONFIGS)})"
        ) from None
    return {"_class_name": "UNet2DConditionModel", **json.loads(json.dumps(d))}


def random_state_dict(
    shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Deterministic random weights: no value is exactly 0 or 1, norm scales near 1.

    Weights are N(0, 1/fan_in) so activations keep their scale through the
    network; biases and norm offsets are small and nonzero.
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=g)
        is_norm = ".norm" in key or key.startswith("norm") or "conv_norm_out" in key
        if key.endswith("weight") and len(shape) == 1 and is_norm:
            t = 1.0 + 0.1 * noise
        elif key.endswith("bias"):
            t = 0.05 * noise
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
            t = noise / math.sqrt(fan_in)
        out[key] = t.to(dtype)
    return out


def write_checkpoint(
    folder: str | Path, config: dict, *, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors with random weights."""
    from safetensors.torch import save_file

    from .weights import WEIGHTS_NAME, expected_shapes

    folder = Path(folder)
    cfg = UNetConfig.from_dict(config)
    state = random_state_dict(expected_shapes(cfg), seed, dtype)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / f"{WEIGHTS_NAME}.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    write_text_atomic(folder / "config.json", json.dumps(config, indent=2) + "\n")
    return folder


def materialize(spec: str, cache_dir: str | Path, seed: int = 0) -> Path:
    """Write the checkpoint named by `builtin:NAME` under `cache_dir`; return its folder."""
    name = spec[len(PREFIX) :]
    config = config_dict(name)
    folder = Path(cache_dir) / f"{name}-seed{seed}"
    config_file = folder / "config.json"
    # A checkpoint cached by an older punet whose built-in config differed is written again.
    if not config_file.is_file() or json.loads(config_file.read_text()) != config:
        write_checkpoint(folder, config, seed=seed)
    return folder
