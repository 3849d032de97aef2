"""One test per realistic bug the suite once let through (issue 12).

Each test names in its docstring the bug it guards against; each was checked by
putting that bug into the code by hand and seeing the test fail.

diffusers is imported at module level: a mutation-testing run (docs/testing.md) forks
every test process from one that collected this module, so each starts with it loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import load_file, save_file

from punet import UNetConfig, UNet2DConditionModel
from punet.builtin import config_dict
from punet.compare import compare_tensors
from punet.compile.targets import TARGETS, compile_flags
from punet.errors import PunetError
from punet.model.layers import Attention, GroupNorm, LayerNorm, timestep_embedding
from punet.pipeline import DemoResult
from punet.signature import Signature, make_inputs, num_time_ids, text_embeds_width
from punet.weights import import_checkpoint

from .conftest import MICRO_SDXL, CONFIG_DIR, diffusers_tiny, rel_l2
from .test_model import _inputs, _our_call, _pair, _ref_call

# ---- time embedding: freq_shift and flip_sin_to_cos ------------------------------


@pytest.mark.parametrize("flip", [True, False], ids=["cos-sin", "sin-cos"])
@pytest.mark.parametrize("shift", [0, 1])
def test_timestep_embedding_matches_diffusers(flip, shift):
    """Bugs: `freq_shift` ignored (always 0); `flip_sin_to_cos` ignored (always cos, then sin).

    Every shipped SDXL config has freq_shift 0 and flip_sin_to_cos true, so the other
    values are checked here against diffusers' own `get_timestep_embedding`.
    """
    t = torch.tensor([0.0, 1.0, 10.0, 500.0, 999.0])
    for dim in (8, 33, 320):
        expected = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=shift)
        torch.testing.assert_close(timestep_embedding(t, dim, flip, shift), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "overrides",
    [{"freq_shift": 1}, {"flip_sin_to_cos": False}, {"freq_shift": 1, "flip_sin_to_cos": False}],
    ids=["freq_shift=1", "flip_sin_to_cos=false", "both"],
)
def test_time_embedding_config_keys_match_diffusers(overrides):
    """Bugs: the UNet passing freq_shift 0 / flip_sin_to_cos true whatever the config says.

    The tiny SDXL model embeds both the timestep and the time ids, so both calls of
    `timestep_embedding` are covered; the reference is diffusers on the same weights.
    """
    ref, ours = _pair("tiny-sdxl", overrides)
    for key, value in overrides.items():
        assert getattr(ours.config, key) == value
    x = _inputs(ours, 2, [999, 10])
    expected = _ref_call(ref, x)
    err = (_our_call(ours, x) - expected).abs().max().item()
    assert err <= 1e-5 * expected.abs().max().item(), f"{overrides}: max abs error {err:.3e}"


# ---- low precision: softmax and norm statistics in fp32 ----------------------------




@pytest.fixture(scope="module")
def exported_text():
    """MLIR text of a small SDXL-architecture model exported in a low-precision dtype, attention decomposed."""
    from punet.export import export_module

    config = UNetConfig.from_dict(MICRO_SDXL)
    cache: dict[str, str] = {}

    def get(dtype: str) -> str:
        if dtype not in cache:
            exported = export_module(config, Signature(1, 64, 64, dtype, tokens=8), decompose_attention=True)
            cache[dtype] = str(exported.mlir_module)
        return cache[dtype]

    with torch.device("meta"):
        model = UNet2DConditionModel(config)
    counts = {
        "softmax": sum(isinstance(m, Attention) for m in model.modules()),
        "group_norm": sum(isinstance(m, GroupNorm) for m in model.modules()),
        "layer_norm": sum(isinstance(m, LayerNorm) for m in model.modules()),
    }
    return get, counts


def _op_types(text: str, op: str) -> list[set[str]]:
    """For each `torch.aten.<op>` in the MLIR, the element types of its tensor operands and result."""
    pattern = re.compile(rf"= torch\.aten\.{op}(\.\w+)? ")
    return [set(re.findall(r"!torch\.vtensor<\[[\d,]*\],(\w+)>", ln)) for ln in text.splitlines() if pattern.search(ln)]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_decomposed_softmax_is_fp32_in_the_export(exported_text, dtype):
    """Bug: the decomposed attention's softmax in fp16/bf16 (`torch.softmax(scores)` without `.float()`).

    At the tiny size the numerical difference hides under the fp16 tolerance, and torch's
    CPU softmax upcasts internally, so eager runs cannot see it; the exported MLIR, which
    is what IREE compiles, says the dtype of every softmax.
    """
    get, counts = exported_text
    types = _op_types(get(dtype), "softmax")
    assert len(types) == counts["softmax"] > 0, f"expected {counts['softmax']} softmax ops, found {len(types)}"
    assert all(t == {"f32"} for t in types), types


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("op", ["group_norm", "layer_norm"])
def test_norm_statistics_are_fp32_in_the_export(exported_text, dtype, op):
    """Bug: GroupNorm/LayerNorm computing their statistics in bf16/fp16 (no `.float()` in forward).

    test_model's low-precision bound cannot see it: torch's CPU norm kernels accumulate
    in fp32 whatever the input dtype (eager bf16 output is then bit-identical or within
    1e-6 relative, even with a mean of 100 over unit variance), but IREE compiles the op
    in the dtype the export gives it, and fp16 GroupNorm compiled for llvm-cpu has a
    relative L2 error > 1 on one SDXL GroupNorm. So every norm op in a low-precision
    export must take and return f32.
    """
    get, counts = exported_text
    types = _op_types(get(dtype), op)
    assert len(types) == counts[op] > 0, f"expected {counts[op]} {op} ops, found {len(types)}"
    assert all(t == {"f32"} for t in types), types


# ---- punet reference: the CFG step ---------------------------------------------------


def test_reference_cfg_step_is_negative_then_positive():
    """Bug: `punet reference`'s CFG step with the rows swapped in `eager.diffusers_call`.

    The reference is two plain diffusers calls, on the negative rows (the first B) and
    the positive rows (the last B): uncond + s * (text - uncond).
    """
    from punet.eager import diffusers_call

    model = diffusers_tiny("tiny-sdxl")
    cfg = UNetConfig.from_dict(config_dict("tiny-sdxl"))
    b = 2
    x = make_inputs(cfg, Signature(b, 64, 64, tokens=7, cfg=True), 4)
    x["guidance_scale"] = torch.tensor([5.0])
    got = diffusers_call(model, x)
    rows = {k: x[k] for k in ("encoder_hidden_states", "text_embeds", "time_ids")}
    plain = {"sample": x["sample"], "timestep": x["timestep"]}
    neg = diffusers_call(model, {**plain, **{k: v[:b] for k, v in rows.items()}})
    pos = diffusers_call(model, {**plain, **{k: v[b:] for k, v in rows.items()}})
    assert rel_l2(pos, neg) > 1e-2  # the prompts matter, so a swap shows
    expected = neg + 5.0 * (pos - neg)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_guided_unet_is_negative_then_positive():
    """Bug: punet's own CFG step (`GuidedUNet`, the `main_cfg` entry) with the rows swapped.

    The reference is diffusers, called once on the negative rows and once on the positive rows.
    """
    from punet.model import GuidedUNet

    ref, ours = _pair("tiny-sdxl")
    assert isinstance(ref, DiffusersUNet)
    b = 2
    x = make_inputs(ours.config, Signature(b, 64, 64, tokens=7, cfg=True), 6)
    with torch.inference_mode():
        got = GuidedUNet(ours)(**dict(x, guidance_scale=torch.tensor([3.0])))
    rows = ("encoder_hidden_states", "text_embeds", "time_ids")
    neg = _ref_call(ref, dict(x, **{k: x[k][:b] for k in rows}))
    pos = _ref_call(ref, dict(x, **{k: x[k][b:] for k in rows}))
    expected = neg + 3.0 * (pos - neg)
    assert rel_l2(pos, neg) > 1e-2
    assert (got - expected).abs().max() <= 1e-5 * expected.abs().max()


# ---- import: transposed tensors, atomic writes -------------------------------------


def test_transposed_tensor_is_refused(checkpoints, tmp_path):
    """Bug: import's shape check comparing element counts only, so a transposed tensor is accepted."""
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tiny-sd15"], folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    key = "time_embedding.linear_1.weight"
    assert state[key].shape == (128, 32)
    state[key] = state[key].t().contiguous()
    save_file(state, str(path))
    out = tmp_path / "u.irpa"
    expected = rf"tensor '{re.escape(key)}' has shape \[32, 128\], config.json implies \[128, 32\]"
    with pytest.raises(PunetError, match=expected):
        import_checkpoint(str(folder), out)
    assert not out.exists()


def test_failed_irpa_write_leaves_nothing_under_the_final_name(checkpoints, tmp_path, monkeypatch):
    """Bug: the .irpa written straight to its final name (no temporary + rename).

    The archive write fails halfway (a full disk, simulated): no file may appear under
    the final name, and a good archive already there must be left byte for byte.
    """
    import iree.runtime as rt

    existing = tmp_path / "existing.irpa"
    import_checkpoint(str(checkpoints["tiny-sd15"]), existing)
    good = existing.read_bytes()
    written: list[str] = []

    class HalfWrittenIndex(rt.ParameterIndex):
        def create_archive_file(self, path: str, *args, **kwargs):
            super().create_archive_file(path, *args, **kwargs)
            written.append(path)
            with open(path, "r+b") as f:
                f.truncate(Path(path).stat().st_size // 2)
            raise OSError("No space left on device (simulated)")

    monkeypatch.setattr(rt, "ParameterIndex", HalfWrittenIndex)
    fresh = tmp_path / "fresh.irpa"
    for out in (fresh, existing):
        with pytest.raises(OSError, match="simulated"):
            import_checkpoint(str(checkpoints["tiny-sdxl"]), out)
    monkeypatch.undo()
    assert len(written) == 2  # the failure happened while writing, not before
    assert not fresh.exists()
    assert existing.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.irpa"]  # no temporary or staging file left


# ---- compile: the cpu target's flags ------------------------------------------------


@pytest.mark.parametrize("tuned", [False, True], ids=["plain", "tuned"])
@pytest.mark.parametrize("name", ["cpu", "cpu-generic"])
def test_cpu_targets_keep_weights_in_place(name, tuned):
    """Bug: the `cpu` target without `--iree-opt-aggressively-propagate-transposes`.

    The flag folds the weight transposes into the matmuls. Without it IREE hoists
    transpose(weight) of every batch-1 Linear into a load-time initializer that copies
    8.8 GB of a 10.3 GB SDXL archive; with it every parameter is used in place from the
    memory-mapped .irpa (docs/cpu-tuning.md). Nothing else checks load-time memory, so
    the flag is asserted in both the plain and the tuned set.
    """
    assert "--iree-opt-aggressively-propagate-transposes" in compile_flags(TARGETS[name], tuned=tuned)


# ---- signature: the refiner's time ids ------------------------------------------------


@pytest.mark.parametrize(
    "name, n",
    [("sdxl-base-1.0-unet.json", 6), ("sdxl-turbo-unet.json", 6), ("sdxl-refiner-1.0-unet.json", 5)],
)
def test_num_time_ids_of_the_real_configs(name, n):
    """Bug: the refiner's 5 time ids never inferred (always 6) in `signature.num_time_ids`.

    SDXL base and turbo pass (original size, crop, target size); the refiner (original
    size, crop, aesthetic score); both with OpenCLIP bigG's 1280-wide pooled text embedding.
    """
    config = UNetConfig.from_json(CONFIG_DIR / name)
    assert num_time_ids(config) == n
    assert text_embeds_width(config) == 1280
    specs = {s.name: s.shape for s in Signature(1, 1024, 1024).inputs(config)}
    assert specs["time_ids"] == (1, n) and specs["text_embeds"] == (1, 1280)
    assert json.loads((CONFIG_DIR / name).read_text())["projection_class_embeddings_input_dim"] == 1280 + n * 256


# ---- demo: a failed check fails the run ------------------------------------------------


def test_demo_result_not_ok_when_a_check_fails():
    """Bug: `DemoResult.ok` always true, so a failed comparison still exits 0."""
    ref = torch.linspace(-1, 1, 64)
    good = compare_tensors(ref + 1e-6, ref)
    bad = compare_tensors(ref * 1.01, ref)
    assert DemoResult(checks=[("good", good, 1e-4)]).ok
    assert not DemoResult(checks=[("good", good, 1e-4), ("bad", bad, 1e-4)]).ok
    assert not DemoResult(checks=[("bad", bad, 1e-4), ("good", good, 1e-4)]).ok
    nan = compare_tensors(torch.full((4,), float("nan")), torch.ones(4))
    assert not DemoResult(checks=[("nan", nan, 1.0)]).ok
