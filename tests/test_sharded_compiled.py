"""Multi-device punet through IREE: `punet shard` -> export -> compile for N local CPU devices -> run.

The reference is punet's float model in torch eager fp32 on the same weights. TP=2 and DP=2 run in CI;
TP=4 is opt-in (`-m tp4`): four local-task devices on a 2-core machine take a while.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from punet.artifacts import rank_irpa_path
from punet.compile import compile_vmfb, get_target
from punet.config import UNetConfig
from punet.errors import PunetError
from punet.export import export_mlir
from punet.model import GuidedUNet
from punet.runtime import Session
from punet.sharded import make_plan
from punet.sharded.archive import shard_archive
from punet.signature import Signature, make_inputs
from punet.weights import import_checkpoint, load_model, read_metadata

from .conftest import MICRO_SDXL, rel_l2, run_cli
from .test_sharded import MICRO_SDXL_4
from .vmfb_check import check_vmfb


def _checkpoint(root: Path, config: dict, dtype: str = "float32") -> Path:
    from diffusers import UNet2DConditionModel as DiffusersUNet

    from punet.builtin import random_state_dict

    ref = DiffusersUNet(**config).eval()
    ref.load_state_dict(random_state_dict({k: tuple(v.shape) for k, v in ref.state_dict().items()}, 0))
    ref.save_pretrained(root / "micro")
    import_checkpoint(str(root / "micro"), root / "unet.irpa", dtype=dtype)
    return root / "unet.irpa"


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("tp"), MICRO_SDXL)


def _transfers(mlir: Path) -> tuple[set[str], int, int]:
    text = mlir.read_text()
    devices = set(re.findall(r"@__device_(\d+)", text))
    return devices, text.count("flow.tensor.transfer "), text.count("flow.tensor.barrier ")


def _eager(irpa: Path, sig: Signature) -> tuple[dict, torch.Tensor]:
    model, config = load_model(irpa)
    x = make_inputs(config, sig)
    with torch.inference_mode():
        return x, (GuidedUNet(model) if sig.cfg else model)(**x)


def _tp_round_trip(irpa: Path, tp: int, tmp: Path) -> tuple[Path, Path]:
    """Shard, export (attention decomposed, as the cpu target wants it), compile, run: the module and archive."""
    sharded = tmp / f"unet.tp{tp}.irpa"
    shard_archive(irpa, tp, sharded)
    sig = Signature(1, 64, 64)
    res = export_mlir(sharded, sig=sig, decompose_attention=True)
    assert res.mlir.name == f"unet_b1_64x64_f32_tp{tp}_decomposed.mlir"
    # N devices, and exactly the plan's all-reduces: each moves every rank's partial to every other rank,
    # after the 5 inputs have gone from device 0 to the others; one barrier puts the output on device 0.
    plan = make_plan(UNetConfig.from_dict(read_metadata(irpa)["config"]), tp)
    devices, transfers, barriers = _transfers(res.mlir)
    assert devices == {str(r) for r in range(tp)}
    assert transfers == 5 * (tp - 1) + len(plan.all_reduces) * tp * (tp - 1)
    assert barriers == 1
    compiled = compile_vmfb(res.mlir, "cpu")
    assert [f for f in compiled.command if f.startswith("--iree-hal-target-device")] == [
        f"--iree-hal-target-device=local[{r}]" for r in range(tp)]
    assert "--iree-opt-data-tiling" not in compiled.command  # one device only in IREE 3.13 (targets.py)
    session = Session.load(compiled.vmfb, sharded)
    x, ref = _eager(irpa, sig)
    assert rel_l2(session(x), ref) <= 1e-4
    return compiled.vmfb, sharded


@pytest.fixture(scope="module")
def tp2(micro, tmp_path_factory) -> tuple[Path, Path]:
    return _tp_round_trip(micro, 2, tmp_path_factory.mktemp("tp2"))


def test_tp2_compiled_on_two_local_devices_equals_torch(tp2):
    from punet.runtime.bench import benchmark_command

    vmfb, sharded = tp2
    session = Session.load(vmfb, sharded)
    assert session.signature.tp == 2
    # The equivalent command names every archive file and both devices.
    cmd = benchmark_command(session, None)
    assert cmd.count("--device=local-task") == 2 and all(
        f"--parameters=model={p}" in cmd for p in (sharded, rank_irpa_path(sharded, 0), rank_irpa_path(sharded, 1)))


@pytest.mark.tp4
def test_tp4_compiled_on_four_local_devices_equals_torch(tmp_path):
    _tp_round_trip(_checkpoint(tmp_path, MICRO_SDXL_4), 4, tmp_path)


def test_tp2_runs_with_plain_iree_run_module_and_the_cli(micro, tp2, tmp_path):
    """The rank files under the one scope: iree-run-module takes them as they are, and so does `punet run`."""
    import iree._runtime_libs

    vmfb, sharded = tp2
    x, ref = _eager(micro, Signature(1, 64, 64))
    args = []
    for k, v in x.items():
        np.save(tmp_path / f"{k}.npy", v.numpy())
        args.append(f"--input=@{tmp_path / k}.npy")
    run_module = str(Path(iree._runtime_libs.__file__).with_name("iree-run-module"))
    params = [f"--parameters=model={p}" for p in (sharded, rank_irpa_path(sharded, 0), rank_irpa_path(sharded, 1))]
    r = subprocess.run([run_module, f"--module={vmfb}", "--device=local-task", "--device=local-task", *params,
                        "--function=main", *args, f"--output=@{tmp_path / 'out.npy'}"], capture_output=True, text=True,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert rel_l2(torch.from_numpy(np.load(tmp_path / "out.npy")), ref) <= 1e-4

    from punet.tensors import load_tensors, save_tensors

    save_tensors(tmp_path / "in.safetensors", x)
    r = run_cli("run", str(vmfb), "--irpa", str(sharded), "--inputs", str(tmp_path / "in.safetensors"),
                "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode == 0, r.stderr
    assert rel_l2(load_tensors(tmp_path / "o.safetensors")["sample"], ref) <= 1e-4
    # The module needs a sharded archive and its rank files: one line each, naming the file.
    r = run_cli("run", str(vmfb), "--irpa", str(micro), "-o", str(tmp_path / "o2.safetensors"))
    assert r.returncode == 1 and r.stderr.strip() == (
        f"punet run: error: {micro}: not sharded; {vmfb.name} takes a `punet shard --tp 2` archive")
    moved = tmp_path / "away.irpa"
    rank_irpa_path(sharded, 1).rename(moved)
    try:
        with pytest.raises(PunetError, match=f"^{rank_irpa_path(sharded, 1)}: rank file 1 of 2 of unet.tp2.irpa is missing"):
            Session.load(vmfb, sharded)
    finally:
        moved.rename(rank_irpa_path(sharded, 1))


def test_dp2_cfg_step_on_two_devices_equals_the_single_device_cfg_step(micro, tmp_path):
    sig = Signature(1, 64, 64, cfg=True, dp=2)
    r = run_cli("export", str(micro), "--cfg", "--dp", "2", "--height", "64", "--width", "64", "--decompose-attention",
                "-o", str(tmp_path / "dp2.mlir"))
    assert r.returncode == 0, r.stderr
    mlir = tmp_path / "dp2.mlir"
    # Two devices; device 1 gets its 5 inputs (its half of the text rows), its noise comes back: 6 transfers.
    assert _transfers(mlir) == ({"0", "1"}, 6, 1)
    vmfb = compile_vmfb(mlir, "cpu").vmfb
    session = Session.load(vmfb, micro)
    assert session.signature == sig
    x, ref = _eager(micro, Signature(1, 64, 64, cfg=True))
    assert rel_l2(session(x), ref) <= 1e-4
    shard_archive(micro, 2, tmp_path / "unet.tp2.irpa")  # DP replicates the weights: an unsharded archive
    with pytest.raises(PunetError, match=rf"^{tmp_path / 'unet.tp2.irpa'}: sharded for --tp 2; {vmfb.name} takes an "
                                         "unsharded archive$"):
        Session.load(vmfb, tmp_path / "unet.tp2.irpa")
    r = run_cli("export", str(micro), "--dp", "2", "--height", "64", "--width", "64")
    assert r.returncode == 1 and r.stderr.strip() == (
        "punet export: error: --dp 2 splits the CFG step's two halves over two devices: it needs --cfg")


def test_tp2_fp16_compiles_for_two_gpus(micro, tmp_path):
    """Compile-only (no GPU here): the fp16 TP=2 module for two MI300s (gfx942) and two A100s (sm_80)."""
    irpa = tmp_path / "unet_f16.irpa"
    import_checkpoint(str(micro.parent / "micro"), irpa, dtype="float16")
    sharded = tmp_path / "unet.tp2.irpa"
    shard_archive(irpa, 2, sharded)
    # Attention decomposed (the CPU's sliced form): gfx942 takes it as it is, sm_80 re-derives its unsliced form.
    mlir = export_mlir(sharded, sig=Signature(1, 64, 64, dtype="float16"), decompose_attention=True).mlir
    for target, device in (("gfx942", "hip"), ("sm_80", "cuda")):
        res = compile_vmfb(mlir, target)
        assert [f for f in res.command if f.startswith("--iree-hal-target-device")] == [
            f"--iree-hal-target-device={device}[0]", f"--iree-hal-target-device={device}[1]"]
        check_vmfb(res.vmfb, get_target(target), "main", 5)
