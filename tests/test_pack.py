"""`punet compile --pack-weights` + `punet pack`: weights packed once, ahead of time, for the CPU's data tiling.

The reference is the same module built without packing (it packs at load) and torch eager fp32
on the same archive; the refusals are the pairings that would run garbage.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from punet.builtin import write_checkpoint
from punet.compile import compile_vmfb
from punet.compile.targets import PACKED_ADDED, PACKED_DROPPED, PACKED_F32_UKERNELS
from punet.eager import call_model
from punet.errors import PunetError, UsageError
from punet.export import export_mlir
from punet.runtime import Session
from punet.runtime.pack import pack_weights
from punet.artifacts import signature_path
from punet.signature import Signature, make_inputs
from punet.weights import import_checkpoint, load_model, read_metadata

from .conftest import MICRO_SDXL, eager_fp32, rel_l2, run_cli

SIG = Signature(1, 64, 64, "float32", tokens=8)
IM2COL = "--iree-global-opt-use-im2col-for-convs"
CONV_DT = "--iree-dispatch-creation-experimental-set-data-tiling-ops=convolution"


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    write_checkpoint(root / "ckpt", MICRO_SDXL, seed=0)
    irpa = root / "u.irpa"
    import_checkpoint(str(root / "ckpt"), irpa)
    mlir = export_mlir(irpa, sig=SIG, decompose_attention=True).mlir
    vmfb = compile_vmfb(mlir, "cpu", pack_weights=True).vmfb
    res = pack_weights(vmfb, irpa)
    return {"root": root, "irpa": irpa, "mlir": mlir, "vmfb": vmfb, "packed": res.path,
            "unpacked_vmfb": compile_vmfb(mlir, "cpu").vmfb}


def test_packed_module_matches_unpacked_and_eager(packed):
    # Catches: a weight packed into the wrong offset or layout, an encoder that never ran (zeros),
    # or the session serving the packed archive under the wrong scope.
    session = Session.load(packed["vmfb"], packed["packed"])
    x = make_inputs(session.config, SIG, 3)
    got = session(x)
    want = Session.load(packed["unpacked_vmfb"], packed["irpa"])(x)
    model, _ = load_model(packed["irpa"])
    eager = call_model(model, x)
    assert rel_l2(got, want) <= 1e-5  # data-tiled convolutions sum in another order: not bit-identical
    assert rel_l2(got, eager) <= 1e-5
    assert got.abs().max() > 0


def test_packed_archive_records_its_module_and_source(packed):
    # Catches: a packed archive without the source's config/digest (then nothing can check it fits),
    # or one not bound to the module it was packed for.
    meta, source = read_metadata(packed["packed"]), read_metadata(packed["irpa"])
    assert meta["weights_sha256"] == source["weights_sha256"] and meta["config"] == source["config"]
    assert meta["packed"]["vmfb"] == packed["vmfb"].name and meta["packed"]["target"] == "cpu"
    assert packed["packed"].name == packed["vmfb"].with_suffix(".irpa").name
    info = json.loads((packed["vmfb"].parent / (packed["vmfb"].name + ".json")).read_text())
    assert info["packed"]["encoder"] == packed["vmfb"].stem + ".encoder.vmfb"
    assert not set(PACKED_DROPPED) & set(info["flags"])  # packed builds keep the projections on the microkernels
    assert set(PACKED_ADDED) <= set(info["flags"]) and IM2COL not in info["flags"]  # fp32: data-tiled convolutions
    # fp32: the convolutions' microkernel alone, once; the matmuls go through the code generator (the
    # module above matches eager with them)
    assert [f for f in info["flags"] if f.startswith("--iree-llvmcpu-enable-ukernels=")] == [PACKED_F32_UKERNELS]
    assert not list(packed["root"].glob("*.tmp")) and not list(packed["mlir"].parent.glob("*.encoder.*.mlir"))


def test_refuses_mismatched_pairs(packed, tmp_path):
    # Catches: a packed module run on raw weights, raw module on packed weights, or weights packed for
    # another build of the module: each would read the wrong bytes as weights.
    with pytest.raises(PunetError, match="--pack-weights.*punet pack"):
        Session.load(packed["vmfb"], packed["irpa"])
    with pytest.raises(PunetError, match="packed for .*takes the unpacked archive"):
        Session.load(packed["unpacked_vmfb"], packed["packed"])
    other = tmp_path / packed["vmfb"].name
    shutil.copy(packed["vmfb"], other)
    shutil.copy(str(packed["vmfb"]) + ".json", str(other) + ".json")
    with open(other, "ab") as f:
        f.write(b"\0")
    with pytest.raises(PunetError, match="another build"):
        Session.load(other, packed["packed"])


def test_pack_refusals_write_nothing(packed, tmp_path):
    # Catches: packing for a module without an encoder, re-packing a packed archive, or a missing
    # encoder, any of which must fail before an output exists.
    out = tmp_path / "x.irpa"
    with pytest.raises(PunetError, match="not compiled with --pack-weights"):
        pack_weights(packed["unpacked_vmfb"], packed["irpa"], out)
    with pytest.raises(PunetError, match="already packed"):
        pack_weights(packed["vmfb"], packed["packed"], out)
    lonely = tmp_path / packed["vmfb"].name
    shutil.copy(packed["vmfb"], lonely)
    shutil.copy(str(packed["vmfb"]) + ".json", str(lonely) + ".json")
    with pytest.raises(PunetError, match="encoder module .* is missing"):
        pack_weights(lonely, packed["irpa"], out)
    assert list(tmp_path.glob("x*")) == []


def test_pack_weights_flag_refusals(packed):
    # Catches: --pack-weights accepted where there is nothing to pack (plain flags) or on a GPU target.
    with pytest.raises(UsageError, match="--plain"):
        compile_vmfb(packed["mlir"], "cpu", tuned=False, pack_weights=True)
    with pytest.raises(UsageError, match="CPU targets only"):
        compile_vmfb(packed["mlir"], "gfx942", pack_weights=True)


def test_cli_pack_and_run(packed, tmp_path):
    # Catches: the verb not wired, or `punet run` not taking the packed archive.
    out = tmp_path / "p.irpa"
    r = run_cli("pack", str(packed["vmfb"]), str(packed["irpa"]), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and out.is_file()
    r = run_cli("run", str(packed["vmfb"]), "--irpa", str(out), "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 0, r.stderr
    r = run_cli("run", str(packed["vmfb"]), "--irpa", str(packed["irpa"]), "-o", str(tmp_path / "o2.safetensors"))
    assert r.returncode != 0 and "punet pack" in r.stderr and "Traceback" not in r.stderr


def test_pack_reuses_an_up_to_date_archive(packed, tmp_path):
    # Catches: reuse keyed on the file name only (weights changed or module rebuilt, stale packing served).
    out = tmp_path / "r.irpa"
    assert not pack_weights(packed["vmfb"], packed["irpa"], out).reused
    again = pack_weights(packed["vmfb"], packed["irpa"], out)
    assert again.reused and again.path == out
    meta = read_metadata(out)
    assert meta["packed"]["vmfb_sha256"] and not pack_weights(packed["vmfb"], packed["irpa"], out, force=True).reused


def test_bench_of_a_packed_module(packed):
    # Catches: the printed iree-benchmark-module line serving packed weights under "model" (it would not
    # load), or torch eager handed the packed archive (it cannot read it).
    from punet.runtime.bench import benchmark_command

    session = Session.load(packed["vmfb"], packed["packed"])
    line = benchmark_command(session, 2)
    assert f"--parameters=encoded={packed['packed']} --parameters=model={packed['irpa']}" in line
    assert session.eager_archive() == packed["irpa"]


@pytest.mark.parametrize("cfg", [False, True], ids=["batch1", "cfg"])
def test_bf16_packed_module_takes_im2col_convolutions(packed, tmp_path, cfg):
    # Catches: a bf16 module packed with data-tiled convolutions (3.4x slower in IREE 3.13 on the
    # full-size UNet, docs/cpu-tuning.md), or im2col's reshaped convolution weights packed into the
    # wrong layout by the encoder (then the packed bf16 module drifts far from torch). CFG (two rows):
    # the CPU's form not writing its convolutions by rows (then im2col fails to compile, or compile
    # leaves it out), or the rows mixed up in the concatenation (then the guided output is wrong).
    irpa = tmp_path / "u_bf16.irpa"
    import_checkpoint(str(packed["root"] / "ckpt"), irpa, dtype="bfloat16")
    sig = Signature(1, 64, 64, "bfloat16", tokens=8, cfg=cfg)
    mlir = export_mlir(irpa, sig=sig, decompose_attention=True).mlir
    assert json.loads(signature_path(mlir).read_text())["conv_rows"] is cfg
    vmfb = compile_vmfb(mlir, "cpu", pack_weights=True).vmfb
    info = json.loads((vmfb.parent / (vmfb.name + ".json")).read_text())
    assert IM2COL in info["flags"] and CONV_DT not in info["flags"] and info["conv_rows"] is cfg
    # The small-map tile budget (a 64x64 image: 2x2 tokens at the deepest level) in bf16 bytes for one row;
    # a CFG module's matmuls keep their two rows (only its convolutions go by rows): the set's budget.
    budget = "--iree-llvmcpu-matmul-tile-bytes=" + ("2097152" if cfg else "524288")
    assert budget in info["flags"]
    session = Session.load(vmfb, pack_weights(vmfb, irpa).path)
    x = make_inputs(session.config, sig, 3)
    got = session(x)
    assert got.dtype == torch.bfloat16
    want = eager_fp32(irpa, x)
    model, _ = load_model(irpa, dtype="bfloat16")
    eager_err = rel_l2(call_model(model, x).float(), want)
    # Measured (seeds 3-5, Zen 4): compiled 1.01e-2 to 1.07e-2, torch eager bf16 1.05e-2 to 1.17e-2.
    # A weight packed into the wrong layout is off by orders of magnitude.
    assert rel_l2(got.float(), want) <= 1.25 * eager_err
