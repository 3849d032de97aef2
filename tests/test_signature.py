"""punet.signature, the contract between stages: names, shapes and dtypes against known values."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from punet import UNetConfig
from punet.builtin import config_dict
from punet.errors import PunetError
from punet.signature import (
    ENTRY_CFG,
    ENTRY_MAIN,
    Signature,
    TensorSpec,
    check_fits,
    check_inputs,
    deepest_latent,
    dtype_from_name,
    dtype_name,
    make_inputs,
    num_time_ids,
    signature_from_inputs,
    text_embeds_width,
)

from .conftest import CONFIG_DIR

SDXL = UNetConfig.from_json(CONFIG_DIR / "sdxl-base-1.0-unet.json")
REFINER = UNetConfig.from_json(CONFIG_DIR / "sdxl-refiner-1.0-unet.json")
SD15 = UNetConfig.from_json(CONFIG_DIR / "sd-1.5-unet.json")
TINY = UNetConfig.from_dict(config_dict("tiny-sdxl"))


def test_dtype_names():
    for name, dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        assert dtype_from_name(name) is dtype and dtype_name(dtype) == name
    assert TensorSpec("x", (1,), "bfloat16").torch_dtype is torch.bfloat16
    with pytest.raises(PunetError, match=r"unknown dtype 'float8' \(expected one of: float32, float16, bfloat16\)"):
        dtype_from_name("float8")
    with pytest.raises(PunetError, match=r"unsupported dtype torch.int32 \(expected one of: float32, float16"):
        dtype_name(torch.int32)


def test_time_ids_and_text_width():
    assert (num_time_ids(SDXL), text_embeds_width(SDXL)) == (6, 1280)
    assert (num_time_ids(REFINER), text_embeds_width(REFINER)) == (5, 1280)
    # A width that is not OpenCLIP bigG's 1280 either way: the base layout.
    assert (num_time_ids(TINY), text_embeds_width(TINY)) == (6, 64)
    narrow = UNetConfig.from_dict({**config_dict("tiny-sdxl"), "projection_class_embeddings_input_dim": 6 * 16})
    with pytest.raises(PunetError, match=r"input_dim=96 leaves no room .* 6 time ids of width 16"):
        text_embeds_width(narrow)


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"batch": 0}, "batch must be >= 1, got 0"),
        ({"height": 60}, "height must be a positive multiple of 8 pixels, got 60"),
        ({"width": 0}, "width must be a positive multiple of 8 pixels, got 0"),
        ({"width": 4}, "width must be a positive multiple of 8 pixels, got 4"),
        ({"dtype": "f16"}, r"unknown dtype 'f16' \(expected one of: float32, float16, bfloat16\)"),
    ],
)
def test_signature_refuses(kw, message):
    with pytest.raises(PunetError, match=message):
        Signature(**{"batch": 1, "height": 64, "width": 64, **kw})


def test_smallest_signature_is_accepted():
    sig = Signature(1, 8, 8)
    assert (sig.dtype, sig.tokens, sig.cfg, sig.entry) == ("float32", 77, False, ENTRY_MAIN)


def test_sdxl_inputs_and_output():
    sig = Signature(2, 1024, 768, "float16")
    specs = sig.inputs(SDXL)
    assert [(s.name, s.shape, s.dtype) for s in specs] == [
        ("sample", (2, 4, 128, 96), "float16"),
        ("timestep", (2,), "float32"),
        ("encoder_hidden_states", (2, 77, 2048), "float16"),
        ("text_embeds", (2, 1280), "float16"),
        ("time_ids", (2, 6), "float32"),
    ]
    out = sig.output(SDXL)
    assert (out.name, out.shape, out.dtype) == ("sample", (2, 4, 128, 96), "float16")
    assert sig.to_dict() == {"batch": 2, "height": 1024, "width": 768, "dtype": "float16", "tokens": 77, "cfg": False,
                             "serving": False, "scheduled": False, "module_name": "module", "quant": "", "fp8": "",
                             "tp": 1, "dp": 1}
    assert Signature(**sig.to_dict()) == sig  # the dict in .signature.json and build records rebuilds it


def test_cfg_inputs_have_negative_and_positive_rows():
    sig = Signature(2, 512, 512, tokens=7, cfg=True)
    assert sig.entry == ENTRY_CFG
    shapes = {s.name: s.shape for s in sig.inputs(SDXL)}
    assert shapes == {
        "sample": (2, 4, 64, 64),
        "timestep": (2,),
        "encoder_hidden_states": (4, 7, 2048),
        "text_embeds": (4, 1280),
        "time_ids": (4, 6),
        "guidance_scale": (1,),
    }
    assert list(shapes)[-1] == "guidance_scale"


def test_sd15_has_no_text_time_inputs():
    assert [s.name for s in Signature(1, 512, 512).inputs(SD15)] == ["sample", "timestep", "encoder_hidden_states"]
    assert Signature(1, 512, 512).inputs(SD15)[2].shape == (1, 77, 768)


def test_make_inputs_known_values():
    sig = Signature(2, 64, 96, "bfloat16", tokens=5, cfg=True)
    x = make_inputs(TINY, sig, seed=3)
    assert {k: (tuple(v.shape), v.dtype) for k, v in x.items()} == {
        s.name: (s.shape, s.torch_dtype) for s in sig.inputs(TINY)
    }
    t = x["timestep"]
    assert t.dtype == torch.float32 and torch.equal(t, t.round()) and bool(((t >= 0) & (t < 1000)).all())
    assert torch.equal(x["time_ids"], torch.tensor([[64.0, 96.0, 0.0, 0.0, 64.0, 96.0]] * 4))
    assert torch.equal(x["guidance_scale"], torch.tensor([7.5]))
    for k in ("sample", "encoder_hidden_states", "text_embeds"):  # N(0, 1): not constant, mean near 0
        v = x[k].float()
        assert v.std() > 0.5 and v.mean().abs() < 0.5, k
    again = make_inputs(TINY, sig, seed=3)
    assert all(torch.equal(x[k], again[k]) for k in x)
    other = make_inputs(TINY, sig, seed=4)
    assert not torch.equal(x["sample"], other["sample"])


def test_make_inputs_refiner_time_ids():
    x = make_inputs(REFINER, Signature(1, 1024, 1024, tokens=2), 0)
    assert torch.equal(x["time_ids"], torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 6.0]]))


def test_check_inputs_names_the_problem():
    sig = Signature(1, 64, 64, tokens=7)
    x = make_inputs(TINY, sig, 0)
    check_inputs(TINY, sig, x, "in.safetensors")
    cases = [
        (dict(x, extra=torch.zeros(1)), r"in.safetensors: unexpected input 'extra' \(expected keys: "
                                        r"encoder_hidden_states, sample, text_embeds, time_ids, timestep\)"),
        ({k: v for k, v in x.items() if k != "time_ids"}, r"in.safetensors: missing input 'time_ids' "
                                                          r"\(expected shape \[1, 6\] float32\)"),
        (dict(x, sample=x["sample"][:, :3]), r"input 'sample' has shape \[1, 3, 8, 8\], expected \[1, 4, 8, 8\]"),
        (dict(x, timestep=x["timestep"].double()), r"input 'timestep' has dtype torch.float64, expected float32"),
    ]
    for tensors, message in cases:
        with pytest.raises(PunetError, match=message):
            check_inputs(TINY, sig, tensors, "in.safetensors")


def test_signature_from_inputs():
    sig = Signature(2, 64, 96, "float16", tokens=5, cfg=True)
    assert signature_from_inputs(TINY, make_inputs(TINY, sig, 0), "f") == sig
    plain = Signature(1, 128, 64, tokens=9)
    assert signature_from_inputs(TINY, make_inputs(TINY, plain, 0), "f") == plain


def test_signature_from_inputs_refuses():
    x = make_inputs(TINY, Signature(1, 64, 64, tokens=7), 0)
    with pytest.raises(PunetError, match="in.st: missing input 'sample'"):
        signature_from_inputs(TINY, {k: v for k, v in x.items() if k != "sample"}, "in.st")
    with pytest.raises(PunetError, match="in.st: missing input 'encoder_hidden_states'"):
        signature_from_inputs(TINY, {k: v for k, v in x.items() if k != "encoder_hidden_states"}, "in.st")
    with pytest.raises(PunetError, match=r"in.st: 'sample' must be 4-D .* got \[4, 8, 8\] and \[1, 7, 64\]"):
        signature_from_inputs(TINY, dict(x, sample=x["sample"][0]), "in.st")
    with pytest.raises(PunetError, match=r"got \[1, 4, 8, 8\] and \[7, 64\]"):
        signature_from_inputs(TINY, dict(x, encoder_hidden_states=x["encoder_hidden_states"][0]), "in.st")
    with pytest.raises(PunetError, match=r"^in.st: input 'text_embeds' has shape \[1, 63\], expected \[1, 64\]"):
        signature_from_inputs(TINY, dict(x, text_embeds=x["text_embeds"][:, :63]), "in.st")


def test_time_ids_fallback_and_narrowest_text_width():
    """Only 6 or 5 time ids are inferred (a width fitting 7 is the 6-id layout); 1-wide text embeds are valid."""
    seven = UNetConfig.from_dict({**config_dict("tiny-sdxl"), "projection_class_embeddings_input_dim": 1280 + 112})
    assert num_time_ids(seven) == 6 and text_embeds_width(seven) == 1280 + 16
    one = UNetConfig.from_dict({**config_dict("tiny-sdxl"), "projection_class_embeddings_input_dim": 6 * 16 + 1})
    assert text_embeds_width(one) == 1


def test_timesteps_cover_0_to_999():
    """Generated timesteps are integers drawn from the scheduler's whole range [0, 999]."""
    t = make_inputs(TINY, Signature(8192, 8, 8, tokens=1), 0)["timestep"]
    assert t.min() == 0 and t.max() == 999
    assert torch.equal(make_inputs(TINY, Signature(8192, 8, 8, tokens=1))["timestep"], t)  # seed 0 by default


def test_builtin_refiner_has_the_refiners_time_ids():
    """Bug: `builtin:tiny-sdxl-refiner`, described as the refiner's 5-time-id layout, read as 6 time ids next
    to a 16-wide text embedding (its projection width 24 + 5 * 8 is not the pooled 1280 + 5 * 8 that
    `num_time_ids` recognises). Reference: the real refiner config (5 ids: original size, crop, aesthetic score)."""
    tiny = UNetConfig.from_dict(config_dict("tiny-sdxl-refiner"))
    assert (num_time_ids(tiny), text_embeds_width(tiny)) == (num_time_ids(REFINER), text_embeds_width(REFINER))
    assert num_time_ids(tiny) == 5
    x = make_inputs(tiny, Signature(1, 64, 96, tokens=2), 0)
    assert torch.equal(x["time_ids"], torch.tensor([[64.0, 96.0, 0.0, 0.0, 6.0]]))


def _conv_deepest(config: UNetConfig, sig: Signature) -> tuple[int, int] | None:
    """The deepest feature map's size by torch's own conv arithmetic: one stride-2 3x3 conv per level
    but the last, as diffusers' Downsample2D runs it (padding 1; or with `downsample_padding` 0, a row
    and column of zeros padded on one side, then no padding), on a meta tensor of the latent's size.
    None where torch refuses the convolution (a map smaller than the kernel: the model cannot run)."""
    x = torch.empty(1, 1, sig.height // 8, sig.width // 8, device="meta")
    w = torch.empty(1, 1, 3, 3, device="meta")
    for _ in range(len(config.down_block_types) - 1):
        if config.downsample_padding == 0:
            x = torch.nn.functional.pad(x, (0, 1, 0, 1))
        if min(x.shape[-2:]) + 2 * config.downsample_padding < 3:
            return None
        x = torch.nn.functional.conv2d(x, w, stride=2, padding=config.downsample_padding)
    return tuple(x.shape[-2:])


SDXL_PAD0 = dataclasses.replace(SDXL, downsample_padding=0)


@pytest.mark.parametrize("config", [SDXL, SD15, SDXL_PAD0], ids=["3-levels", "4-levels", "padding-0"])
def test_deepest_latent_is_the_downsampled_size(config):
    """Bugs in `deepest_latent`: halving rounded down at padding 1 (or up at `downsample_padding` 0), a
    level too many or too few, a float size. Reference: torch's conv output size through the model's
    stride-2 downsamplers."""
    for height in range(8, 8 * 40, 8):
        sig = Signature(1, height, 8 * 37)
        got, expected = deepest_latent(config, sig), _conv_deepest(config, sig)
        assert all(type(v) is int for v in got), height
        assert got == expected if expected else min(got) < 2, height


@pytest.mark.parametrize(
    "config, levels, need_px",
    [(SDXL, 3, 40), (SD15, 4, 72), (SDXL_PAD0, 3, 64)],
    ids=["3-levels", "4-levels", "padding-0"],
)
def test_check_fits_refuses_exactly_the_sizes_that_reach_1x1(config, levels, need_px):
    """Bugs in `check_fits`: a size refused that still leaves a 2x2 deepest map (or one let through that
    does not; with `downsample_padding` 0 the halving rounds down: 56 px -> 7 -> 3 -> 1), the wrong side
    named, a wrong smallest size suggested. Reference: torch's conv arithmetic (`_conv_deepest`); the
    smallest passing side (5 -> 3 -> 2; 9 -> 5 -> 3 -> 2; 8 -> 4 -> 2) is the suggested one."""
    assert min(_conv_deepest(config, Signature(1, need_px - 8, need_px))) < 2
    assert min(_conv_deepest(config, Signature(1, need_px, need_px))) >= 2
    for height in range(8, 2 * need_px, 8):
        for width in (need_px - 8, need_px, need_px + 8):
            sig = Signature(1, height, width)
            fits = [min(_conv_deepest(config, Signature(1, n, n)) or (0,)) >= 2 for n in (height, width)]
            if all(fits):
                check_fits(config, sig)
                continue
            key, px = ("height", height) if not fits[0] else ("width", width)
            message = (
                f"{key} {px} px: the latent ({px // 8}) is halved {levels - 1} times by the model's {levels} "
                f"levels down to 1x1, which IREE cannot compile; use a {key} of at least {need_px} px"
            )
            with pytest.raises(PunetError, match="^" + re.escape(message) + "$"):
                check_fits(config, sig)
    check_fits(config, Signature(1, need_px, need_px))  # the suggested size fits


def test_make_inputs_do_not_depend_on_the_default_dtype():
    """Bug: random inputs drawn in torch's default dtype (a `torch.randn` without a dtype), so a script that
    sets another default dtype gets other latents and text for the same seed (float64 draws are other
    numbers, not just more digits). Reference: make_inputs under torch's float32 default."""
    sig = Signature(2, 64, 64, "float16", tokens=3, cfg=True)
    expected = make_inputs(TINY, sig, 5)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = make_inputs(TINY, sig, 5)
    finally:
        torch.set_default_dtype(default)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], v) and got[k].dtype == v.dtype for k, v in expected.items())
