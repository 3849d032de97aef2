"""Per-target iree-compile flags, as data.

One table, `TARGETS`, maps a target name to the exact flags handed to
`iree-compile` (IREE 3.13). Every flag here was checked against the installed
compiler (it rejects unknown flags, and flag names change between releases)
and every target, plain and tuned, is compiled in tests/test_targets.py on a
CPU-only machine (cross-compilation for GPUs needs no GPU).

`flags` is the plain set: the device and the architecture (and, for Vulkan,
the one preprocessing pass without which an fp16 UNet does not compile).
`tuned_flags` is appended for the tuned variant. They are derived from IREE's
and shark-ai's own SDXL UNet configurations, rewritten for 3.13:

* IREE CI, iree-org/iree-test-suites
  sharktank_models/quality_tests/sdxl/unet_fp16_rocm.json and
  unet_fp16_960_1024_rocm.json (SDXL fp16 UNet on MI300), and the
  experimental/regression_suite SDXL tests (their CPU_COMPILE_FLAGS; the CPU
  sets below are trimmed to what measured well: docs/cpu-tuning.md);
* shark-ai, shortfin/python/shortfin_apps/sd/examples/sdxl_flags_gfx942.txt,
  sdxl_flagfile_gfx1100.txt, sdxl_flagfile_gfx1201.txt ("all" + "unet");
* SHARK-ModelDev turbine_models/custom_models/sd_inference/utils.py
  (Vulkan flags).

Renamed or dropped for 3.13:

* `--iree-hip-waves-per-eu` -> `--iree-rocm-waves-per-eu`, and
  `--iree-hip-target` -> `--iree-rocm-target` (the `--iree-hip-*` spellings
  are unknown to 3.13);
* `--iree-llvmgpu-enable-prefetch=true` -> `--iree-llvmgpu-prefetch-num-stages=2`
  (iree-org/iree#23568 replaced the bool; 2 stages is what `true` meant);
* `--iree-codegen-gpu-native-math-precision` is gone (a no-op since
  iree-org/iree#21636);
* `--iree-global-opt-propagate-transposes`, `--iree-codegen-llvmgpu-use-vector-distribution`,
  `--iree-hal-indirect-command-buffers` and `--iree-hal-memoization` are on by
  default (iree-org/iree#21617), so they are left out;
* `--iree-scheduling-dump-statistics-*` only write a report; left out;
* `iree-dispatch-creation-canonicalize` (a pass some older pipelines name) does
  not exist in 3.13; `iree-flow-canonicalize` does.

Stdlib only; importing this module must stay cheap.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    name: str  # e.g. "gfx942"
    backend: str  # "llvm-cpu" | "rocm" | "vulkan-spirv" | "cuda"
    driver: str  # IREE runtime device to run it on: "local-task", "hip", "vulkan", "cuda"
    description: str  # one line, e.g. "AMD Instinct MI300 (CDNA3)"
    flags: tuple[str, ...]  # plain flag set, incl. --iree-hal-target-device=... and the arch flag
    tuned_flags: tuple[str, ...]  # extra flags appended for the tuned variant
    # Attention as matmul + fp32 softmax (punet's decomposition): with the tuned set, and with the plain
    # set. `punet compile` re-exports a fused module decomposed (from its signature) when the set needs it.
    decompose_attention: bool = False
    decompose_attention_plain: bool = False
    attention_reason: str = ""
    # Except: a module of these dtypes whose every attention key length is a multiple of this stays fused
    # (CUDA: IREE's fused attention is fast for aligned keys and falls back to a scalar kernel otherwise).
    fused_attention_key_multiple: int = 0
    fused_attention_dtypes: tuple[str, ...] = ()
    # Module dtypes the target takes at all (others are refused before iree-compile), and those its tuned
    # set is for (others compile with the plain set, said in one line and in the build record).
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    dtype_reason: str = ""
    tuned_dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")
    tuned_dtype_reason: str = ""
    # Flags the tuned set adds for a module of one dtype whose convolutions take one batch row at a time
    # (one-row modules, and the CPU's form of multi-row bf16 ones: punet.export.conv_rows): ((dtype, flags), ...).
    tuned_dtype_flags: tuple[tuple[str, tuple[str, ...]], ...] = ()
    plain_refused: str = ""  # why `--plain` is refused for this target (measured wrong output), if it is
    # Quantization schemes (punet.quant) the target compiles; others are refused before iree-compile.
    quant_schemes: tuple[str, ...] = ("int8",)
    quant_reason: str = ""
    # fp8 element types the target computes (fp8 attention, scheme int8-fp8attn): none by default.
    fp8_dtypes: tuple[str, ...] = ()
    # Flags a quantized module needs on top of the set (with the reason beside them).
    quant_flags: tuple[str, ...] = ()
    notes: str = ""

    def __post_init__(self):  # the tuned set is never for a dtype the target refuses
        object.__setattr__(self, "tuned_dtypes", tuple(d for d in self.tuned_dtypes if d in self.dtypes))

    @property
    def slice_attention(self) -> bool:
        """Whether decomposed attention runs by slices of (batch row, head) pairs (`punet.model.layers`).

        The CPU's form: one pair's scores stay in cache (1.09x at 512x512, docs/cpu-tuning.md). On the
        GPUs all pairs go in one batched matmul: on an H200 the slices made the CUDA CFG step at
        1024x1024 1.4x slower (280 vs 192 ms) and its compile 4.6x longer (docs/benchmarks.md, run 15).
        """
        return self.backend == "llvm-cpu"


# ---------------------------------------------------------------------------
# Plain device flags
# ---------------------------------------------------------------------------

_LLVM_CPU = ("--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu")


def _hip(arch: str) -> tuple[str, ...]:
    return ("--iree-hal-target-device=hip", f"--iree-rocm-target={arch}")


# Vulkan needs convolutions in NHWC even for the plain set: on the cooperative-
# matrix targets (rdna3, rdna4, ampere, ada) every fp16 NCHW 1x1 convolution --
# SDXL's ResNet shortcuts -- fails with "no GPU subgroup mma compute ops
# generated". This is the first pass of IREE's own SDXL pipelines.
_VULKAN_PREPROCESS = (
    "--iree-preprocessing-pass-pipeline=builtin.module(iree-preprocessing-transpose-convolution-pipeline)"
)


def _vulkan(arch: str) -> tuple[str, ...]:
    return ("--iree-hal-target-device=vulkan", f"--iree-vulkan-target={arch}", _VULKAN_PREPROCESS)


def _cuda(arch: str) -> tuple[str, ...]:
    return ("--iree-hal-target-device=cuda", f"--iree-cuda-target={arch}")


# ---------------------------------------------------------------------------
# Tuned flag sets
# ---------------------------------------------------------------------------

# CPU: measured on the full-size SDXL UNet (docs/cpu-tuning.md). Data tiling with
# the mmt4d microkernels is the one large win (1.3x faster than torch eager fp32
# at 256x256 on a 2-core Zen 3), but with IREE 3.13 it fails on the fused
# attention dispatch ("operations with large vector sizes"), so the CPU targets
# export attention as matmul + softmax. Data tiling repacks weights at load
# (about 0.7x the archive in extra RAM); the plain set is the zero-copy one.
_CPU_TUNED = (
    "--iree-opt-data-tiling",
    "--iree-llvmcpu-enable-ukernels=all",
    # Distribution tiles of data-tiled matmuls up to 2 MiB per operand (IREE's default 256 KiB). A UNet
    # call reads each weight once, from memory rather than cache. With the default, the 1280-wide level's
    # GEGLU projection (256 tokens) gets 16-row workgroup tiles and reads its 52 MB weight 16 times; with
    # 2 MiB, one tile spans the 256 rows. Full-size SDXL fp32 at 512x512: 8.24 / 8.27 s vs 9.27 / 9.68 s
    # per call (docs/cpu-tuning.md).
    "--iree-llvmcpu-matmul-tile-bytes=2097152",
)

# bf16 on CPU: convolutions as im2col + data-tiled bf16 matmuls. IREE 3.13's bf16 convolutions, direct or
# data-tiled, run at about 15% of the peak: full-size SDXL bf16 at 256x256 on an AVX-512 BF16 Zen 4 took
# 5.27 s per call with the tuned set and 5.17 s packed (3.5 s of it in the 3x3 convolutions, against 0.45 s
# for the same convolutions in fp32); with im2col 1.78 s and 1.60 s packed (docs/cpu-tuning.md).
# One batch row only: on two (batch 2, or a CFG step's negative and positive rows) iree-compile fails on
# the first convolution's im2col ("'arith.addf' op requires the same type for all operands and results",
# a bf16 + f32 add; docs/repro/cpu-bf16-im2col-rows.py). So the CPU's form of such a module writes each
# convolution one row at a time (punet.export.conv_rows, `RowwiseConv2d`), and compile counts one row.
_IM2COL = "--iree-global-opt-use-im2col-for-convs"
_CPU_TUNED_BY_DTYPE = (("bfloat16", (_IM2COL,)),)

# An int8 convolution is im2col + int8 matmul; at 1024x1024 (the default export size) the strided
# downsampler's im2col dispatch needs 65 KiB of stack ("exceeded stack allocation limit of 32768
# bytes ... Got 66560 bytes", measured on builtin:tiny-sdxl; 256 and 512 compile with the check on).
# Without the check it compiles and runs (compiled vs float64 4.7e-2, eager float32 vs float64
# 4.6e-2 on the same input: rounding flips, docs/quantization.md).
_CPU_QUANTIZED = ("--iree-llvmcpu-fail-on-out-of-bounds-stack-allocation=false",)

# Folds weight transposes into the matmuls. Without it IREE hoists
# transpose(weight) of every batch-1 Linear into a load-time initializer that
# copies 8.8 GB of a 10.3 GB SDXL archive; with it every parameter is used in
# place from the memory-mapped .irpa (docs/cpu-tuning.md).
_CPU_ZERO_COPY = ("--iree-opt-aggressively-propagate-transposes",)

# The target-neutral part of IREE CI's unet_fp16_rocm.json.
_GPU_COMMON = (
    "--iree-opt-const-eval=false",
    "--iree-opt-strip-assertions=true",
    "--iree-dispatch-creation-enable-fuse-horizontal-contractions=true",
    "--iree-dispatch-creation-enable-aggressive-fusion=true",
    "--iree-opt-aggressively-propagate-transposes=true",
    "--iree-opt-outer-dim-concat=true",
    "--iree-opt-generalize-matmul=true",
    "--iree-opt-data-tiling=false",
    "--iree-vm-target-truncate-unsupported-floats",
)

# IREE CI's FP16_UNET_FLAGS preprocessing: NCHW convs -> NHWC, and pad ops to
# the MMA intrinsic sizes of the target -- restricted here to contractions.
# In 3.13, padding 3x3 convolutions (the pass's default, pad-target-type=all)
# breaks whenever a feature map's width is not a multiple of 16 ("'linalg.generic'
# op inferred input/output operand #0 has shape's dimension #1 to be greater than
# or equal to 34, but found 32"): SDXL at 1024 px wide is fine (128/64/32), but
# e.g. 832x1216 SDXL or SD 1.x at 512 px (8x8 level) would not compile.
_PAD_CONTRACTIONS = "iree-preprocessing-pad-to-intrinsics{pad-target-type=contraction}"
_FP16_UNET_PREPROCESS = (
    "--iree-preprocessing-pass-pipeline="
    f"builtin.module(iree-preprocessing-transpose-convolution-pipeline,{_PAD_CONTRACTIONS})"
)

# shark-ai's sdxl_flagfile_gfx1201.txt / sdxl_flags_gfx942.txt pipeline (same
# pad-to-intrinsics restriction).
_SHARK_PREPROCESS = (
    "--iree-preprocessing-pass-pipeline="
    "builtin.module(util.func(iree-global-opt-raise-special-ops, iree-flow-canonicalize), "
    f"iree-preprocessing-transpose-convolution-pipeline, {_PAD_CONTRACTIONS}, "
    "util.func(iree-preprocessing-generalize-linalg-matmul-experimental))"
)

# AMD Instinct (CDNA): unet_fp16_rocm.json as a whole, plus the indirect
# command buffers every shark-ai SDXL flagfile sets.
_CDNA_TUNED = _GPU_COMMON + (
    "--iree-llvmgpu-prefetch-num-stages=2",
    "--iree-rocm-waves-per-eu=2",
    "--iree-execution-model=async-external",
    "--iree-hal-force-indirect-command-buffers",
    _FP16_UNET_PREPROCESS,
)

# Radeon RDNA3: shark-ai sdxl_flagfile_gfx1100.txt ("all" + "unet"): no
# aggressive fusion, no preprocessing pipeline, no waves-per-eu hint.
_RDNA3_TUNED = (
    "--iree-execution-model=async-external",
    "--iree-opt-const-eval=false",
    "--iree-opt-outer-dim-concat=true",
    "--iree-opt-aggressively-propagate-transposes=true",
    "--iree-hal-force-indirect-command-buffers",
    "--iree-llvmgpu-prefetch-num-stages=2",
    "--iree-opt-data-tiling=false",
    "--iree-vm-target-truncate-unsupported-floats",
    "--iree-dispatch-creation-enable-fuse-horizontal-contractions=true",
)

# Radeon RDNA4: shark-ai sdxl_flagfile_gfx1201.txt ("all" + "unet").
_RDNA4_TUNED = _RDNA3_TUNED + (
    "--iree-dispatch-creation-enable-aggressive-fusion=true",
    _SHARK_PREPROCESS,
)

# Flags of the target-neutral GPU set that the CUDA set leaves out, and why. Measured on an H200 (sm_80 PTX,
# docs/repro/cuda-f16-tokens.md): in float16, either flag alone on top of the plain set turns
# `(x @ W^T).reshape(B, H, W, C).permute(0, 3, 1, 2)` -- every transformer's exit back to NCHW -- wrong
# (relative L2 0.7-0.99 against torch); without both, every piece of the UNet and the whole tiny and
# full-size UNets are right at 64 and at 77 text tokens (they were wrong at any multiple of 16 before:
# GPU runs 4-7), and the full-size CFG step is 3% faster (192.8 vs 198.7 ms at 77 tokens).
CUDA_DROPPED = {
    "--iree-opt-generalize-matmul=true": (
        "IREE 3.13's CUDA code for a float16 matmul whose result is permuted (tokens back to NCHW) is wrong "
        "with it (docs/repro/cuda-f16-tokens.md)"
    ),
    "--iree-opt-aggressively-propagate-transposes=true": (
        "IREE 3.13's CUDA code for a float16 matmul with the NCHW permute folded into it is wrong "
        "(docs/repro/cuda-f16-tokens.md)"
    ),
}

# CUDA: IREE has no SDXL CUDA configuration of its own; this is the
# target-neutral part of the ROCm one (the AMD-only hints left out) without
# CUDA_DROPPED. Keep the horizontal fusion of contractions: on an H100 the SDXL
# CFG step was wrong without it (relative L2 0.165 vs torch; docs/benchmarks.md,
# GPU runs 2-3); the unfused projections' head split is a permute too, so it is probably the same
# bug (no-hfuse was not measured with CUDA_DROPPED out: docs/repro/cuda-f16-tokens.md, round 2).
_CUDA_TUNED = tuple(f for f in _GPU_COMMON if f not in CUDA_DROPPED) + (_FP16_UNET_PREPROCESS,)
_CUDA_PLAIN_REFUSED = (
    "IREE 3.13's plain CUDA flags miscompile the SDXL UNet (relative L2 1.59 against torch on an H100, "
    "fused or decomposed attention; docs/benchmarks.md); compile without --plain"
)

# Vulkan: the target-neutral part minus three flags the SPIR-V path cannot
# take in 3.13, plus the SD flags of turbine_models' compile_to_vmfb for
# vulkan-spirv (64-bit resource indexing for multi-GB weights, no constants
# inlined into dispatches). Left out: aggressive fusion (vp_android_baseline_2022
# then overflows its 16 KiB of shared memory), aggressive transpose propagation
# and matmul generalization (the cooperative-matrix targets -- rdna3/rdna4/
# ampere/ada -- then fail: "no GPU subgroup mma compute ops generated"), and
# pad-to-intrinsics (it pads for MMA intrinsics the SPIR-V path does not use the
# same way; besides, a second --iree-preprocessing-pass-pipeline would replace
# the NHWC pipeline the plain Vulkan set needs).
_VULKAN_TUNED = (
    "--iree-opt-const-eval=false",
    "--iree-opt-strip-assertions=true",
    "--iree-dispatch-creation-enable-fuse-horizontal-contractions=true",
    "--iree-opt-outer-dim-concat=true",
    "--iree-opt-data-tiling=false",
    "--iree-vm-target-truncate-unsupported-floats",
    "--iree-stream-resource-max-allocation-size=4294967296",
    "--iree-stream-resource-index-bits=64",
    "--iree-vm-target-index-bits=64",
    "--iree-flow-inline-constants-max-byte-length=1",
)

_CPU_ATTENTION = (
    "IREE 3.13's data tiling cannot compile the fused SDXL attention dispatch ('operations with large vector sizes')"
)
_VULKAN_ATTENTION = "the SPIR-V backend cannot compile iree_linalg_ext.online_attention"
_CUDA_ATTENTION = (
    "on an H100 the SDXL CFG step ran 2.3x faster with attention as matmul + softmax (203 vs 465 ms; "
    "docs/benchmarks.md): IREE 3.13 runs attention over the 77 text tokens on a scalar fallback kernel; "
    "an fp16 module whose key lengths are all multiples of 16 (64 tokens) stays fused (1.08x faster on an H200)"
)
_FP32_ONLY_VULKAN = (
    "VP_ANDROID_baseline_2022 has no 16-bit arithmetic or storage and 16 KiB of shared memory"
)

_VULKAN_NO_BF16 = (
    "IREE 3.13's SPIR-V backend cannot lower bf16 ('failed to legalize operation vector.bitcast')"
)

_VULKAN_ATTENTION_NOTE = (
    "Attention must be exported as matmul+softmax: the SPIR-V backend fails on "
    "iree_linalg_ext.online_attention ('result #0 must be variadic of ranked tensor')."
)
# Measured on an NVIDIA H200, driver 580.159.04 (docs/benchmarks.md, GPU run 15), tiny-sdxl CFG step.
_VULKAN_NVIDIA_FP16_NOTE = (
    " On NVIDIA's driver (H200) float16 modules fail at load: 'NVVM compilation failed: 1', then "
    "VK_ERROR_UNKNOWN from vkCreateComputePipelines (tiny-sdxl and full size alike); float32 runs "
    "right (tiny-sdxl relative L2 4.2e-6 against torch fp32)."
)

# What every CUDA target shares: the tuned set, attention decomposed, and the measured refusal of --plain.
_CUDA_RULES = dict(
    backend="cuda",
    driver="cuda",
    tuned_flags=_CUDA_TUNED,
    decompose_attention=True,
    decompose_attention_plain=True,
    attention_reason=_CUDA_ATTENTION,
    # On an H200 the fp16 CFG step at 64 tokens ran 1.08x faster with every attention fused (161.9 vs
    # 174.6 ms, correct: docs/benchmarks.md run 16); bf16 and fp32 fused were not measured.
    fused_attention_key_multiple=16,
    fused_attention_dtypes=("float16",),
    plain_refused=_CUDA_PLAIN_REFUSED,
)


def _cpu_target(name: str, cpu: str, description: str, notes: str) -> Target:
    """An llvm-cpu target for `--iree-llvmcpu-target-cpu=cpu`. Portable ones (any `cpu` but the build
    host's) name the x86-64 triple too, so that the result is x86-64 even when compiled on another host."""
    triple = () if cpu == "host" else ("--iree-llvmcpu-target-triple=x86_64-unknown-unknown-eabi-elf",)
    return Target(
        name=name,
        quant_schemes=("int8", "int8-fp8attn"),
        fp8_dtypes=("float8_e4m3fn", "float8_e4m3fnuz",),
        quant_flags=_CPU_QUANTIZED,
        backend="llvm-cpu",
        driver="local-task",
        description=description,
        flags=_LLVM_CPU + triple + (f"--iree-llvmcpu-target-cpu={cpu}",) + _CPU_ZERO_COPY,
        tuned_flags=_CPU_TUNED,
        tuned_dtype_flags=_CPU_TUNED_BY_DTYPE,
        decompose_attention=True,
        attention_reason=_CPU_ATTENTION,
        notes=notes,
    )


def _table(*targets: Target) -> dict[str, Target]:
    return {t.name: t for t in targets}


TARGETS: dict[str, Target] = _table(
    # ---------------------------------------------------------------- CPU
    _cpu_target(
        "cpu",
        "host",
        "This machine's CPU (all of its ISA extensions)",
        "The .vmfb uses every feature of the CPU it was compiled on (e.g. AVX-512) and may "
        "crash with an illegal instruction elsewhere; use cpu-avx2 or cpu-generic to ship. "
        "--iree-opt-level=O3 is not in tuned: it failed on the SDXL UNet "
        "('exceeded stack allocation limit'). Attention is exported decomposed: data tiling "
        "cannot compile the fused SDXL attention dispatch in IREE 3.13.",
    ),
    _cpu_target(
        "cpu-avx2",
        "x86-64-v3",
        "Any x86-64 CPU with AVX2, FMA and F16C (x86-64-v3: Intel Haswell, AMD Zen and newer)",
        "The tuned CPU set for a fleet of AVX2 machines, built on any host: no AVX-512 even where "
        "the build machine has it (data tiling then packs for AVX2's 8-wide tiles). On an AVX-512 "
        "host it measures the AVX2 code path (docs/cpu-tuning.md).",
    ),
    _cpu_target(
        "cpu-generic",
        "generic",
        "Any x86-64 CPU (baseline x86-64, SSE2)",
        "Portable but slow: no AVX/FMA, and without F16C every fp16<->fp32 conversion is "
        "done in software; cpu-avx2 (Haswell/Zen and newer: AVX2, FMA, F16C) is the usual "
        "faster portable choice.",
    ),
    # --------------------------------------------------------------- ROCm
    Target(
        name="gfx942",
        quant_schemes=("int8", "int8-fp8attn"),
        fp8_dtypes=("float8_e4m3fnuz",),
        backend="rocm",
        driver="hip",
        description="AMD Instinct MI300X/MI300A/MI325X (CDNA3)",
        flags=_hip("gfx942"),
        tuned_flags=_CDNA_TUNED + ("--iree-codegen-enable-default-tuning-specs=true",),
        tuned_dtypes=("float16", "bfloat16"),
        tuned_dtype_reason=(
            "with it, fp32 3x3 convolutions exceed the 64 KiB of shared memory: 'uses 81920 bytes of shared memory'"
        ),
        notes=(
            "Tuned = IREE CI unet_fp16_rocm.json. The compiler ships a gfx942 tuning spec "
            "with SDXL UNet attention/matmul configs, off by default; tuned turns it on."
        ),
    ),
    Target(
        name="gfx950",
        quant_schemes=("int8", "int8-fp8attn"),
        fp8_dtypes=("float8_e4m3fn",),
        backend="rocm",
        driver="hip",
        description="AMD Instinct MI350X/MI355X (CDNA4)",
        flags=_hip("gfx950"),
        tuned_flags=_CDNA_TUNED,
        notes=(
            "No SDXL configuration of IREE's own for gfx950; tuned reuses the CDNA3 one. "
            "IREE 3.13 ships no default tuning spec for gfx950. Plain flags crash the 3.13 "
            "compiler (in getXorShuffleParamsForTunedChipset) on a toy-sized 1x128 @ 128x32 "
            "matmul; SDXL's shapes (and the tuned set) compile."
        ),
    ),
    Target(
        name="gfx1100",
        backend="rocm",
        driver="hip",
        description="AMD Radeon RX 7900 XTX/XT, PRO W7900 (RDNA3)",
        flags=_hip("gfx1100"),
        tuned_flags=_RDNA3_TUNED,
        notes="Tuned = shark-ai sdxl_flagfile_gfx1100.txt (all + unet).",
    ),
    Target(
        name="gfx1201",
        backend="rocm",
        driver="hip",
        description="AMD Radeon RX 9070 XT/9070 (RDNA4)",
        flags=_hip("gfx1201"),
        tuned_flags=_RDNA4_TUNED,
        notes="Tuned = shark-ai sdxl_flagfile_gfx1201.txt (all + unet).",
    ),
    # ------------------------------------------------------------- Vulkan
    Target(
        name="vulkan",
        backend="vulkan-spirv",
        driver="vulkan",
        description="Any Vulkan 1.1 GPU (IREE's VP_ANDROID_baseline_2022 profile), fp32 only",
        flags=_vulkan("vp_android_baseline_2022"),
        tuned_flags=_VULKAN_TUNED,
        decompose_attention=True,
        decompose_attention_plain=True,
        attention_reason=_VULKAN_ATTENTION,
        dtypes=("float32",),
        dtype_reason=_FP32_ONLY_VULKAN,
        quant_schemes=(),
        quant_reason=(
            "VP_ANDROID_baseline_2022 has no 8-bit storage or arithmetic: iree-compile fails with "
            "\"failed to legalize operation 'vector.bitcast'\" (vector<4xi8> -> vector<1xi32>) on the int8 layers"
        ),
        notes=(
            "vp_android_baseline_2022 is the only vendor-neutral Vulkan target IREE 3.13 knows "
            "(`generic`/`unknown` are rejected: \"Unknown Vulkan target\"). It assumes no fp16 "
            "arithmetic, no 16-bit storage, no subgroup ops and 16 KiB of shared memory, so it "
            "compiles fp32 models only: an fp16 UNet fails in group-norm reductions "
            "('uses 32768 bytes of shared memory; exceeded the limit of 16384 bytes'). Export "
            "fp32 for it, or use a vendor variant (vulkan-rdna3, vulkan-ampere, ...) for fp16. "
            "On an NVIDIA H200 (driver 580.159.04) it loads and runs but computes wrong results "
            "(tiny-sdxl relative L2 1.4e-1 against torch fp32, where vulkan-ampere gives 4.2e-6): "
            "use vulkan-ampere or vulkan-ada on NVIDIA GPUs. "
            + _VULKAN_ATTENTION_NOTE
        ),
    ),
    Target(
        name="vulkan-rdna2",
        backend="vulkan-spirv",
        driver="vulkan",
        description="AMD Radeon RX 6000 (RDNA2) via Vulkan",
        flags=_vulkan("rdna2"),
        tuned_flags=_VULKAN_TUNED,
        decompose_attention=True,
        decompose_attention_plain=True,
        attention_reason=_VULKAN_ATTENTION,
        dtypes=("float32", "float16"),
        dtype_reason=_VULKAN_NO_BF16,
        notes=_VULKAN_ATTENTION_NOTE,
    ),
    Target(
        name="vulkan-rdna3",
        backend="vulkan-spirv",
        driver="vulkan",
        description="AMD Radeon RX 7000 (RDNA3) via Vulkan",
        flags=_vulkan("rdna3"),
        tuned_flags=_VULKAN_TUNED,
        decompose_attention=True,
        decompose_attention_plain=True,
        attention_reason=_VULKAN_ATTENTION,
        dtypes=("float32", "float16"),
        dtype_reason=_VULKAN_NO_BF16,
        notes=_VULKAN_ATTENTION_NOTE,
    ),
    Target(
        name="vulkan-rdna4",
        backend="vulkan-spirv",
        driver="vulkan",
        description="AMD Radeon RX 9000 (RDNA4) via Vulkan",
        flags=_vulkan("rdna4"),
        tuned_flags=_VULKAN_TUNED,
        decompose_attention=True,
        decompose_attention_plain=True,
        attention_reason=_VULKAN_ATTENTION,
        dtypes=("float32", "float16"),
        dtype_reason=_VULKAN_NO_BF16,
        notes=_VULKAN_ATTENTION_NOTE,
    ),
    Target(
        name="vulkan-ampere",
        backend="vulkan-spirv",
        driver="vulkan",
        description="NVIDIA RTX 30 / A-series (Ampere, sm_80 details) via Vulkan",
        flags=_vulkan("ampere"),
        tuned_flags=_VULKAN_TUNED,
        decompose_attention=True,
        decompose_attention_plain=True,
        attention_reason=_VULKAN_ATTENTION,
        dtypes=("float32", "float16"),
        dtype_reason=_VULKAN_NO_BF16,
        notes=(
            "Uses cooperative-matrix (16x16x16) kernels; IREE 3.13 fails on a matmul with a "
            "dimension below 16 ('no GPU subgroup mma compute ops generated'), e.g. a toy "
            "model with 8 text tokens. SD shapes (64/77 tokens, head dim 64) compile. "
            + _VULKAN_ATTENTION_NOTE + _VULKAN_NVIDIA_FP16_NOTE
        ),
    ),
    Target(
        name="vulkan-ada",
        backend="vulkan-spirv",
        driver="vulkan",
        description="NVIDIA RTX 40 / L4 / L40 (Ada Lovelace, sm_89) via Vulkan",
        flags=_vulkan("sm_89"),
        tuned_flags=_VULKAN_TUNED,
        decompose_attention=True,
        decompose_attention_plain=True,
        attention_reason=_VULKAN_ATTENTION,
        dtypes=("float32", "float16"),
        dtype_reason=_VULKAN_NO_BF16,
        notes="Same cooperative-matrix caveat as vulkan-ampere. " + _VULKAN_ATTENTION_NOTE + _VULKAN_NVIDIA_FP16_NOTE,
    ),
    # --------------------------------------------------------------- CUDA
    Target(
        name="sm_80",
        description="NVIDIA A100 / A30 (Ampere, sm_80)",
        flags=_cuda("sm_80"),
        **_CUDA_RULES,
        notes="PTX ISA 7.6 for sm_80, JIT-compiled by the driver at load.",
    ),
    Target(
        name="sm_86",
        description="NVIDIA RTX 30 / A10 / A40 (Ampere, sm_86)",
        flags=_cuda("sm_86"),
        **_CUDA_RULES,
        notes=(
            "IREE 3.13 describes sm_86 with sm_80's 163 KiB shared-memory budget; the chip allows "
            "99 KiB per block, so a kernel choosing more would fail to launch (not seen on SD shapes)."
        ),
    ),
    Target(
        name="sm_89",
        quant_reason=(
            "int8-fp8attn: IREE 3.13's CUDA backend cannot lower the cast to fp8 (\"cannot be converted to "
            "LLVM IR: missing LLVMTranslationDialectInterface registration ... arith.truncf\"), measured on sm_89"
        ),
        description="NVIDIA RTX 40 / L4 / L40 (Ada Lovelace, sm_89)",
        flags=_cuda("sm_89"),
        **_CUDA_RULES,
        notes="PTX ISA 8.4 (driver for CUDA 12.4 or newer); adds FP8 mma.sync, unused by fp16 models.",
    ),
    Target(
        name="hopper",
        description="NVIDIA H100 / H200 / GH200 (Hopper, sm_90) via sm_80 PTX",
        flags=_cuda("sm_80"),
        **_CUDA_RULES,
        notes=(
            "IREE 3.13 cannot target Hopper: --iree-cuda-target=sm_90/sm_90a/sm_100 fail with "
            "'missing GPU target in #hal.executable.target' (iree-org/iree#22147) and "
            "'hopper'/'h100' are rejected ('Unknown CUDA target'). This entry ships sm_80 PTX "
            "(ISA 7.6), which the driver JIT-compiles for sm_90: PTX runs on any GPU of an equal "
            "or higher compute capability. sm_80 rather than sm_89: for fp16 both use the same "
            "mma.sync/wmma f16 instructions; sm_89 only adds FP8 mma.sync (which Hopper does "
            "support, so it is not a compatibility problem), but caps shared memory at Ada's "
            "99 KiB where sm_80's 163 KiB is closer to Hopper's 227 KiB, and needs PTX ISA 8.4 "
            "(a CUDA 12.4+ driver). Neither uses Hopper's wgmma/TMA, so expect well below peak."
        ),
    ),
)


def get_target(name: str) -> Target:
    """The target called `name`; ValueError naming the known ones otherwise."""
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; expected one of: {', '.join(TARGETS)}") from None


def compile_flags(target: Target, *, tuned: bool, dtype: str = "float32", rows: int = 1) -> list[str]:
    """The iree-compile flags for `target`: plain, or plain + tuned (+ the tuned set's flags for `dtype`,
    for a module whose convolutions take `rows` = 1 batch row at a time; see `_CPU_TUNED_BY_DTYPE`)."""
    if not tuned:
        return list(target.flags)
    by_dtype = dict(target.tuned_dtype_flags).get(dtype, ()) if rows == 1 else ()
    return list(target.flags) + list(target.tuned_flags) + list(by_dtype)


# Flags of a target's set that a multi-device module cannot take in IREE 3.13, and why.
MULTI_DEVICE_DROPPED = {
    "--iree-opt-data-tiling": (
        "data tiling materialises its encodings for one device only: with several, iree-compile fails "
        "('stream.tensor.sizeof' op illegal for this phase of lowering; iree-org/iree#19967)"
    ),
}


# Flags of a target's set that a quantized module (punet.quant) compiles better without, and why.
QUANTIZED_DROPPED = {
    "--iree-opt-aggressively-propagate-transposes": (
        "it folds the attention's head split into the int8 projections, which become batched generic "
        "contractions that data tiling leaves off the i8 microkernels: 2.0x slower on the full-size int8 "
        "SDXL UNet (3.30 s vs 1.63 s per 256x256 call, bit-identical outputs; docs/quantization.md). The "
        "flag is there for fp32 archives' zero-copy weights; int8 weights are packed by data tiling anyway"
    ),
}


# Flags of a target's set that a module compiled with --pack-weights does without, and why.
PACKED_DROPPED = {
    "--iree-opt-aggressively-propagate-transposes": (
        "it is there so that unpacked fp32 weights are used in place; packed weights are laid out ahead of "
        "time (transposes included), and without it the attention projections stay on the mmt4d "
        "microkernels: full-size fp32 SDXL 5.9 s -> 2.9 s per 256x256 call (docs/cpu-tuning.md)"
    ),
}


# Flags a module compiled with --pack-weights adds, and why.
_DT_OPS = "--iree-dispatch-creation-experimental-set-data-tiling-ops="
PACKED_ADDED = {
    # The option is a list whose default is {matmul, scaled_matmul}: naming a family replaces the
    # default, so the two defaults are restated beside the convolutions.
    f"{_DT_OPS}matmul": "data-tiled matmuls (this option's default, restated)",
    f"{_DT_OPS}scaled_matmul": "data-tiled scaled matmuls (this option's default, restated)",
    f"{_DT_OPS}convolution": (
        "convolutions data-tiled as convolutions (IREE 3.13, experimental), their weights packed ahead of "
        "time with the rest: full-size fp32 SDXL at 512x512 11.0-11.8 s vs 13.0-14.2 s per call with "
        "--iree-global-opt-use-im2col-for-convs instead (the previous packed set), four rounds side by "
        "side, the same output (docs/cpu-tuning.md). Not where the set computes convolutions as im2col "
        "matmuls (bf16): then there are none left to data-tile"
    ),
}


# The tuned CPU set's matmul distribution tile budget (`_CPU_TUNED`: 2 MiB per operand) is sized for
# feature maps of 256 tokens and more, where a smaller budget splits the token rows and reads the weight
# more than once. Where the UNet's smallest feature map has at most SMALL_MAP_TOKENS tokens (SDXL at
# 256x256: the 1280-wide level's 8x8 map), every budget keeps the rows in one tile, and 2 MiB leaves few,
# unequal workgroups: 5 for a 64x1280x1280 projection on 2 threads (3 + 2), 84-90% of the threads busy.
# There the budget is SMALL_MAP_TILE_ELEMENTS elements per operand (1 MiB in fp32, 512 KiB in bf16):
# 8 workgroups, 96% busy; full-size SDXL fp32 at 256x256 on a Zen 4, 1 MiB vs 2 MiB, one process each:
# 2.21 / 2.20 s vs 2.34 / 2.40 s per call, bit-identical output (docs/cpu-tuning.md). Two-row modules (a
# CFG step, or batch 2) get it in fp32 only (SMALL_MAP_ROWS): the fp32 256x256 CFG step, six rounds of
# one process per build, 1 MiB 4.69 s vs 2 MiB 5.04 s (medians of 30 calls each, 1.08x; 1 MiB ahead in
# four rounds, level in two), bit-identical; the bf16 one with 512 KiB measured level (2.70 / 2.41 s vs
# 2.53 / 2.68 s), so bf16 keeps the set's budget there. Quantized modules and more rows: not measured.
_TILE_BYTES = "--iree-llvmcpu-matmul-tile-bytes="
SMALL_MAP_TOKENS = 64
SMALL_MAP_TILE_ELEMENTS = 256 * 1024
SMALL_MAP_ROWS = {"float32": 2, "bfloat16": 1, "float16": 1}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def matmul_tile_flags(flags: list[str], *, dtype: str, rows: int, min_tokens: int) -> list[str]:
    """`flags` with the matmul tile budget for a float module of `rows` UNet rows whose smallest feature
    map has `min_tokens` tokens (see SMALL_MAP_TOKENS and SMALL_MAP_ROWS); unchanged where the set has no
    budget or the rule does not apply."""
    if dtype not in _ITEMSIZE or rows > SMALL_MAP_ROWS[dtype] or min_tokens > SMALL_MAP_TOKENS:
        return list(flags)
    budget = f"{_TILE_BYTES}{SMALL_MAP_TILE_ELEMENTS * _ITEMSIZE[dtype]}"
    return [budget if f.startswith(_TILE_BYTES) else f for f in flags]


# The microkernels of a packed fp32 build. IREE 3.13 lowers its data-tiled convolutions onto their own
# microkernel (`conv_nchwc`, AVX-512: iree-org/iree#24729; the code generator has no path for them,
# iree-org/iree#24710), and its data-tiled matmuls either onto the mmt4d microkernel (`all`) or through
# its code generator. Naming the convolution kernel alone keeps the one and takes the other: full-size
# fp32 SDXL on a Zen 4, one process per build, alternating, outputs bit-identical (docs/cpu-tuning.md,
# eleventh session): 256x256 2.21 / 2.28 / 2.22 / 2.19 s vs 2.35 / 2.49 / 2.30 / 2.41 s with `all`;
# 512x512 9.05 / 8.74 s vs 9.14 / 9.51 s; the 256x256 CFG step level (4.51 / 4.49 / 4.35 s vs 4.51 / 4.39 /
# 4.42 s); `cpu-avx2` at 256x256 (no data-tiled convolutions there, so no microkernel at all) 4.21 / 4.25 /
# 4.37 s vs 4.38 / 4.77 / 4.86 s. `none` instead runs the convolutions 27-64x slower. Measured on the
# targets listed; not bf16 (im2col, no convolutions left), fp16 or quantized modules.
_UKERNELS = "--iree-llvmcpu-enable-ukernels="
PACKED_F32_UKERNELS = f"{_UKERNELS}conv_nchwc"
PACKED_F32_UKERNEL_TARGETS = ("cpu", "cpu-avx2")


def packed_ukernel_flags(flags: list[str], target: str, *, dtype: str, quant: str) -> list[str]:
    """`flags` of a packed build (`packed_flags`) with the microkernels of a packed fp32 module of `target`
    (PACKED_F32_UKERNELS) where its convolutions are data-tiled; unchanged elsewhere."""
    if (target not in PACKED_F32_UKERNEL_TARGETS or dtype != "float32" or quant
            or f"{_DT_OPS}convolution" not in flags):
        return list(flags)
    return [PACKED_F32_UKERNELS if f.startswith(_UKERNELS) else f for f in flags]


def packed_flags(flags: list[str], packed: bool) -> list[str]:
    """`flags` for a module that reads packed weights (`punet pack`), or unchanged."""
    if not packed:
        return list(flags)
    added = [f for f in PACKED_ADDED if f not in flags and not (_IM2COL in flags and f == f"{_DT_OPS}convolution")]
    return [f for f in flags if f not in PACKED_DROPPED] + added


def module_flags(
    target: Target,
    *,
    tuned: bool,
    dtype: str = "float32",
    rows: int = 1,
    conv_rows: int | None = None,
    min_tokens: int | None = None,
    quant: str = "",
    packed: bool = False,
    devices: int = 1,
) -> list[str]:
    """The iree-compile flags of one module for `target`, every rule applied in the order `punet compile`
    applies them: the set (`compile_flags`, for convolutions of `conv_rows` batch rows, default `rows`),
    the matmul tile budget of a float module of `rows` UNet rows whose smallest feature map has
    `min_tokens` tokens (None: not known, the set's budget), `quant`ized weights, `packed` weights and
    their microkernels, then `devices`. The benches that time one operation as `punet compile` builds it
    take their flags from here too, so that the two cannot drift."""
    flags = compile_flags(target, tuned=tuned, dtype=dtype, rows=rows if conv_rows is None else conv_rows)
    if not quant and min_tokens is not None:
        flags = matmul_tile_flags(flags, dtype=dtype, rows=rows, min_tokens=min_tokens)
    flags = quantized_flags(target, flags, quant)
    flags = packed_ukernel_flags(packed_flags(flags, packed), target.name, dtype=dtype, quant=quant)
    return multi_device_flags(flags, devices)


def quantized_flags(target: Target, flags: list[str], quant: str) -> list[str]:
    """`flags` of `target` for a module with `quant`ized weights ("" = float: unchanged)."""
    if not quant:
        return list(flags)
    return [f for f in flags if f not in QUANTIZED_DROPPED] + list(target.quant_flags)


def multi_device_flags(flags: list[str], devices: int) -> list[str]:
    """`flags` for a module on `devices` devices of one target: its device flag once per device, numbered.

    `--iree-hal-target-device=local` becomes `=local[0]` ... `=local[N-1]` (hip[i], cuda[i], ...): the
    module's logical devices __device_0 ... __device_{N-1}, in order, each with the target's backend flags.
    """
    if devices == 1:
        return list(flags)
    prefix = "--iree-hal-target-device="
    out: list[str] = []
    for flag in flags:
        if flag in MULTI_DEVICE_DROPPED:
            continue
        if flag.startswith(prefix):
            out += [f"{flag}[{i}]" for i in range(devices)]
        else:
            out.append(flag)
    return out
