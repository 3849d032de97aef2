"""Quantized punet in eager mode: the plan, the exact math, calibration, the Brevitas format.

The reference for the math is independent of punet's quantized layers:
diffusers' UNet2DConditionModel in float64 whose own Linear and Conv2d
modules compute the issue's formula with torch's float64 linear/conv2d on
the integer codes, `(codes(x) @ (q - zp)^T) * (input_scale * weight_scale) + bias`
(sums of int8 products are exact in float64), and an fp8 attention processor.
Writing the scales in the same order as the formula keeps the two
implementations bit-close, so no input lands on a rounding boundary in one
and not the other (a flip would cascade).
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from punet.errors import PunetError
from punet.quant import plan
from punet.quant.brevitas import write_folder
from punet.quant.calibrate import quantize_archive
from punet.signature import Signature, make_inputs
from punet.weights import import_checkpoint, load_irpa, load_model, read_metadata

from .conftest import diffusers_kwargs, rel_l2

FAMILY = "tiny-sdxl"


@pytest.fixture(scope="module")
def archives(tmp_path_factory, checkpoints):
    root = tmp_path_factory.mktemp("quant")
    f32 = root / "f32.irpa"
    import_checkpoint(str(checkpoints[FAMILY]), f32)
    q = root / "int8.irpa"
    quantize_archive(f32, q, samples=2, height=64, width=64)
    brevitas = root / "brevitas"
    quantize_archive(f32, brevitas, samples=2, height=64, width=64, fmt="brevitas")
    fp8 = root / "fp8.irpa"
    quantize_archive(f32, fp8, scheme="int8-fp8attn", samples=2, height=64, width=64, fp8_dtype="float8_e4m3fnuz")
    fp8_brevitas = root / "fp8_brevitas"
    quantize_archive(f32, fp8_brevitas, scheme="int8-fp8attn", samples=2, height=64, width=64, fmt="brevitas",
                     fp8_dtype="float8_e4m3fnuz")
    return {"f32": f32, "int8": q, "brevitas": brevitas, "fp8": fp8, "fp8_brevitas": fp8_brevitas, "root": root}


def _diffusers_fake_quant(irpa):
    """diffusers' model in float64 computing what the quantized archive describes, with its own modules."""
    from diffusers import UNet2DConditionModel

    meta = read_metadata(irpa)
    config, state = load_irpa(irpa)
    model = UNet2DConditionModel(**diffusers_kwargs(meta["config_json"])).double().eval()
    layers = {m.name for m in plan(config)}
    float_state = {}
    for key, t in state.items():
        layer, _, field = key.rpartition(".")
        if (layer in layers and field != "bias") or field in ("q_scale", "k_scale", "v_scale", "softmax_scale"):
            continue
        float_state[key] = t.double()
    codes_w = {}  # integer codes minus zero point: their float64 sums are exact
    for name in layers:
        q = state[f"{name}.weight"].double()
        shape = (-1,) + (1,) * (q.dim() - 1)
        if f"{name}.weight_zp" in state:
            q = q - state[f"{name}.weight_zp"].double().view(shape)
        codes_w[name] = q
        float_state[f"{name}.weight"] = q * state[f"{name}.weight_scale"].double().view(shape)
    model.load_state_dict(float_state, strict=True)

    def int_forward(name, module):
        """The layer's arithmetic as the issue states it, through torch's float64 linear/conv2d."""
        mul = state[f"{name}.smoothquant_mul"].double()
        s_in = state[f"{name}.input_scale"].double()
        scale = s_in * state[f"{name}.weight_scale"].double()
        conv = isinstance(module, torch.nn.Conv2d)
        view = (1, -1, 1, 1) if conv else (-1,)

        def forward(x):
            codes = torch.clamp(torch.round(x * mul.view(view) / s_in), -128, 127)
            if conv:
                acc = F.conv2d(codes, codes_w[name], None, module.stride, module.padding)
            else:
                acc = F.linear(codes, codes_w[name])
            y = acc * scale.view(view)
            return y if module.bias is None else y + module.bias.view(view)

        return forward

    for name in layers:
        module = model.get_submodule(name)
        module.forward = int_forward(name, module)
    fp8 = meta["quantization"].get("fp8_dtype")
    if fp8:
        for name, m in model.named_modules():
            if type(m).__name__ == "Attention":
                m.set_processor(_Fp8FakeQuantProcessor(state, name, getattr(torch, fp8)))
    return model


class _Fp8FakeQuantProcessor:
    """diffusers attention with Q, K, V and the softmax output fake-quantized to fp8 (float64)."""

    def __init__(self, state, name, fp8):
        self.s = {p: state[f"{name}.{p}_scale"].double() for p in ("q", "k", "v", "softmax")}
        self.fp8, self.fmax = fp8, float(torch.finfo(fp8).max)

    def codes(self, x, s):
        return torch.clamp(x / s, -self.fmax, self.fmax).to(self.fp8).double()

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        b = hidden_states.shape[0]
        split = lambda t: t.view(b, -1, attn.heads, t.shape[-1] // attn.heads).transpose(1, 2)  # noqa: E731
        q = self.codes(split(attn.to_q(hidden_states)), self.s["q"])
        k = self.codes(split(attn.to_k(context)), self.s["k"])
        v = self.codes(split(attn.to_v(context)), self.s["v"])
        probs = torch.softmax(q @ k.transpose(-1, -2) * (self.s["q"] * self.s["k"] * q.shape[-1] ** -0.5), dim=-1)
        out = (self.codes(probs, self.s["softmax"]) @ v) * (self.s["softmax"] * self.s["v"])
        out = out.transpose(1, 2).reshape(b, -1, attn.heads * q.shape[-1])
        return attn.to_out[1](attn.to_out[0](out))


def _inputs64(config, batch, timestep, seed=0):
    x = make_inputs(config, Signature(batch, 64, 64), seed)
    x["timestep"] = torch.full_like(x["timestep"], float(timestep))
    return {k: v.double() if v.is_floating_point() else v for k, v in x.items()}


def _diffusers_call(model, x):
    return model(
        x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
        added_cond_kwargs={"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]},
    ).sample


# Bug caught: a wrong exclusion list (quantizing conv_in or the embeddings, or skipping a projection),
# or projections that read one tensor not sharing one input quantizer.
def test_plan_is_every_linear_and_conv_but_the_embeddings_and_outer_convs(checkpoints):
    from diffusers import UNet2DConditionModel

    from punet.config import UNetConfig

    config = UNetConfig.from_json(checkpoints[FAMILY] / "config.json")
    ref = UNet2DConditionModel.from_pretrained(checkpoints[FAMILY])
    expected = [
        n for n, m in ref.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        and not n.startswith(("time_embedding", "add_embedding", "conv_in", "conv_out")) and "time_emb_proj" not in n
    ]
    layers = plan(config)
    assert sorted(m.name for m in layers) == sorted(expected)
    groups = {m.name: m.group for m in layers}
    attn1 = next(n for n in groups if n.endswith("attn1.to_q"))
    base = attn1.rpartition(".")[0]
    assert {groups[f"{base}.to_{p}"] for p in "qkv"} == {f"{base}.to_qkv"}
    attn2 = base[:-1] + "2"
    assert groups[f"{attn2}.to_q"] == f"{attn2}.to_q"
    assert {groups[f"{attn2}.to_{p}"] for p in "kv"} == {f"{attn2}.to_kv"}
    assert groups[f"{base}.to_out.0"] == f"{base}.to_out.0"


# Bug caught: any slip in the integer math (im2col order, stride or padding, the scale product, the
# smoothing multiplier's axis, round mode, saturation, bias order): punet's float64 quantized model
# must equal diffusers' modules computing the same arithmetic.
@pytest.mark.parametrize("scheme,batch,timestep", [("int8", 1, 0), ("int8", 2, 10), ("int8", 1, 999), ("fp8", 2, 500)])
def test_float64_quantized_model_is_exact_against_fake_quant_diffusers(archives, scheme, batch, timestep):
    model, config = load_model(archives[scheme], dtype="float64")
    ref = _diffusers_fake_quant(archives[scheme])
    x = _inputs64(config, batch, timestep, seed=batch + timestep)
    with torch.inference_mode():
        ours = model(**x)
        theirs = _diffusers_call(ref, x)
    assert ours.dtype == torch.float64
    assert rel_l2(ours, theirs) <= 1e-6


# Bug caught: the weight zero point ignored or applied with the wrong sign (asymmetric Brevitas weights).
def test_asymmetric_weights_are_exact(archives, tmp_path):
    folder = tmp_path / "asym"
    shutil.copytree(archives["brevitas"], folder)
    qp = json.loads((folder / "quant_params.json").read_text())
    params = load_file(folder / "params.safetensors")
    names = [n for n in qp if n.endswith(("conv1", "ff.net.2"))][:2]
    assert len(names) == 2
    for name in names:
        w = params[f"{name}.weight"]
        n = w.shape[0]
        zp = torch.arange(n) % 7 - 3
        entry = qp[name]
        entry["weight_zp"] = zp.tolist()
        entry["weight_zp_shape"] = [n] + [1] * (w.dim() - 1)
        entry["weight_zp_dtype"] = "torch.int8"
    (folder / "quant_params.json").write_text(json.dumps(qp))
    out = tmp_path / "asym.irpa"
    import_checkpoint(str(folder), out)
    _, state = load_irpa(out)
    assert sorted(k for k in state if k.endswith(".weight_zp")) == sorted(f"{n}.weight_zp" for n in names)
    assert (state[f"{names[0]}.weight_zp"] != 0).any()
    model, config = load_model(out, dtype="float64")
    x = _inputs64(config, 1, 500)
    with torch.inference_mode():
        assert rel_l2(model(**x), _diffusers_call(_diffusers_fake_quant(out), x)) <= 1e-6


# Bug caught: a Brevitas writer or reader that loses a bit anywhere (fused split order, scales through
# JSON, dequantized weights that do not round back to their codes, float tensors altered, the fp8
# attention quantizers or their fp8 type lost).
@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_brevitas_round_trip_is_bit_exact(archives, tmp_path, scheme):
    folder = archives["brevitas" if scheme == "int8" else "fp8_brevitas"]
    out = tmp_path / "back.irpa"
    meta = import_checkpoint(str(folder), out)
    assert meta["quantization"]["method"] == "brevitas"
    assert meta["quantization"].get("fp8_dtype") == read_metadata(archives[scheme])["quantization"].get("fp8_dtype")
    _, a = load_irpa(archives[scheme])
    _, b = load_irpa(out)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    params = load_file(folder / "params.safetensors")
    fused = [k for k in params if k.endswith("attn1.to_qkv.weight")]
    assert fused and not any(k.endswith(("attn1.to_q.weight", "attn2.to_k.weight")) for k in params)
    d = params[fused[0]].shape[1]
    assert params[fused[0]].shape == (3 * d, d)
    # ... and writing the imported archive again gives the same files.
    config, state = load_irpa(out)
    again = tmp_path / "again"
    write_folder(again, config, read_metadata(out)["config_json"], state, meta["quantization"].get("fp8_dtype", ""))
    assert (again / "quant_params.json").read_text() == (folder / "quant_params.json").read_text()


def _mutate_json(folder, edit):
    qp = json.loads((folder / "quant_params.json").read_text())
    edit(qp)
    (folder / "quant_params.json").write_text(json.dumps(qp))


def _first(qp, suffix):
    return next(k for k in qp if k.endswith(suffix))


BAD_JSON = {
    "extra layer": (lambda qp: qp.__setitem__("down_blocks.9.resnets.0.conv1", qp[_first(qp, "conv1")]), "down_blocks.9.resnets.0.conv1"),
    "missing layer": (lambda qp: qp.pop(_first(qp, "conv2")), "no entry for quantized layer"),
    "shape vs list": (lambda qp: qp[_first(qp, "conv1")].__setitem__("weight_scale_shape", [3, 1, 1, 1]), "weight_scale_shape"),
    "shape vs weight": (
        lambda qp: qp[_first(qp, "conv1")].update(weight_scale=[1.0, 1.0], weight_scale_shape=[2, 1, 1, 1]),
        "weight_scale: has 2 values",
    ),
    "nonzero input_zp": (lambda qp: qp[_first(qp, "to_qkv")].__setitem__("input_zp", 3), "input_zp: is 3"),
    "unknown dtype": (lambda qp: qp[_first(qp, "to_kv")].__setitem__("input_zp_dtype", "torch.int7"), "input_zp_dtype: unknown dtype"),
    "nan scale": (lambda qp: qp[_first(qp, "proj_in")].__setitem__("input_scale", float("nan")), "input_scale: has NaN"),
    "zero scale": (lambda qp: qp[_first(qp, "proj_out")].__setitem__("input_scale", 0.0), "input_scale: has zero"),
    "inf scale": (lambda qp: qp[_first(qp, "ff.net.2")]["weight_scale"].__setitem__(0, float("inf")), "weight_scale: has NaN or inf"),
    "unknown field": (lambda qp: qp[_first(qp, "conv1")].__setitem__("bias_scale", 1.0), "bias_scale: unknown field"),
}


# Bug caught: a malformed Brevitas folder imported silently (or with a traceback), or a half-written archive.
@pytest.mark.parametrize("case", list(BAD_JSON))
def test_brevitas_faults_are_one_line_and_write_nothing(archives, tmp_path, case):
    folder = tmp_path / "bad"
    shutil.copytree(archives["brevitas"], folder)
    edit, expected = BAD_JSON[case]
    _mutate_json(folder, edit)
    out = tmp_path / "bad.irpa"
    with pytest.raises(PunetError, match=None) as e:
        import_checkpoint(str(folder), out)
    msg = str(e.value)
    assert "\n" not in msg and expected in msg and "quant_params.json" in msg, msg
    assert not out.exists() and list(tmp_path.glob(".bad.irpa*")) == []


# Bug caught: a fused weight whose rows disagree with the model accepted (split at the wrong place).
def test_brevitas_fused_weight_shape_is_checked(archives, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(archives["brevitas"], folder)
    params = load_file(folder / "params.safetensors")
    key = next(k for k in params if k.endswith("to_qkv.weight"))
    params[key] = params[key][:-1]
    save_file(params, str(folder / "params.safetensors"))
    with pytest.raises(PunetError, match=f"{key}.*has shape"):
        import_checkpoint(str(folder), tmp_path / "x.irpa")


# Bug caught: calibration scales that do not cover the inputs seen (clipping), SmoothQuant applied on the
# wrong side (weights divided instead of multiplied), or float tensors altered by quantization.
def test_calibration_follows_smoothquant_and_max_abs(archives):
    from punet.eager import call_model
    from punet.quant.calibrate import calibration_inputs

    fmodel, config = load_model(archives["f32"])
    _, fstate = load_irpa(archives["f32"])
    _, qstate = load_irpa(archives["int8"])
    name = next(m.name for m in plan(config) if m.name.endswith("resnets.0.conv2"))
    seen = []
    h = fmodel.get_submodule(name).register_forward_pre_hook(lambda m, a: seen.append(a[0].abs().amax(dim=(0, 2, 3))))
    for x in calibration_inputs(config, 2, 0, 64, 64, "float32"):
        call_model(fmodel, x)
    h.remove()
    a = torch.stack(seen).amax(0).double()
    w = fstate[f"{name}.weight"].double()
    w_max = w.abs().amax(dim=(0, 2, 3))
    s = a ** 0.5 / w_max ** 0.5
    mul = qstate[f"{name}.smoothquant_mul"].double()
    torch.testing.assert_close(mul, 1 / s, rtol=1e-6, atol=0)
    torch.testing.assert_close(qstate[f"{name}.input_scale"].double(), (a * mul).max() / 127, rtol=1e-6, atol=0)
    smoothed = w * s.view(1, -1, 1, 1)
    scale = qstate[f"{name}.weight_scale"].double()
    torch.testing.assert_close(scale, smoothed.abs().amax(dim=(1, 2, 3)) / 127, rtol=1e-6, atol=0)
    deq = qstate[f"{name}.weight"].double() * scale.view(-1, 1, 1, 1)
    assert (deq - smoothed).abs().max() <= scale.max() / 2 * 1.0001
    assert qstate[f"{name}.weight"].abs().max() == 127
    quantized = {m.name for m in plan(config)}
    for k, v in fstate.items():
        if k.rpartition(".")[0] not in quantized or k.endswith(".bias"):
            assert torch.equal(qstate[k], v), k


# Bug caught: int8 weights stored wider than int8, or float copies of quantized weights left in the archive.
def test_archive_holds_int8_weights_and_is_smaller(archives):
    _, state = load_irpa(archives["int8"])
    config, _ = load_irpa(archives["f32"])
    for m in plan(config):
        assert state[f"{m.name}.weight"].dtype == torch.int8
        assert state[f"{m.name}.weight_scale"].dtype == torch.float32
        assert (state[f"{m.name}.weight_scale"] > 0).all()
    quantized = sum(state[f"{m.name}.weight"].numel() for m in plan(config))
    scales = sum(v.numel() for k, v in state.items() if k.endswith(("_scale", "smoothquant_mul")))
    f32_size, q_size = archives["f32"].stat().st_size, archives["int8"].stat().st_size
    # int8 saves 3 bytes per quantized weight; the scales cost 4 bytes each, every entry at most
    # 128 bytes of alignment and index, the metadata less than 64 KiB.
    assert q_size <= f32_size - 3 * quantized + 4 * scales + 128 * len(state) + 65536
    assert read_metadata(archives["int8"])["quantization"]["scheme"] == "int8"


# Bug caught: a second quantization of a quantized archive, or an out-of-range alpha, accepted.
def test_quantize_refuses_bad_requests(archives, tmp_path):
    with pytest.raises(PunetError, match="already quantized"):
        quantize_archive(archives["int8"], tmp_path / "x.irpa")
    with pytest.raises(PunetError, match="--smoothquant-alpha"):
        quantize_archive(archives["f32"], tmp_path / "x.irpa", alpha=1.5)
    with pytest.raises(PunetError, match="unknown quantization scheme"):
        quantize_archive(archives["f32"], tmp_path / "x.irpa", scheme="int4")
    assert not (tmp_path / "x.irpa").exists()


# Bug caught: an int8 module compiled with the transpose propagation that halves its speed (the head
# split folded into the int8 projections), or with the stack check that refuses the default size's
# im2col; a float module (or a GPU one) changed by either.
def test_quantized_modules_drop_the_transpose_propagation():
    from punet.compile import compile_flags, get_target
    from punet.compile.targets import quantized_flags

    cpu = get_target("cpu")
    flags = compile_flags(cpu, tuned=True)
    assert quantized_flags(cpu, flags, "") == flags
    assert "--iree-opt-aggressively-propagate-transposes" not in quantized_flags(cpu, flags, "int8")
    assert "--iree-opt-data-tiling" in quantized_flags(cpu, flags, "int8")
    # ... and they turn off the stack check the default 1024x1024 im2col exceeds; the installed
    # iree-compile knows the flag (an unknown flag is a hard error).
    stack = "--iree-llvmcpu-fail-on-out-of-bounds-stack-allocation=false"
    assert stack in quantized_flags(cpu, flags, "int8") and stack not in flags
    gpu = get_target("gfx942")
    assert quantized_flags(gpu, compile_flags(gpu, tuned=True), "int8") == compile_flags(gpu, tuned=True)
    from punet.compile import iree_compile

    help_text = subprocess.run([iree_compile(), "--help-hidden"], capture_output=True, text=True).stdout
    assert stack.split("=")[0] in help_text


# Bug caught: an int8 module sent to a Vulkan profile without 8-bit support reaching iree-compile
# (a minute, then "failed to legalize operation 'vector.bitcast'") instead of one line up front.
def test_targets_without_int8_refuse_quantized_modules(archives):
    from punet.compile import get_target, plan_compile

    config, _ = load_irpa(archives["int8"])
    sig = Signature(1, 64, 64, quant="int8")
    with pytest.raises(PunetError, match="target vulkan does not take int8 modules.*vector.bitcast.*use vulkan-rdna"):
        plan_compile(get_target("vulkan"), sig, config, tuned=True, decomposed=True)
    for name in ("cpu", "gfx942", "gfx950", "sm_89", "vulkan-rdna3"):
        plan_compile(get_target(name), Signature(1, 64, 64, "float16", quant="int8"), config, tuned=True, decomposed=True)
    # fp8 attention: MI300 computes e4m3fnuz, MI350 e4m3fn; IREE 3.13's CUDA backend none (measured on sm_89).
    fnuz = Signature(1, 64, 64, "float16", quant="int8-fp8attn", fp8="float8_e4m3fnuz")
    fn = Signature(1, 64, 64, "float16", quant="int8-fp8attn", fp8="float8_e4m3fn")
    plan_compile(get_target("gfx942"), fnuz, config, tuned=True, decomposed=True)
    plan_compile(get_target("gfx950"), fn, config, tuned=True, decomposed=True)
    with pytest.raises(PunetError, match="target gfx950 does not compute float8_e4m3fnuz.*--fp8-dtype float8_e4m3fn;.*gfx942"):
        plan_compile(get_target("gfx950"), fnuz, config, tuned=True, decomposed=True)
    with pytest.raises(PunetError, match="target gfx942 does not compute float8_e4m3fn .*--fp8-dtype float8_e4m3fnuz"):
        plan_compile(get_target("gfx942"), fn, config, tuned=True, decomposed=True)
    for cuda in ("sm_80", "sm_89"):
        with pytest.raises(PunetError, match=f"target {cuda} does not take int8-fp8attn modules"):
            plan_compile(get_target(cuda), fn, config, tuned=True, decomposed=True)
    with pytest.raises(PunetError, match="arith.truncf"):
        plan_compile(get_target("sm_89"), fn, config, tuned=True, decomposed=True)
