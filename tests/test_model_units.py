"""punet.model layer by layer against diffusers' own modules, in float64 on tiny shapes.

Each test builds the diffusers module punet's class mirrors, gives it random weights (norm
scales near 1, nonzero biases), loads the same state dict into punet's module with
`strict=True`, and compares outputs in float64 (punet computes norm statistics in fp32, so
agreement is to ~1e-7 relative; the bound is 1e-5). Unusual config values (norm eps 0.25,
freq_shift 1, sin-then-cos, a mid-block scale of 2, padding 0, odd and non-square latents,
1x1 and 5x5 conv_in/conv_out) make a dropped or swapped argument visible.

These are also the tests a mutation run (docs/testing.md) checks every mutant of
punet/model against: each test takes well under a second (the diffusers models are built
once per process, punet's in every test).
"""

from __future__ import annotations

import functools
import re

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.models import activations as d_act
from diffusers.models import attention as d_attention
from diffusers.models import attention_processor as d_attn_proc
from diffusers.models import downsampling as d_down
from diffusers.models import embeddings as d_emb
from diffusers.models import resnet as d_resnet
from diffusers.models import upsampling as d_up
from diffusers.models.transformers import transformer_2d as d_t2d
from torch.overrides import TorchFunctionMode

from punet import UNetConfig, UNet2DConditionModel
from punet.builtin import random_state_dict
from punet.model import GuidedUNet
from punet.model import layers as L

F64 = torch.float64

# A 2-level SDXL-type UNet (text_time, linear projection) with every knob off its usual value.
XL = {
    "addition_embed_type": "text_time",
    "use_linear_projection": True,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [8, 16],
    "attention_head_dim": [1, 2],
    "transformer_layers_per_block": [1, 2],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "norm_eps": 0.25,
    "cross_attention_dim": 12,
    "addition_time_embed_dim": 4,
    "projection_class_embeddings_input_dim": 10 + 6 * 4,
    "flip_sin_to_cos": True,
    "freq_shift": 1,
    "in_channels": 3,
    "out_channels": 5,
    "center_input_sample": True,
    "mid_block_scale_factor": 2.0,
    "downsample_padding": 0,
    "conv_in_kernel": 1,
    "conv_out_kernel": 5,
}
# A 3-level SD-type UNet (conv projection, per-block head counts, depths and layer counts).
SD = {
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [8, 16, 24],
    "attention_head_dim": [1, 2, 4],  # SD 1.x/2.x's name for the head count; the mid block uses the last
    "transformer_layers_per_block": [1, 2, 3],  # the mid block uses the last (3)
    "layers_per_block": [2, 2, 1],  # up blocks take them reversed; 8 -> 16 channels over 2 layers
    "norm_num_groups": 4,
    "cross_attention_dim": 12,
    "flip_sin_to_cos": False,
    "freq_shift": 0,
}


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    module.load_state_dict(random_state_dict(shapes, seed), strict=True)
    return module.to(F64).eval()


def _same_weights(ref: torch.nn.Module, ours: torch.nn.Module, seed: int = 0):
    """(ref, ours) in float64 with the same random state dict, loaded with strict=True."""
    _randomize(ref, seed)
    ours.to(F64).eval().load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def _assert_matches(got: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype, (got.shape, got.dtype, expected.shape)
    err, scale = (got - expected).abs().max().item(), expected.abs().max().item()
    assert scale > 0 and err <= rel * scale, f"max abs error {err:.3e} > {rel:.0e} x {scale:.3e}"


def _randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---- the whole UNet ---------------------------------------------------------------------


@functools.lru_cache
def _reference(name: str) -> DiffusersUNet:
    return _randomize(DiffusersUNet(**{"xl": XL, "sd": SD}[name]), 0)


def _unets(name: str):
    """(diffusers, punet) on the same weights. The diffusers model is built once per process; punet's in
    each test, so that a mutation run sees every test reach punet's constructors."""
    ref = _reference(name)
    ours = UNet2DConditionModel(UNetConfig.from_dict({"xl": XL, "sd": SD}[name])).to(F64).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.fixture
def xl():
    return _unets("xl")


@pytest.fixture
def sd():
    return _unets("sd")


def _xl_inputs(batch: int = 2, h: int = 9, w: int = 6, rows: int | None = None) -> dict:
    rows = rows or batch
    time_ids = torch.tensor([[64.0, 48.0, 0.0, 8.0, 72.0, 56.0]], dtype=F64).repeat(rows, 1)
    time_ids[-1] += 16.0  # rows differ, so a row mix-up shows
    return {
        "sample": _randn(batch, 3, h, w, seed=1),
        "timestep": torch.tensor([999.0, 10.0, 420.0, 1.0][:batch]),
        "encoder_hidden_states": _randn(rows, 5, 12, seed=2),
        "text_embeds": _randn(rows, 10, seed=3),
        "time_ids": time_ids,
    }


def _ref_xl(ref, x: dict) -> torch.Tensor:
    added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
    with torch.no_grad():
        return ref(x["sample"], x["timestep"], x["encoder_hidden_states"], added_cond_kwargs=added).sample


def _ours(ours, x: dict) -> torch.Tensor:
    with torch.no_grad():
        return ours(**x)


def test_sdxl_type_unet_matches_diffusers(xl):
    """Bugs anywhere in the SDXL path: the add embedding (text_embeds + embedded time ids), freq_shift,
    center_input_sample, conv kernel padding, downsample padding 0, the mid-block scale, per-level depths,
    skip order, and upsampling to an odd, non-square size (9x6 -> 5x3 -> 9x6). Batch 2, timesteps 999 and 10."""
    ref, ours = xl
    x = _xl_inputs()
    _assert_matches(_ours(ours, x), _ref_xl(ref, x))


def test_sd_type_unet_matches_diffusers(sd):
    """Bugs in the SD 1.x path: conv proj_in/proj_out, cross-attention down blocks first, 3 levels with
    different channel counts (which up-block input comes from which level), per-block head counts, layer
    counts and depths (reversed for the up blocks; the mid block takes the last level's), sin-then-cos
    timestep embedding, odd latent size (7x10 -> 4x5 -> 2x3 and back)."""
    ref, ours = sd
    x = {"sample": _randn(2, 4, 7, 10, seed=4), "timestep": torch.tensor([3.0, 500.0])}
    x["encoder_hidden_states"] = _randn(2, 6, 12, seed=5)
    with torch.no_grad():
        expected = ref(x["sample"], x["timestep"], x["encoder_hidden_states"]).sample
    _assert_matches(_ours(ours, x), expected)


def test_decomposed_attention_matches_diffusers(xl):
    """Bugs in the decomposed attention (matmul + softmax + matmul, for targets without fused attention):
    a wrong scale, softmax over the wrong axis, `set_decomposed_attention` missing a layer or not
    switching back."""
    ref, ours = xl
    x = _xl_inputs()
    expected = _ref_xl(ref, x)
    attns = [m for m in ours.modules() if isinstance(m, L.Attention)]
    assert len(attns) == sum(isinstance(m, d_attn_proc.Attention) for m in ref.modules()) == 16
    sdpa, softmax = torch.nn.functional.scaled_dot_product_attention, torch.softmax
    with _DtypesOf(sdpa, softmax) as fused:  # a new model uses the fused op (every target but Vulkan has it)
        _ours(ours, x)
    assert ours.set_decomposed_attention() is ours
    assert all(m.decomposed is True for m in attns)
    with _DtypesOf(sdpa, softmax) as decomposed:
        _assert_matches(_ours(ours, x), expected)
    ours.set_decomposed_attention(False)
    assert not any(m.decomposed for m in attns)
    assert [f.__name__ for f in fused.funcs_seen] == ["scaled_dot_product_attention"] * 16
    assert [f.__name__ for f in decomposed.funcs_seen] == ["softmax"] * 16


def test_unsliced_decomposed_attention(xl, monkeypatch):
    """Bugs in the GPUs' form (`set_decomposed_attention(sliced=False)`): still cut by (row, head) pairs, a
    layer left sliced, or the whole-batch matmuls computing something else. With a budget of 1 score per
    slice, the sliced form calls softmax once per (row, head) pair of each of the 16 layers; unsliced, once
    per layer. Both match diffusers."""
    ref, ours = xl
    x = _xl_inputs()
    expected = _ref_xl(ref, x)
    attns = [m for m in ours.modules() if isinstance(m, L.Attention)]
    monkeypatch.setattr(L, "SCORES_PER_SLICE", 1)
    try:
        with _DtypesOf(torch.softmax) as sliced:
            _assert_matches(_ours(ours.set_decomposed_attention(True), x), expected)
        with _DtypesOf(torch.softmax) as whole:
            _assert_matches(_ours(ours.set_decomposed_attention(True, sliced=False), x), expected)
    finally:
        ours.set_decomposed_attention(False)
    assert len(sliced.seen) == sum(x["sample"].shape[0] * m.heads for m in attns) > 16
    assert len(whole.seen) == 16


def test_conv_rows_match_diffusers(xl):
    """Bugs in `set_conv_rows` (the CPU's form of bf16 multi-row modules): a convolution left batched or a
    row lost, the switch not reaching conv_in/conv_out, the down/upsamplers or a ResNet's convolutions,
    or not switching back. Counted through torch's conv2d: once per row of each convolution with the
    switch, once per convolution without; both match diffusers at batch 2."""
    ref, ours = xl
    x = _xl_inputs()
    expected = _ref_xl(ref, x)
    convs = [m for m in ours.modules() if isinstance(m, L.RowwiseConv2d)]
    pointwise = [m for m in ours.modules() if isinstance(m, L.PointwiseConv2d)]  # matmuls, not convolutions
    assert len(convs) + len(pointwise) == sum(isinstance(m, torch.nn.Conv2d) for m in ref.modules())
    try:
        with _DtypesOf(torch.nn.functional.conv2d) as by_rows:
            _assert_matches(_ours(ours.set_conv_rows(), x), expected)
    finally:
        ours.set_conv_rows(False)
    with _DtypesOf(torch.nn.functional.conv2d) as batched:
        _assert_matches(_ours(ours, x), expected)
    assert len(batched.seen) == len(convs) > 6
    assert len(by_rows.seen) == 2 * len(convs)


def test_timestep_forms_and_per_sample_timesteps(sd):
    """Bugs in timestep handling: a number, a 0-d tensor or shape (1,) not broadcast to the batch; per-sample
    timesteps of shape (B,) not each used for their own row. Reference: diffusers given shape (B,)."""
    ref, ours = sd
    sample, ehs = _randn(2, 4, 4, 4, seed=6), _randn(2, 3, 12, seed=7)
    with torch.no_grad():
        same = ref(sample, torch.tensor([10.0, 10.0]), ehs).sample
        each = ref(sample, torch.tensor([10.0, 700.0]), ehs).sample
    for t in (10, 10.0, torch.tensor(10.0), torch.tensor([10.0])):
        _assert_matches(_ours(ours, {"sample": sample, "timestep": t, "encoder_hidden_states": ehs}), same)
    _assert_matches(
        _ours(ours, {"sample": sample, "timestep": torch.tensor([10.0, 700.0]), "encoder_hidden_states": ehs}), each
    )


def test_guided_unet_matches_diffusers_cfg_step(xl):
    """Bugs in GuidedUNet: rows swapped (positive taken as negative), latents or timesteps not duplicated in
    the right order, guidance applied as `text + s * (text - uncond)` or with the scale dropped.

    Reference: diffusers' UNet on the doubled batch, then SDXL's `uncond + s * (text - uncond)` in float64."""
    ref, ours = xl
    # Batch 4: not the 3 input channels (a batch read off the wrong axis shows), and 2B = 8 rows do not
    # split into 2 chunks of another size.
    x = _xl_inputs(batch=4, h=4, w=4, rows=8)
    s = 3.5
    doubled = dict(x, sample=torch.cat([x["sample"]] * 2), timestep=torch.cat([x["timestep"]] * 2))
    uncond, text = _ref_xl(ref, doubled).chunk(2)
    expected = uncond + s * (text - uncond)
    guided = GuidedUNet(ours)
    with torch.no_grad():
        got = guided(**x, guidance_scale=torch.tensor([s]))
        one_t = guided(**dict(x, timestep=x["timestep"][:1]), guidance_scale=torch.tensor(s))
    _assert_matches(got, expected)
    # A (1,) timestep is used for every sample, as diffusers' pipeline does.
    doubled_1 = dict(doubled, timestep=x["timestep"][:1].expand(8))
    u1, t1 = _ref_xl(ref, doubled_1).chunk(2)
    _assert_matches(one_t, u1 + s * (t1 - u1))


def _message(text: str) -> str:
    return "^" + re.escape(text) + "$"


def test_input_checks_name_the_shape(xl, sd):
    """Bugs in `_check_inputs`: a bad shape accepted (diffusers would fail deep inside with a matmul error) or
    reported with a wrong expectation. Each message is checked in full."""
    _, x_ours = xl
    _, s_ours = sd
    x = _xl_inputs(batch=1, h=4, w=4)
    s = {"sample": _randn(1, 4, 4, 4), "timestep": 1, "encoder_hidden_states": _randn(1, 3, 12)}
    cases = [
        (s_ours, dict(s, sample=_randn(1, 3, 4, 4)), "sample: expected shape (B, 4, H, W), got (1, 3, 4, 4)"),
        (s_ours, dict(s, sample=_randn(4, 4, 4)), "sample: expected shape (B, 4, H, W), got (4, 4, 4)"),
        (
            s_ours,
            dict(s, encoder_hidden_states=_randn(3, 12)),
            "encoder_hidden_states: expected shape (1, tokens, 12), got (3, 12)",
        ),
        (
            s_ours,
            dict(s, encoder_hidden_states=_randn(2, 3, 12)),
            "encoder_hidden_states: expected shape (1, tokens, 12), got (2, 3, 12)",
        ),
        (
            s_ours,
            dict(s, encoder_hidden_states=_randn(1, 3, 11)),
            "encoder_hidden_states: expected shape (1, tokens, 12), got (1, 3, 11)",
        ),
        (
            s_ours,
            dict(s, timestep=torch.tensor([1.0, 2.0])),
            "timestep: expected a number or shape (), (1,) or (1,), got (2,)",
        ),
        (
            s_ours,
            dict(s, text_embeds=x["text_embeds"]),
            "text_embeds/time_ids given, but the config has no addition_embed_type='text_time'",
        ),
        (
            s_ours,
            dict(s, time_ids=x["time_ids"]),
            "text_embeds/time_ids given, but the config has no addition_embed_type='text_time'",
        ),
        (
            x_ours,
            dict(x, text_embeds=None),
            "text_embeds and time_ids are required: the config has addition_embed_type='text_time'",
        ),
        (
            x_ours,
            dict(x, time_ids=None),
            "text_embeds and time_ids are required: the config has addition_embed_type='text_time'",
        ),
        (
            x_ours,
            dict(x, text_embeds=x["text_embeds"][0]),
            "text_embeds/time_ids: expected shapes (1, D) and (1, N), got (10,) and (1, 6)",
        ),
        (
            x_ours,
            dict(x, time_ids=x["time_ids"][0]),
            "text_embeds/time_ids: expected shapes (1, D) and (1, N), got (1, 10) and (6,)",
        ),
        (
            x_ours,
            dict(x, text_embeds=x["text_embeds"][..., None]),
            "text_embeds/time_ids: expected shapes (1, D) and (1, N), got (1, 10, 1) and (1, 6)",
        ),
        (
            x_ours,
            dict(x, time_ids=x["time_ids"][..., None]),
            "text_embeds/time_ids: expected shapes (1, D) and (1, N), got (1, 10) and (1, 6, 1)",
        ),
        (
            x_ours,
            dict(x, text_embeds=x["text_embeds"].repeat(2, 1)),
            "text_embeds/time_ids: expected shapes (1, D) and (1, N), got (2, 10) and (1, 6)",
        ),
        (
            x_ours,
            dict(x, time_ids=x["time_ids"].repeat(2, 1)),
            "text_embeds/time_ids: expected shapes (1, D) and (1, N), got (1, 10) and (2, 6)",
        ),
        (
            x_ours,
            dict(x, time_ids=x["time_ids"][:, :5]),
            "text_embeds/time_ids: D + N * 4 must equal projection_class_embeddings_input_dim=34, "
            "got (1, 10) and (1, 5)",
        ),
        (
            x_ours,
            dict(x, text_embeds=x["text_embeds"][:, :9]),
            "text_embeds/time_ids: D + N * 4 must equal projection_class_embeddings_input_dim=34, "
            "got (1, 9) and (1, 6)",
        ),
    ]
    for model, inputs, message in cases:
        with pytest.raises(ValueError, match=_message(message)):
            model(**inputs)
    # The same text width in another split (D 14, N 5) is accepted only if it adds up: 14 + 5 * 4 = 34.
    with torch.no_grad():
        out = x_ours(**dict(x, text_embeds=_randn(1, 14), time_ids=x["time_ids"][:, :5]))
    assert out.shape == (1, 5, 4, 4)


def test_forward_on_the_meta_device():
    """Bug: a tensor made on the CPU inside forward (the tensor of a Python-number timestep, the embedding's
    frequencies) instead of on the inputs' device, which fails on a GPU with "Expected all tensors to be on
    the same device". The meta device stands in for a GPU on a CPU-only machine; reference: the output
    shape (B, out_channels, H, W) and device of the inputs."""
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_dict(XL))
    x = {k: v.to("meta", torch.float32) for k, v in _xl_inputs().items()}
    for t in (10, 10.5, x["timestep"]):
        out = ours(**dict(x, timestep=t))
        assert out.device.type == "meta" and out.shape == (2, 5, 9, 6)


def test_attention_key_lengths_cover_the_model():
    """Bug in `signature.attention_key_lengths` (CUDA keeps attention fused only where every key length is
    a multiple of 16): a level's feature map rounded down instead of up, or the text length left out, so
    an unaligned key goes unchecked. Reference: the key lengths the model's attention layers see in a
    forward on the meta device, at a 9x6 latent and 5 text tokens; this config's `downsample_padding` 0
    takes 9x6 to 4x3 (12 tokens), where SDXL's padding 1 would give 5x3."""
    from punet.signature import Signature, attention_key_lengths

    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_dict(XL))
    seen = set()

    def record(module, args, kwargs):
        context = args[1] if len(args) > 1 else kwargs.get("context")
        seen.add((args[0] if context is None else context).shape[1])

    for m in ours.modules():
        if isinstance(m, L.Attention):
            m.register_forward_pre_hook(record, with_kwargs=True)
    x = {k: v.to("meta", torch.float32) for k, v in _xl_inputs().items()}
    ours(**x)
    assert len(seen) >= 2  # self- and cross-attention both seen
    assert seen <= attention_key_lengths(ours.config, Signature(2, 9 * 8, 6 * 8, tokens=5))


# ---- layers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("flip", [True, False])
@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding(flip, shift):
    """Bugs in the sinusoidal embedding: frequencies, freq_shift, sin/cos order, the zero pad of an odd dim.
    Reference: diffusers' `get_timestep_embedding` (fp32, as SDXL runs it)."""
    t = torch.tensor([0.0, 1.0, 10.5, 999.0])
    for dim in (8, 9, 32):
        got = L.timestep_embedding(t, dim, flip, shift)
        expected = d_emb.get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_timestep_embedding_is_fp32_whatever_the_default_dtype():
    """Bug: the frequencies made in torch's default dtype (`torch.arange` without a dtype), so a script that
    changes the default dtype gets embeddings of another precision. Reference: diffusers (fp32 always)."""
    t = torch.tensor([1.0, 999.0])
    expected = d_emb.get_timestep_embedding(t, 32, flip_sin_to_cos=True, downscale_freq_shift=1)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = L.timestep_embedding(t, 32, True, 1)
    finally:
        torch.set_default_dtype(default)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_timestep_embedding_module():
    """Bugs in TimestepEmbedding: activation missing or after the second linear, linears swapped."""
    ref, ours = _same_weights(d_emb.TimestepEmbedding(6, 10), L.TimestepEmbedding(6, 10))
    x = _randn(3, 6)
    _assert_matches(ours(x), ref(x))


@pytest.mark.parametrize("decomposed", [False, True], ids=["sdpa", "decomposed"])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
def test_attention(decomposed, cross):
    """Bugs in Attention: heads split or merged in the wrong order, k/v from x instead of the context, a
    wrong softmax scale or axis. 2 heads of width 3, 5 query and 4 context tokens, batch 2.
    Reference: diffusers' `Attention` with its default `AttnProcessor2_0`."""
    ctx_dim = 7 if cross else None
    ref, ours = _same_weights(
        d_attn_proc.Attention(6, cross_attention_dim=ctx_dim, heads=2, dim_head=3, out_bias=True),
        L.Attention(6, 2, 3, ctx_dim),
    )
    ours.decomposed = decomposed
    x = _randn(2, 5, 6, seed=1)
    ctx = _randn(2, 4, 7, seed=2) if cross else None
    with torch.no_grad():
        _assert_matches(ours(x, ctx), ref(x, encoder_hidden_states=ctx))


@pytest.mark.parametrize("per_slice,slices", [(1 << 20, 1), (60, 2), (40, 3), (25, 5), (1, 6)])
def test_decomposed_attention_by_head_slices(monkeypatch, per_slice, slices):
    """Bugs in the sliced decomposed attention: slices joined in the wrong order or on the wrong axis, a
    (batch row, head) pair dropped, repeated or paired with another row's keys when the 6 pairs do not
    divide evenly (5 slices of 2, 1, 1, 1, 1), the slice count ignoring the batch or the key length, a
    slice of queries or keys instead of pairs. Cross-attention, 3 heads of width 4, 5 query and 4 key
    tokens, batch 2 (6 pairs, 120 scores): budgets of 2^20, 60, 40, 25 and 1 scores per slice give 1, 2,
    3, 5 and 6 slices (never more than the pairs). Reference: diffusers' `Attention` (AttnProcessor2_0)."""
    ref, ours = _same_weights(
        d_attn_proc.Attention(12, cross_attention_dim=7, heads=3, dim_head=4, out_bias=True), L.Attention(12, 3, 4, 7)
    )
    ours.decomposed = True
    monkeypatch.setattr(L, "SCORES_PER_SLICE", per_slice)
    x, ctx = _randn(2, 5, 12, seed=1), _randn(2, 4, 7, seed=2)
    with torch.no_grad(), _DtypesOf(torch.softmax) as mode:
        got = ours(x, ctx)
        _assert_matches(got, ref(x, encoder_hidden_states=ctx))
    assert len(mode.seen) == slices


@pytest.mark.parametrize(
    "batch,size,level_slices", [(1, 256, [1, 1]), (1, 512, [10, 2]), (1, 1024, [10, 20]), (2, 1024, [20, 40])]
)
def test_sdxl_attention_slices(batch, size, level_slices):
    """Bug: the slice budget changed so that the 256x256 modules (measured fastest whole) get sliced, or the
    512x512 level-2 self-attention (10 x 1024 x 1024 scores, 40 MiB) stays whole. Counts softmax calls of
    SDXL's self-attention shapes at its two attention levels (640 wide: 10 heads, 1280 wide: 20 heads of 64)
    on the meta device; batch 2 is the 1024x1024 CFG step (one slice per row and head)."""
    seen = []
    for heads, latent in ((10, size // 16), (20, size // 32)):
        q = torch.empty(batch, heads, latent * latent, 64, device="meta")
        with _DtypesOf(torch.softmax) as mode:
            out = L.decomposed_attention(q, q, q)
        assert out.shape == q.shape
        seen.append(len(mode.seen))
    assert seen == level_slices


class _DtypesOf(TorchFunctionMode):
    """Records the dtype of the first argument of each call to the given torch functions."""

    def __init__(self, *funcs):
        super().__init__()
        self.funcs, self.seen, self.funcs_seen = funcs, [], []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.funcs:
            self.seen.append(args[0].dtype)
            self.funcs_seen.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_statistics_are_fp32(dtype):
    """Bugs: softmax (decomposed attention), GroupNorm or LayerNorm statistics computed in fp16/bf16.

    Torch's CPU kernels upcast internally, so eager values cannot show it; compiled for a GPU they do
    (fp16 GroupNorm for llvm-cpu has relative L2 > 1). Checked here: the reduction gets fp32 inputs and
    the result comes back in the activation dtype, within that dtype's rounding of the float64 result."""
    attn = _randomize(L.Attention(6, 2, 3), 0)
    attn.decomposed = True
    gn, ln = _randomize(L.GroupNorm(2, 4, eps=0.25), 1), _randomize(L.LayerNorm(6, eps=0.25), 2)
    x, img = _randn(2, 5, 6, seed=3), _randn(2, 4, 3, 3, seed=4)
    expected = (attn(x), gn(img), ln(x))
    low = [m.to(dtype) for m in (attn, gn, ln)]
    with _DtypesOf(torch.softmax, torch.nn.functional.group_norm, torch.nn.functional.layer_norm) as mode:
        got = (low[0](x.to(dtype)), low[1](img.to(dtype)), low[2](x.to(dtype)))
    assert mode.seen == [torch.float32] * 3
    for g, e in zip(got, expected):
        assert g.dtype == dtype
        _assert_matches(g.double(), e, rel=2e-2)


def test_norms_without_affine_match_torch():
    """Bugs in the norms' optional weight/bias: affine parameters applied when absent or dropped when
    present. Reference: torch's nn.GroupNorm / nn.LayerNorm in float64."""
    x, img = _randn(2, 3, 6, seed=1), _randn(2, 4, 3, 3, seed=2)
    for affine in (False, True):
        pairs = (
            (torch.nn.GroupNorm(2, 4, eps=0.25, affine=affine), L.GroupNorm(2, 4, eps=0.25, affine=affine), img),
            (
                torch.nn.LayerNorm(6, eps=0.25, elementwise_affine=affine),
                L.LayerNorm(6, eps=0.25, elementwise_affine=affine),
                x,
            ),
        )
        for ref, ours, inp in pairs:
            if affine:
                ref, ours = _same_weights(ref, ours)
            else:
                ref, ours = ref.to(F64), ours.to(F64)
            _assert_matches(ours(inp), ref(inp))


def test_geglu_and_feed_forward():
    """Bugs in GEGLU / FeedForward: the gate and value halves swapped, tanh-approximate GELU, a layer of
    `net` skipped. Reference: diffusers' `GEGLU` and `FeedForward(activation_fn="geglu")`."""
    x = _randn(2, 3, 6)
    ref, ours = _same_weights(d_act.GEGLU(6, 5), L.GEGLU(6, 5))
    _assert_matches(ours(x), ref(x))
    ref, ours = _same_weights(d_attention.FeedForward(6, activation_fn="geglu"), L.FeedForward(6))
    _assert_matches(ours(x), ref(x))


def test_basic_transformer_block():
    """Bugs in BasicTransformerBlock: a residual dropped, a norm applied to the wrong branch, the context
    given to self-attention. Reference: diffusers' `BasicTransformerBlock` (layer_norm, GEGLU)."""
    ref, ours = _same_weights(
        d_attention.BasicTransformerBlock(6, 2, 3, cross_attention_dim=7, activation_fn="geglu"),
        L.BasicTransformerBlock(6, 2, 3, 7),
    )
    x, ctx = _randn(2, 5, 6, seed=1), _randn(2, 4, 7, seed=2)
    with torch.no_grad():
        _assert_matches(ours(x, ctx), ref(x, encoder_hidden_states=ctx))


@pytest.mark.parametrize("linear", [True, False], ids=["linear-proj", "conv-proj"])
def test_transformer_2d(linear):
    """Bugs in Transformer2DModel: H and W swapped in the (B, HW, C) reshape, projection before/after the
    reshape in the wrong mode, the residual dropped, depth ignored, the norm's eps. Non-square 3x5 map,
    depth 2.
    Reference: diffusers' `Transformer2DModel`."""
    ref, ours = _same_weights(
        d_t2d.Transformer2DModel(
            num_attention_heads=2,
            attention_head_dim=4,
            in_channels=8,
            num_layers=2,
            cross_attention_dim=7,
            norm_num_groups=4,
            use_linear_projection=linear,
        ),
        L.Transformer2DModel(2, 8, 2, 7, 4, linear),
    )
    x, ctx = _randn(2, 8, 3, 5, seed=1), _randn(2, 4, 7, seed=2)
    with torch.no_grad():
        _assert_matches(ours(x, ctx), ref(x, encoder_hidden_states=ctx, return_dict=False)[0])
        # A feature map of variance 1e-6, where the GroupNorm's eps (1e-6, not torch's default 1e-5) shows.
        small = x * 1e-3
        _assert_matches(ours(small, ctx), ref(small, encoder_hidden_states=ctx, return_dict=False)[0])


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 3])
def test_pointwise_conv(batch, bias):
    """Bugs in PointwiseConv2d (the 1x1 convolution as one matmul over B*H*W pixels): the batch and channel
    axes not swapped before the flattening or after, the bias dropped, a state-dict key renamed.
    Non-square 3x5 map. Reference: torch's own conv2d with the same weights."""
    ref, ours = _same_weights(torch.nn.Conv2d(6, 4, 1, bias=bias), L.PointwiseConv2d(6, 4, bias=bias))
    x = _randn(batch, 6, 3, 5, seed=3)
    with torch.no_grad():
        _assert_matches(ours(x), ref(x))


@pytest.mark.parametrize("stride, padding", [(1, 1), (2, 0)])
def test_rowwise_conv(stride, padding):
    """Bugs in RowwiseConv2d's by-rows form (each batch row's convolution apart, for iree-compile's bf16
    im2col): a row dropped or repeated, rows concatenated along channels, the bias or stride lost, a
    state-dict key renamed. Batch 3, non-square 7x6 map. Reference: torch's own conv2d, same weights."""
    ref, ours = _same_weights(
        torch.nn.Conv2d(4, 5, 3, stride=stride, padding=padding), L.RowwiseConv2d(4, 5, 3, stride=stride, padding=padding)
    )
    x = _randn(3, 4, 7, 6, seed=4)
    with torch.no_grad():
        _assert_matches(ours(x), ref(x))
        ours.by_rows = True
        _assert_matches(ours(x), ref(x))
        _assert_matches(ours(x[:1]), ref(x[:1]))


@pytest.mark.parametrize("in_ch, out_ch, scale", [(4, 8, 1.0), (8, 8, 2.0), (8, 4, 0.5)])
def test_resnet_block(in_ch, out_ch, scale):
    """Bugs in ResnetBlock2D: the time embedding added without SiLU or at the wrong place, the shortcut conv
    missing when channels change, the output scale ignored or multiplied. Reference: diffusers'
    `ResnetBlock2D` with the same groups, eps 0.25 and output_scale_factor."""
    ref, ours = _same_weights(
        d_resnet.ResnetBlock2D(
            in_channels=in_ch, out_channels=out_ch, temb_channels=6, groups=4, eps=0.25, output_scale_factor=scale
        ),
        L.ResnetBlock2D(in_ch, out_ch, 6, 4, 0.25, scale),
    )
    x, temb = _randn(2, in_ch, 3, 5, seed=1), _randn(2, 6, seed=2)
    _assert_matches(ours(x, temb), ref(x, temb))


@pytest.mark.parametrize("padding", [0, 1])
def test_downsample(padding):
    """Bugs in Downsample2D: padding 0 (diffusers pads right and bottom by 1) padded on the wrong sides or
    not at all. Odd and even, non-square sizes. Reference: diffusers' `Downsample2D(use_conv=True)`."""
    ref, ours = _same_weights(
        d_down.Downsample2D(4, use_conv=True, padding=padding, name="op"), L.Downsample2D(4, padding)
    )
    for h, w in ((6, 4), (7, 5)):
        x = _randn(2, 4, h, w, seed=h)
        _assert_matches(ours(x), ref(x))


def test_upsample():
    """Bugs in Upsample2D: the target size ignored or swapped, interpolation other than nearest.
    Reference: diffusers' `Upsample2D(use_conv=True)` given the same output size."""
    ref, ours = _same_weights(d_up.Upsample2D(4, use_conv=True), L.Upsample2D(4))
    x = _randn(2, 4, 3, 2)
    for size in ((6, 4), (5, 3)):
        _assert_matches(ours(x, size), ref(x, output_size=size))
