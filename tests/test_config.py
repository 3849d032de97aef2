"""config.json parsing: real checkpoints accepted, everything unimplemented refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from punet import ConfigError, UNetConfig, UNet2DConditionModel

from .conftest import CONFIG_DIR, diffusers_kwargs

REAL = sorted(CONFIG_DIR.glob("*.json"))

# Known facts of the published checkpoints: parameter counts as diffusers builds them.
PARAMS = {
    "sdxl-base-1.0-unet.json": 2_567_463_684,
    "sdxl-turbo-unet.json": 2_567_463_684,
}


@pytest.mark.parametrize("path", REAL, ids=lambda p: p.stem)
def test_real_configs_match_diffusers_on_meta(path):
    """Every real config builds on meta with diffusers' exact key set, shapes and parameter count."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    cfg = UNetConfig.from_json(path)
    with torch.device("meta"):
        ours = UNet2DConditionModel(cfg)
        ref = DiffusersUNet(**diffusers_kwargs(json.loads(path.read_text())))
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert a == b
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters())
    if path.name in PARAMS:
        assert n == PARAMS[path.name]


def test_family_specifics():
    sd15 = UNetConfig.from_json(CONFIG_DIR / "sd-1.5-unet.json")
    assert sd15.heads == (8, 8, 8, 8)  # attention_head_dim holds the head count
    assert not sd15.use_linear_projection and not sd15.has_text_time
    sd21 = UNetConfig.from_json(CONFIG_DIR / "sd-2.1-unet.json")
    assert sd21.heads == (5, 10, 20, 20) and sd21.upcast_attention and sd21.cross_attention_dim == 1024
    xl = UNetConfig.from_json(CONFIG_DIR / "sdxl-base-1.0-unet.json")
    assert xl.transformer_layers_per_block == ((1, 1), (2, 2), (10, 10))
    assert xl.up_transformer_layers == ((10, 10, 10), (2, 2, 2), (1, 1, 1))
    refiner = UNetConfig.from_json(CONFIG_DIR / "sdxl-refiner-1.0-unet.json")
    assert refiner.block_out_channels == (384, 768, 1536, 1536)
    assert refiner.projection_class_embeddings_input_dim == 2560


def _base() -> dict:
    return json.loads((CONFIG_DIR / "sdxl-base-1.0-unet.json").read_text())


@pytest.mark.parametrize(
    "key,value",
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("time_embedding_type", "fourier"),
        ("act_fn", "gelu"),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("dual_cross_attention", True),
        ("encoder_hid_dim_type", "text_proj"),
        ("time_cond_proj_dim", 256),
        ("attention_type", "gated"),
        ("only_cross_attention", True),
        ("resnet_out_scale_factor", 2.0),
        ("down_block_types", ["DownBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"]),
    ],
)
def test_unsupported_value_names_key_and_value(key, value):
    d = _base()
    d[key] = value
    with pytest.raises(ConfigError) as e:
        UNetConfig.from_dict(d)
    msg = str(e.value)
    assert key in msg and (repr(value) in msg or repr(value[1]) in msg)


def test_exact_message_for_class_embed_type():
    d = _base()
    d["class_embed_type"] = "timestep"
    with pytest.raises(ValueError, match=r"^unsupported config: class_embed_type='timestep'"):
        UNetConfig.from_dict(d)


def test_unknown_key_is_an_error():
    d = _base()
    d["atention_head_dim"] = 8  # typo
    with pytest.raises(ConfigError, match="atention_head_dim"):
        UNetConfig.from_dict(d)


def test_bad_files(tmp_path):
    bad = tmp_path / "config.json"
    bad.write_text('{"in_channels": 4,')
    with pytest.raises(ConfigError, match=r"config.json: malformed JSON at line 1"):
        UNetConfig.from_json(bad)
    with pytest.raises(ConfigError, match="file not found"):
        UNetConfig.from_json(tmp_path / "missing.json")
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        UNetConfig.from_json(bad)


def test_list_length_mismatch():
    d = _base()
    d["attention_head_dim"] = [5, 10]
    with pytest.raises(ConfigError, match="attention_head_dim"):
        UNetConfig.from_dict(d)


def test_num_attention_heads_takes_precedence():
    d = _base()
    d["attention_head_dim"] = [1, 1, 1]
    d["num_attention_heads"] = [5, 10, 20]
    assert UNetConfig.from_dict(d).heads == (5, 10, 20)


def test_to_dict_round_trips():
    for path in REAL:
        cfg = UNetConfig.from_json(path)
        assert UNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
