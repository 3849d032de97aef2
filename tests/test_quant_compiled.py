"""Quantized punet compiled for the CPU: integer ops in the MLIR, each layer kind exact, the whole UNet
within the measured float32 noise of the exact (float64) model.

A user's path, by the CLI: import -> quantize -> export -> compile --target cpu -> run.
"""

from __future__ import annotations

import re

import pytest
import torch

from punet.builtin import write_checkpoint
from punet.quant import plan
from punet.quant.layers import QuantConv2d, QuantLinear
from punet.quant.scheme import LayerPlan
from punet.signature import Signature, make_inputs
from punet.tensors import load_tensors, save_tensors
from punet.weights import load_irpa

from .conftest import MICRO_SDXL, rel_l2, run_cli

HW = ("--height", "64", "--width", "64")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant_compiled")
    write_checkpoint(root / "ckpt", MICRO_SDXL)
    steps = [
        ["import", "ckpt", "-o", "f32.irpa"],
        ["quantize", "f32.irpa", "-o", "int8.irpa", "--calibration-samples", "2", *HW],
    ]
    for batch in ("1", "2"):
        mlir = f"unet_b{batch}_64x64_f32_int8.mlir"
        steps += [["export", "int8.irpa", "--batch", batch, *HW], ["compile", mlir, "--target", "cpu"]]
    for args in steps:
        r = run_cli(*args, cwd=root)
        assert r.returncode == 0, (args, r.stderr)
    return root


# Bug caught: int8 weights dequantized to float before a float matmul (no integer compute in the
# module), or a quantized layer exported through the float path.
def test_mlir_has_one_int8_matmul_per_quantized_layer(built):
    config, _ = load_irpa(built / "int8.irpa")
    text = (built / "unet_b1_64x64_f32_int8.mlir").read_text()
    int_mm = re.findall(r"torch\.aten\._int_mm %\S+, %\S+ : !torch\.vtensor<\[\d+,\d+\],si8>, "
                        r"!torch\.vtensor<\[\d+,\d+\],si8> -> !torch\.vtensor<\[\d+,\d+\],si32>", text)
    assert len(int_mm) == len(plan(config))
    # What stays float: the time and text-time embeddings' Linears, each resnet's time projection,
    # conv_in and conv_out.
    floats = len(re.findall(r"torch\.aten\.(?:linear|conv2d|convolution) ", text))
    resnets = sum(1 for m in plan(config) if m.name.endswith(".conv1"))
    assert floats == 2 + 2 + resnets + 2


def _run(built, vmfb, inputs, out):
    r = run_cli("run", vmfb, "--irpa", "int8.irpa", "--inputs", inputs, "-o", out, cwd=built)
    assert r.returncode == 0, r.stderr
    return load_tensors(built / out)["sample"]


def _eager(built, inputs, dtype, out):
    r = run_cli("run", "int8.irpa", "--inputs", inputs, "--dtype", dtype, "-o", out, cwd=built)
    assert r.returncode == 0, r.stderr
    return load_tensors(built / out)["sample"]


# Bug caught: the compiled integer path computing something else than the eager one (a transposed
# weight, a lost zero point, scales applied twice). Rounding flips make the error chaotic input by
# input: one input flips nothing, the next flips a code in some layer and the flip cascades (a few
# percent here). So float32's noise is measured as the spread of eager float32 around the exact
# float64 model over the inputs (timesteps 0, 10 and 999, batch 1 and 2) and over runs whose every
# quantizer input is nudged by a few float32 ulps (2^-20 relative: what another summation order in
# the float layers does to a float32 evaluation), and the compiled module must stay within twice
# that noise: its median within twice eager's median (a systematic error moves every input), its
# largest within twice the largest.
def test_compiled_int8_within_twice_the_float32_noise(built):
    from punet.eager import call_model
    from punet.weights import load_model

    config, _ = load_irpa(built / "f32.irpa")
    q32, _ = load_model(built / "int8.irpa", dtype="float32")
    g = torch.Generator().manual_seed(0)

    def nudge(_module, args):  # a few ulps up or down on every value a quantizer reads
        x = args[0]
        return (x * (1 + (torch.rand(x.shape, generator=g) * 2 - 1) * 2.0**-20),)

    for m in q32.modules():
        if isinstance(m, (QuantLinear, QuantConv2d)):
            m.register_forward_pre_hook(nudge)
    noise, spread, compiled = [], [], []
    for batch in (1, 2):
        for t in (0, 10, 999):
            x = make_inputs(config, Signature(batch, 64, 64), seed=t)
            x["timestep"] = torch.full_like(x["timestep"], float(t))
            name = f"in_b{batch}_t{t}.safetensors"
            save_tensors(built / name, x)
            exact = _eager(built, name, "float64", f"f64_{batch}_{t}.safetensors")
            eager = _eager(built, name, "float32", f"f32_{batch}_{t}.safetensors")
            iree = _run(built, f"unet_b{batch}_64x64_f32_int8.cpu.vmfb", name, f"iree_{batch}_{t}.safetensors")
            noise.append(rel_l2(eager, exact))
            compiled.append(rel_l2(iree, exact))
            for _ in range(4):
                spread.append(rel_l2(call_model(q32, x), exact))
    print(f"eager f32 vs f64: {[f'{v:.1e}' for v in noise]}, nudged: {[f'{v:.1e}' for v in spread]}; "
          f"compiled vs f64: {[f'{v:.1e}' for v in compiled]}")
    assert 0 < max(noise + spread) < 0.3  # a few percent on this model (docs/quantization.md)
    assert sorted(compiled)[len(compiled) // 2] <= 2 * sorted(noise)[len(noise) // 2]
    assert max(compiled) <= 2 * max(noise + spread)


def _compile_module(module: torch.nn.Module, x: torch.Tensor):
    """A single layer exported with its buffers inlined, compiled with the `cpu` target's tuned flags."""
    return _compile_module_args(module, (x,))


def _compile_module_args(module: torch.nn.Module, args: tuple[torch.Tensor, ...]):
    import iree.compiler as ic
    import iree.runtime as rt
    from iree.turbine import aot

    from punet.compile import get_target

    t = get_target("cpu")
    mlir = str(aot.export(module, args=args, strict_export=False).mlir_module)
    flags = [f for f in t.flags + t.tuned_flags if not f.startswith("--iree-hal-target-device")]
    vmfb = ic.compile_str(mlir, target_backends=["llvm-cpu"], extra_args=flags)
    return rt.load_vm_flatbuffer(vmfb, driver="local-task")


def _layer(cls, layer: LayerPlan, seed: int, **kw):
    g = torch.Generator().manual_seed(seed)
    m = cls(layer, bias=True, asymmetric=False, **kw)
    m.weight.copy_(torch.randint(-128, 128, m.weight.shape, generator=g, dtype=torch.int8))
    m.bias.copy_(torch.randn(m.bias.shape, generator=g))
    m.weight_scale.copy_(torch.rand(m.weight_scale.shape, generator=g) * 1e-2 + 1e-3)
    m.input_scale.fill_(0.037)
    m.smoothquant_mul.copy_(torch.rand(m.smoothquant_mul.shape, generator=g) + 0.5)
    return m.eval()


def _off_boundary(m, shape, channel_dim, seed):
    """Inputs whose codes x * mul / s lie 0.2 away from any rounding boundary, some beyond the int8 range."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-140, 141, shape, generator=g).double() + (torch.rand(shape, generator=g).double() - 0.5) * 0.6
    view = [1] * len(shape)
    view[channel_dim] = -1
    return (codes * m.input_scale.double() / m.smoothquant_mul.double().view(view)).float()


LAYERS = {
    "linear": (QuantLinear, LayerPlan("l", "linear", 96, 40), {}, (2, 7, 96), -1),
    "conv3x3": (QuantConv2d, LayerPlan("c", "conv", 16, 24, 3), {"padding": 1}, (2, 16, 9, 7), 1),
    "conv1x1": (QuantConv2d, LayerPlan("c", "conv", 16, 24, 1), {"padding": 0}, (1, 16, 6, 6), 1),
    "conv3x3_stride2": (QuantConv2d, LayerPlan("c", "conv", 16, 8, 3, 2), {"padding": 1}, (1, 16, 9, 8), 1),
}


# Bug caught: a layer kind that IREE computes differently from the integer math (im2col tap order,
# stride, padding, per-channel scales on the wrong axis), hidden end to end by the other layers' noise.
@pytest.mark.parametrize("kind", list(LAYERS))
def test_each_layer_kind_compiled_equals_the_float64_math(kind):
    cls, layer, kw, shape, channel_dim = LAYERS[kind]
    m = _layer(cls, layer, seed=len(kind), **kw)
    x = _off_boundary(m, shape, channel_dim, seed=1)
    module = _compile_module(m, x)
    got = torch.from_numpy(module.main(x.numpy()).to_host())
    m64 = _layer(cls, layer, seed=len(kind), **kw).double()
    with torch.inference_mode():
        exact = m64(x.double())
    assert got.shape == exact.shape
    # Off the boundaries every code is the same, so only float32's rounding of the scaled sum remains.
    torch.testing.assert_close(got.double(), exact, rtol=2e-6, atol=2e-6 * exact.abs().max().item())


def _fp8_attention(fp8: str, seed: int = 0):
    from punet.model.layers import Attention
    from punet.quant.layers import Fp8Attention

    dim, heads, ctx = 32, 2, 24
    attn = Attention(dim, heads, dim // heads, ctx)
    for name in ("to_q", "to_k", "to_v", "to_out.0"):
        lin = attn.get_submodule(name)
        layer = LayerPlan(name, "linear", lin.in_features, lin.out_features)
        q = _layer(QuantLinear, layer, seed=seed + len(name))
        if lin.bias is None:
            q.bias = None
        parent, _, leaf = name.rpartition(".")
        if parent:
            attn.to_out[0] = q
        else:
            setattr(attn, leaf, q)
    m = Fp8Attention(attn, fp8)
    m.q_scale.fill_(0.05)
    m.k_scale.fill_(0.04)
    m.v_scale.fill_(0.03)
    m.softmax_scale.fill_(1 / torch.finfo(m.fp8).max)
    return m.eval()


class _WithContext(torch.nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x, context):
        return self.attn(x, context)


# Bug caught: IREE rounding to fp8 differently from torch (saturation, the fnuz type's range, NaN
# encoding), or the scales of the fp8 attention matmuls lost in export.
@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e4m3fnuz"])
def test_fp8_attention_compiled_equals_eager(fp8):
    m = _fp8_attention(fp8)
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 10, 32, generator=g), torch.randn(2, 7, 24, generator=g)
    from iree.turbine import aot

    text = str(aot.export(_WithContext(m), args=(x, ctx), strict_export=False).mlir_module)
    assert len(re.findall(r"-> !torch\.vtensor<\[[\d,]+\],f8E4M3FN" + ("UZ" if fp8.endswith("fnuz") else ">"), text)) == 4
    module = _compile_module_args(_WithContext(m), (x, ctx))
    got = torch.from_numpy(module.main(x.numpy(), ctx.numpy()).to_host())
    with torch.inference_mode():
        eager = m(x, ctx)
    torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5 * eager.abs().max().item())


# Bug caught: an int8 module that cross-compiles for the CPU but not for the GPUs users serve on.
# About a minute per target: opt in with -m matrix.
@pytest.mark.matrix
@pytest.mark.parametrize("target", ["gfx942", "gfx950", "sm_89", "vulkan-rdna3"])
def test_int8_compiles_for_gpus(built, target, tmp_path):
    r = run_cli("import", "ckpt", "--dtype", "float16", "-o", str(tmp_path / "f16.irpa"), cwd=built)
    assert r.returncode == 0, r.stderr
    for args in (
        ["quantize", str(tmp_path / "f16.irpa"), "-o", str(tmp_path / "q.irpa"), "--calibration-samples", "1", *HW],
        ["export", str(tmp_path / "q.irpa"), *HW, "-o", str(tmp_path / "q.mlir")],
        ["compile", str(tmp_path / "q.mlir"), "--target", target],
    ):
        r = run_cli(*args, cwd=built)
        assert r.returncode == 0, (args, r.stderr)
    assert (tmp_path / f"q.{target}.vmfb").stat().st_size > 0
