"""Every target in punet.compile.targets compiles, plain and tuned, with the installed iree-compile.

The input is a tiny SDXL-like block exported with iree-turbine (conv2d, group_norm, silu,
linear, attention (decomposed as punet's model writes it for the targets that want it: by (row, head)
slices for the CPU targets, in one batched matmul for the GPUs), gelu, nearest upsample, cat). GPU targets are cross-compiled: no GPU is
needed. The `cpu` target's binaries are also run and compared with torch eager.
"""

from __future__ import annotations

import os
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import punet.model.layers as layers
from punet.compile.targets import (
    TARGETS,
    Target,
    compile_flags,
    get_target,
    matmul_tile_flags,
    module_flags,
    packed_flags,
    packed_ukernel_flags,
)
from punet.config import UNetConfig
from punet.signature import Signature, deepest_latent

from .vmfb_check import check_vmfb

NAMES = list(TARGETS)
TUNED = [pytest.param(False, id="plain"), pytest.param(True, id="tuned")]

# Targets that cannot take an fp16 model (see their `notes`): compiled from the fp32 export.
FP32_ONLY = {"vulkan"}


class TinyBlock(nn.Module):
    """The op mix of an SDXL UNet block (incl. punet's 1x1 shortcut conv), at toy size, batch 2 (a CFG step's rows).

    Every matmul dimension is >= 16 (Vulkan's cooperative-matrix kernels need it), and
    the 8x8 feature map is deliberately not a multiple of 16 wide.
    """

    def __init__(
        self, channels: int = 32, ctx_dim: int = 16, heads: int = 2, decompose_attention: bool = False, sliced: bool = True
    ):
        super().__init__()
        self.heads = heads
        self.decompose_attention, self.sliced = decompose_attention, sliced
        self.conv_in = nn.Conv2d(4, channels, 3, padding=1)
        self.norm = nn.GroupNorm(4, channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_kv = nn.Linear(ctx_dim, 2 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        self.shortcut = layers.PointwiseConv2d(channels, channels)
        self.conv_out = nn.Conv2d(2 * channels, 4, 3, padding=1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.decompose_attention and self.sliced:
            # punet's CPU form with one (batch row, head) pair per slice, as SDXL's self-attention at
            # 512x512 and 1024x1024 runs it.
            return layers.decomposed_attention(q, k, v, scores_per_slice=q.shape[2] * k.shape[2])
        if self.decompose_attention:  # the GPUs' form: every pair in one batched matmul
            return layers._softmax_attention(q, k, v)
        return F.scaled_dot_product_attention(q, k, v)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        b, c, hh, ww = h.shape
        tokens = F.silu(self.norm(h)).reshape(b, c, hh * ww).transpose(1, 2)
        d = c // self.heads
        q = self.to_q(tokens).reshape(b, -1, self.heads, d).transpose(1, 2)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        k = k.reshape(b, -1, self.heads, d).transpose(1, 2)
        v = v.reshape(b, -1, self.heads, d).transpose(1, 2)
        a = self.attention(q, k, v).transpose(1, 2).reshape(b, -1, c)
        tokens = tokens + F.gelu(self.to_out(a))
        y = tokens.transpose(1, 2).reshape(b, c, hh, ww)
        skip = self.shortcut(h)
        y = torch.cat([F.interpolate(y, scale_factor=2.0, mode="nearest"), F.interpolate(skip, scale_factor=2.0)], dim=1)
        return self.conv_out(y)


def tiny_case(
    dtype: torch.dtype, decompose_attention: bool, sliced: bool = True
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(0)
    model = TinyBlock(decompose_attention=decompose_attention, sliced=sliced).to(dtype).eval()
    args = (torch.randn(2, 4, 8, 8, dtype=dtype), torch.randn(2, 16, 16, dtype=dtype))
    return model, args


def iree_compile_tool() -> str:
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


def variant(target: Target) -> tuple[torch.dtype, bool, bool]:
    """(dtype, attention decomposed, by slices) of the module the target compiles."""
    dtype = torch.float32 if target.name in FP32_ONLY else torch.float16
    return dtype, target.decompose_attention, target.decompose_attention and target.slice_attention


@pytest.fixture(scope="module")
def mlirs(tmp_path_factory) -> dict[tuple[torch.dtype, bool], Path]:
    """The tiny block exported once per (dtype, decompose_attention, sliced) that some target needs."""
    from iree.turbine import aot

    root = tmp_path_factory.mktemp("targets_mlir")
    out = {}
    for key in sorted({variant(t) for t in TARGETS.values()}, key=str):
        dtype, decompose, sliced = key
        model, args = tiny_case(dtype, decompose, sliced)
        form = ("sliced" if sliced else "decomposed") if decompose else "sdpa"
        path = root / f"tiny_{str(dtype).split('.')[-1]}_{form}.mlir"
        aot.export(model, args=args).save_mlir(path)
        if decompose:  # one softmax per (row, head) slice on the CPU targets, one in all on the GPUs
            softmaxes = path.read_text().count("torch.aten.softmax.int")
            assert softmaxes == (args[0].shape[0] * model.heads if sliced else 1), path
        out[key] = path
    return out


def _compile(tool: str, mlir: Path, vmfb: Path, flags: list[str]) -> tuple[list[str], subprocess.CompletedProcess]:
    cmd = [tool, str(mlir), "-o", str(vmfb), *flags]
    return cmd, subprocess.run(cmd, capture_output=True, text=True, check=False)


@pytest.fixture(scope="module")
def compiled(request, mlirs, tmp_path_factory):
    """compiled(name, tuned) -> vmfb path, asserting that iree-compile succeeded.

    iree-compile is mostly single-threaded on these tiny inputs, so every (target, variant)
    the selected tests need is started up front, os.cpu_count() at a time (not under
    pytest-xdist, whose workers each run only part of the module).
    """
    root = tmp_path_factory.mktemp("targets_vmfb")
    tool = iree_compile_tool()

    def submit(pool, name: str, tuned: bool):
        target = TARGETS[name]
        vmfb = root / f"{name}_{'tuned' if tuned else 'plain'}.vmfb"
        return vmfb, pool.submit(_compile, tool, mlirs[variant(target)], vmfb, compile_flags(target, tuned=tuned))

    pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1))
    jobs = {}
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        for item in request.session.items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            if item.module is request.module and "tuned" in params:
                key = (params.get("name", "cpu"), params["tuned"])
                if key not in jobs:
                    jobs[key] = submit(pool, *key)

    def get(name: str, tuned: bool) -> Path:
        if (name, tuned) not in jobs:
            jobs[(name, tuned)] = submit(pool, name, tuned)
        vmfb, future = jobs[(name, tuned)]
        cmd, proc = future.result()
        errors = [ln for ln in proc.stderr.splitlines() if "error" in ln.lower()][:5]
        assert proc.returncode == 0, f"iree-compile failed for {name}: {' '.join(cmd)}\n" + "\n".join(
            errors or proc.stderr.splitlines()[-20:]
        )
        assert vmfb.is_file() and vmfb.stat().st_size > 0, f"{name}: no vmfb written"
        return vmfb

    yield get
    pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize("tuned", TUNED)
@pytest.mark.parametrize("name", NAMES)
def test_target_compiles(name: str, tuned: bool, compiled) -> None:
    """The .vmfb loads as a VM module exporting `main` (2 inputs, 1 output) with the target's executables."""
    check_vmfb(compiled(name, tuned), TARGETS[name], "main", 2)


def _host_has_avx2() -> bool:
    try:
        return " avx2 " in f" {Path('/proc/cpuinfo').read_text().replace(chr(10), ' ')} "
    except OSError:
        return False


@pytest.mark.parametrize("tuned", TUNED)
@pytest.mark.parametrize("name", ["cpu", "cpu-avx2"])
def test_cpu_matches_torch(name: str, tuned: bool, compiled) -> None:
    """Guards: a CPU target's flags (the host's, or the AVX2 fleet's) giving wrong numbers on this machine."""
    import iree.runtime as ireert

    if name == "cpu-avx2" and not _host_has_avx2():
        pytest.skip("this host has no AVX2")
    target = get_target(name)
    dtype, decompose, sliced = variant(target)
    model, args = tiny_case(dtype, decompose, sliced)
    module = ireert.load_vm_flatbuffer_file(str(compiled(name, tuned)), driver=target.driver)
    result = module.main(*[a.numpy() for a in args])
    actual = torch.from_numpy(np.asarray(result.to_host() if hasattr(result, "to_host") else result))
    with torch.no_grad():
        expected = model.float()(*[a.float() for a in args])
    assert actual.dtype == dtype and actual.shape == expected.shape
    # fp16 end to end against an fp32 reference.
    torch.testing.assert_close(actual.float(), expected, atol=2e-2, rtol=2e-2)


def test_table_shape() -> None:
    for name, t in TARGETS.items():
        assert t.name == name
        assert t.backend in {"llvm-cpu", "rocm", "vulkan-spirv", "cuda"}
        assert t.driver in {"local-task", "hip", "vulkan", "cuda"}
        assert any(f.startswith("--iree-hal-target-device=") for f in t.flags), name
        if t.backend == "vulkan-spirv":  # SPIR-V cannot compile iree_linalg_ext.online_attention
            assert t.decompose_attention, name
        # The device flag matches the backend, and no flag is given twice (the last one would silently win).
        device = {"llvm-cpu": "local", "rocm": "hip", "vulkan-spirv": "vulkan", "cuda": "cuda"}[t.backend]
        assert f"--iree-hal-target-device={device}" in compile_flags(t, tuned=False), name
        keys = [f.split("=", 1)[0] for f in compile_flags(t, tuned=True)]
        assert len(keys) == len(set(keys)), f"{name}: {sorted(k for k in keys if keys.count(k) > 1)}"
        if t.backend in ("rocm", "cuda") and name != "hopper":  # hopper ships sm_80 PTX (see its notes)
            assert f"--iree-{t.backend}-target={name}" in t.flags, name
    # Known values: the plain set is the device only, the tuned set appends to it.
    gfx942 = ["--iree-hal-target-device=hip", "--iree-rocm-target=gfx942"]
    assert compile_flags(get_target("gfx942"), tuned=False) == gfx942
    cpu = ["--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
           "--iree-llvmcpu-target-cpu=host", "--iree-opt-aggressively-propagate-transposes"]
    assert compile_flags(get_target("cpu"), tuned=False) == cpu
    tuned = ["--iree-opt-data-tiling", "--iree-llvmcpu-enable-ukernels=all",
             "--iree-llvmcpu-matmul-tile-bytes=2097152"]
    assert compile_flags(get_target("cpu"), tuned=True) == cpu + tuned
    # bf16 convolutions as im2col matmuls (3x faster in IREE 3.13, docs/cpu-tuning.md): tuned set only, CPU only.
    im2col = ["--iree-global-opt-use-im2col-for-convs"]
    for name in ("cpu", "cpu-avx2", "cpu-generic"):
        base = compile_flags(get_target(name), tuned=True)
        assert compile_flags(get_target(name), tuned=True, dtype="bfloat16") == base + im2col, name
    assert compile_flags(get_target("cpu"), tuned=False, dtype="bfloat16") == cpu
    # ... for one row at a time: at two, IREE 3.13's bf16 im2col fails to compile
    # (docs/repro/cpu-bf16-im2col-rows.py); multi-row modules write them by rows (tests/test_pack.py's CFG case).
    assert compile_flags(get_target("cpu"), tuned=True, dtype="bfloat16", rows=2) == cpu + tuned
    assert compile_flags(get_target("cpu"), tuned=True, dtype="float16") == cpu + tuned
    for name in ("gfx942", "sm_80", "vulkan"):
        t = get_target(name)
        assert compile_flags(t, tuned=True, dtype="bfloat16") == compile_flags(t, tuned=True), name
    assert compile_flags(get_target("hopper"), tuned=False)[-1] == "--iree-cuda-target=sm_80"
    for required in ("cpu", "cpu-avx2", "cpu-generic", "gfx942", "gfx950", "gfx1100", "gfx1201", "vulkan", "vulkan-rdna3",
                     "vulkan-ampere", "sm_80", "sm_86", "sm_89", "hopper"):
        assert required in TARGETS


def test_packed_ukernels() -> None:
    """A packed fp32 build of cpu / cpu-avx2 (data-tiled convolutions) names the convolution microkernel
    alone, so that its matmuls go through IREE's code generator (on a Zen 4: 1.04-1.10x faster at 256x256,
    1.01-1.09x at 512x512, bit-identical; docs/cpu-tuning.md); every other build keeps the set's `all`."""
    uk = "--iree-llvmcpu-enable-ukernels="

    def build(name, dtype="float32", packed=True, quant=""):
        flags = packed_flags(compile_flags(get_target(name), tuned=True, dtype=dtype), packed)
        return flags, packed_ukernel_flags(flags, name, dtype=dtype, quant=quant)

    for name in ("cpu", "cpu-avx2"):
        before, after = build(name)
        assert [f for f in after if f.startswith(uk)] == [f"{uk}conv_nchwc"], name
        assert [f for f in after if not f.startswith(uk)] == [f for f in before if not f.startswith(uk)], name
    for kw in (dict(name="cpu-generic"),  # not measured
               dict(name="cpu", dtype="bfloat16"),  # im2col: no data-tiled convolutions
               dict(name="cpu", dtype="float16"),
               dict(name="cpu", packed=False),  # weights repacked at load: convolutions not data-tiled
               dict(name="cpu", quant="int8")):  # the int8 matmuls' microkernels
        before, after = build(**kw)
        assert after == before and f"{uk}all" in after, kw


def test_matmul_tile_budget() -> None:
    """Where the smallest feature map has <= 64 tokens (SDXL at 256x256: 8x8), a one-row float module's
    matmul tile budget is 256K elements per operand, not the set's 2 MiB, and so is a two-row fp32 one's
    (a CFG step); a two-row bf16 module keeps 2 MiB (docs/cpu-tuning.md)."""
    tuned = compile_flags(get_target("cpu"), tuned=True)
    budget = "--iree-llvmcpu-matmul-tile-bytes="
    assert f"{budget}2097152" in tuned

    def tiles(flags):
        return [f for f in flags if f.startswith(budget)]

    assert tiles(matmul_tile_flags(tuned, dtype="float32", rows=1, min_tokens=64)) == [f"{budget}1048576"]
    assert tiles(matmul_tile_flags(tuned, dtype="bfloat16", rows=1, min_tokens=16)) == [f"{budget}524288"]
    assert tiles(matmul_tile_flags(tuned, dtype="float32", rows=2, min_tokens=64)) == [f"{budget}1048576"]
    # the rest of the set, in order, is kept
    assert [f for f in matmul_tile_flags(tuned, dtype="float32", rows=1, min_tokens=64) if not f.startswith(budget)] == [
        f for f in tuned if not f.startswith(budget)]
    for kw in (dict(dtype="float32", rows=1, min_tokens=256),  # SDXL at 512x512: 16x16
               dict(dtype="bfloat16", rows=2, min_tokens=64),  # a bf16 CFG step: level, the set's budget
               dict(dtype="float32", rows=3, min_tokens=64),  # more rows: not measured, the set's budget
               dict(dtype="int8", rows=1, min_tokens=64)):
        assert matmul_tile_flags(tuned, **kw) == tuned, kw
    plain = compile_flags(get_target("cpu"), tuned=False)  # no budget to replace
    assert matmul_tile_flags(plain, dtype="float32", rows=1, min_tokens=64) == plain
    # The SDXL base config's smallest map: 8x8 at 256x256, 16x16 at 512x512.
    sdxl = UNetConfig.from_json(Path(__file__).parent / "data" / "configs" / "sdxl-base-1.0-unet.json")
    assert deepest_latent(sdxl, Signature(1, 256, 256)) == (8, 8)
    assert deepest_latent(sdxl, Signature(1, 512, 512)) == (16, 16)


def test_module_flags() -> None:
    """`module_flags`, which `punet compile` and the CPU benches share, applies every rule, in order: the
    tile budget (float only), quantized, packed + its microkernels (which need the packed set's
    data-tiled convolutions first), devices. Catches a rule dropped, applied to the wrong module, or
    applied before the rule it depends on."""
    cpu = get_target("cpu")
    budget, uk = "--iree-llvmcpu-matmul-tile-bytes=", "--iree-llvmcpu-enable-ukernels="
    conv = "--iree-dispatch-creation-experimental-set-data-tiling-ops=convolution"
    transposes, im2col = "--iree-opt-aggressively-propagate-transposes", "--iree-global-opt-use-im2col-for-convs"

    def picked(flags, prefix):
        return [f for f in flags if f.startswith(prefix)]

    # fp32 256x256 packed (smallest map 8x8 = 64 tokens): 1 MiB, data-tiled convolutions on their microkernel
    f = module_flags(cpu, tuned=True, min_tokens=64, packed=True)
    assert picked(f, budget) == [f"{budget}1048576"] and picked(f, uk) == [f"{uk}conv_nchwc"]
    assert conv in f and transposes not in f
    # the same unpacked: weights used in place, so transposes propagate and every microkernel stays
    f = module_flags(cpu, tuned=True, min_tokens=64)
    assert picked(f, uk) == [f"{uk}all"] and transposes in f and conv not in f
    # 512x512 (16x16 = 256 tokens) and an unknown map keep the set's 2 MiB
    for tokens in (256, None):
        assert picked(module_flags(cpu, tuned=True, min_tokens=tokens, packed=True), budget) == [f"{budget}2097152"]
    # int8 at 64 tokens: no float tile budget, the quantized flags, the int8 microkernels kept
    f = module_flags(cpu, tuned=True, min_tokens=64, quant="int8", packed=True)
    assert picked(f, budget) == [f"{budget}2097152"] and picked(f, uk) == [f"{uk}all"]
    assert transposes not in f and all(q in f for q in cpu.quant_flags)
    # a bf16 CFG step: im2col only where its convolutions take one row at a time
    assert im2col in module_flags(cpu, tuned=True, dtype="bfloat16", rows=2, conv_rows=1)
    assert im2col not in module_flags(cpu, tuned=True, dtype="bfloat16", rows=2)
    # two devices: one device flag each, no data tiling
    f = module_flags(cpu, tuned=True, devices=2)
    assert picked(f, "--iree-hal-target-device=") == [
        "--iree-hal-target-device=local[0]", "--iree-hal-target-device=local[1]"]
    assert "--iree-opt-data-tiling" not in f
    # plain flags take no rule but the packed one
    assert module_flags(cpu, tuned=False, min_tokens=64) == compile_flags(cpu, tuned=False)


def test_unknown_target_raises() -> None:
    with pytest.raises(ValueError, match="no-such-gpu") as info:
        get_target("no-such-gpu")
    assert "gfx942" in str(info.value)
