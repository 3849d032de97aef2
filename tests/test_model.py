"""Parity of punet's model with diffusers' UNet2DConditionModel on the same state dict."""

from __future__ import annotations

import pytest
import torch

from punet import UNetConfig, UNet2DConditionModel
from punet.builtin import config_dict, random_state_dict
from punet.signature import Signature, make_inputs

from .conftest import FAMILIES, diffusers_kwargs, diffusers_tiny, rel_l2

H = W = 128  # latent 16x16


def _pair(name: str, overrides: dict | None = None):
    """(diffusers model, punet model) with the same random weights."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    d = {**config_dict(name), **(overrides or {})}
    ref = DiffusersUNet(**diffusers_kwargs(d)).eval()
    ref.load_state_dict(random_state_dict({k: tuple(v.shape) for k, v in ref.state_dict().items()}, 0), strict=True)
    ours = UNet2DConditionModel(UNetConfig.from_dict(d)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # no renaming
    return ref, ours


def _inputs(model: UNet2DConditionModel, batch: int, timesteps: list[float], seed: int = 1):
    x = make_inputs(model.config, Signature(batch=batch, height=H, width=W, tokens=7), seed)
    x["timestep"] = torch.tensor(timesteps, dtype=torch.float32)
    return x


def _ref_call(ref, x: dict, dtype=torch.float32):
    added = {k: x[k].to(dtype) for k in ("text_embeds", "time_ids") if k in x} or None
    with torch.inference_mode():
        return ref(
            x["sample"].to(dtype), x["timestep"], x["encoder_hidden_states"].to(dtype), added_cond_kwargs=added
        ).sample


def _our_call(ours, x: dict, dtype=torch.float32):
    kw = {k: (v.to(dtype) if k in ("sample", "encoder_hidden_states", "text_embeds") else v) for k, v in x.items()}
    with torch.inference_mode():
        return ours(**kw)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request):
    return request.param, *_pair(request.param)


@pytest.mark.parametrize("t", [0, 10, 999])
def test_fp32_parity(pair, t):
    """fp32 max abs error <= 1e-5 x max|ref|, batch 1 and batch 2 with two timesteps."""
    name, ref, ours = pair
    for batch, timesteps in ((1, [t]), (2, [t, 500 if t != 500 else 1])):
        x = _inputs(ours, batch, timesteps)
        expected, got = _ref_call(ref, x), _our_call(ours, x)
        assert got.shape == expected.shape
        bound = 1e-5 * expected.abs().max().item()
        err = (got - expected).abs().max().item()
        assert err <= bound, f"{name} batch {batch} t={timesteps}: max abs error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_no_worse_than_diffusers(pair, dtype):
    """punet's bf16/fp16 error vs diffusers fp32 <= 1.5x diffusers' own bf16/fp16 error.

    Torch's CPU norm and softmax kernels accumulate in fp32 whatever the dtype, so this bound
    cannot see statistics computed in low precision: test_regressions checks those in the export.
    """
    name, ref, ours = pair
    x = _inputs(ours, 2, [999, 10])
    gold = _ref_call(ref, x)
    ref_err = rel_l2(_ref_call(ref.to(dtype), x, dtype).float(), gold)
    ref.to(torch.float32)
    our_err = rel_l2(_our_call(ours.to(dtype), x, dtype).float(), gold)
    ours.to(torch.float32)
    assert our_err <= 1.5 * ref_err, f"{name} {dtype}: punet {our_err:.3e} vs diffusers {ref_err:.3e}"


def test_timestep_forms():
    """A Python number, a 0-d tensor, shape [1] and shape [B] each match diffusers given shape [B]."""
    ref, ours = _pair("tiny-sdxl")
    x = _inputs(ours, 2, [10, 10])
    expected = _ref_call(ref, x)
    for t in (10, 10.0, torch.tensor(10.0), torch.tensor([10.0]), torch.tensor([10.0, 10.0])):
        got = _our_call(ours, dict(x, timestep=t))
        assert (got - expected).abs().max() <= 1e-5 * expected.abs().max(), repr(t)


def test_per_sample_timesteps_differ():
    """Each batch entry uses its own timestep: batch [3, 900] equals diffusers run on each entry alone."""
    ref, ours = _pair("tiny-sd15")
    x = _inputs(ours, 2, [3, 900])
    both = _our_call(ours, x)
    alone = [_ref_call(ref, {k: v[i : i + 1] for k, v in x.items()}) for i in range(2)]
    for i in range(2):
        assert (both[i : i + 1] - alone[i]).abs().max() <= 1e-5 * alone[i].abs().max(), i
    # The same latents at the other entry's timestep give another output: the timestep is used.
    swapped = _ref_call(ref, dict({k: v[:1] for k, v in x.items()}, timestep=x["timestep"][1:]))
    assert rel_l2(swapped, alone[0]) > 1e-2


def test_reverse_transformer_layers_per_block():
    """Per-layer depths and explicit up-block depths match diffusers (the peer ignores them)."""
    ref, ours = _pair(
        "tiny-sdxl",
        {
            "transformer_layers_per_block": [[1, 1], [1, 2], [2, 1]],
            "reverse_transformer_layers_per_block": [[2, 1, 1], [1, 1, 2], [1, 1, 1]],
        },
    )
    assert len(ours.up_blocks[0].attentions[0].transformer_blocks) == 2
    x = _inputs(ours, 1, [500])
    expected = _ref_call(ref, x)
    assert (_our_call(ours, x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_odd_latent_size_matches_diffusers():
    """A latent size not divisible by 2**levels takes diffusers' upsample_size path."""
    ref, ours = _pair("tiny-sd2")
    x = make_inputs(ours.config, Signature(batch=1, height=8 * 10, width=8 * 14, tokens=5), 3)
    expected = _ref_call(ref, x)
    assert (_our_call(ours, x) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_text_time_inputs_are_checked():
    _, xl = _pair("tiny-sdxl")
    x = _inputs(xl, 1, [1])
    with pytest.raises(ValueError, match="text_embeds and time_ids are required"):
        xl(sample=x["sample"], timestep=1, encoder_hidden_states=x["encoder_hidden_states"])
    with pytest.raises(ValueError, match="projection_class_embeddings_input_dim"):
        xl(**dict(x, time_ids=x["time_ids"][:, :5]))
    _, sd = _pair("tiny-sd15")
    y = _inputs(sd, 1, [1])
    with pytest.raises(ValueError, match="no addition_embed_type"):
        sd(**y, text_embeds=x["text_embeds"], time_ids=x["time_ids"])
    with pytest.raises(ValueError, match="encoder_hidden_states: expected shape"):
        sd(**dict(y, encoder_hidden_states=x["encoder_hidden_states"][..., :5]))
    with pytest.raises(ValueError, match="timestep: expected"):
        sd(**dict(y, timestep=torch.tensor([1.0, 2.0, 3.0])))


def test_full_sdxl_on_meta_matches_diffusers():
    """The full-size SDXL config on meta: diffusers' key set, shapes, 2,567,463,684 parameters."""
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from .conftest import CONFIG_DIR

    import json

    d = json.loads((CONFIG_DIR / "sdxl-base-1.0-unet.json").read_text())
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNetConfig.from_dict(d))
        ref = DiffusersUNet(**diffusers_kwargs(d))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 2_567_463_684


def test_model_imports_with_torch_alone():
    """punet.model needs nothing but torch (no IREE, diffusers, safetensors)."""
    import subprocess
    import sys

    code = (
        "import sys; import punet.model; "
        "bad = [m for m in ('iree', 'diffusers', 'safetensors', 'huggingface_hub', 'numpy.random') "
        "if any(k == m or k.startswith(m + '.') for k in sys.modules)]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_diffusers_tiny_helper_is_random():
    m = diffusers_tiny("tiny-sd15")
    for k, v in m.state_dict().items():
        assert not torch.any(v == 0) and not torch.any(v == 1), k
