"""The scheduled UNet compiled (issue 11): export --scheduled / --serving, compile, `punet generate`, bench.

The reference is diffusers' loop (`test_scheduled.diffusers_loop`) and punet's eager loop; the
fast eager and table tests are in test_scheduled.py (the file mutation testing runs).
"""

from __future__ import annotations

import json

import pytest
import torch

from punet.scheduled import ServingUNet
from punet.tensors import load_tensors, save_tensors

from .conftest import rel_l2, run_cli
from .test_scheduled import HW, TOKENS, diffusers_loop, diffusers_scheduler
from .test_user_path import one_line_error

# ---- export, compile, generate ------------------------------------------------------


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, checkpoints):
    """import -> export --scheduled -> compile cpu -> generate (compiled, then eager on its inputs)."""
    root = tmp_path_factory.mktemp("scheduled")
    src = checkpoints["tiny-sdxl"]
    mlir = f"unet_b1_64x64_f32_t{TOKENS}_scheduled.mlir"
    for args in (
        ["import", str(src), "-o", "unet.irpa"],
        ["export", "unet.irpa", "--scheduled", "--tokens", str(TOKENS), *HW],
        ["compile", mlir, "--target", "cpu"],
        ["generate", mlir.replace(".mlir", ".cpu.vmfb"), "--irpa", "unet.irpa", "--steps", "10", "--guidance", "7.5",
         "--save-inputs", "in.safetensors", "-o", "iree.safetensors"],
        ["generate", "unet.irpa", "--inputs", "in.safetensors", "--steps", "10", "--guidance", "7.5", "-o", "eager.safetensors"],
    ):
        r = run_cli(*args, cwd=root)
        assert r.returncode == 0, (args, r.stderr)
    return root, src, root / mlir.replace(".mlir", ".cpu.vmfb")


def test_compiled_loop_matches_diffusers(compiled):
    """Guards: the compiled scheduled module drifting from diffusers' loop (tables mis-exported, an
    index off by one at run time, latents not carried between steps): fp32 within 1e-4 after 10 steps,
    and equal to punet's eager loop from the same .irpa."""
    root, src, _ = compiled
    from diffusers import UNet2DConditionModel as DiffusersUNet

    x = load_tensors(root / "in.safetensors")
    assert sorted(x) == ["encoder_hidden_states", "sample", "text_embeds", "time_ids"]
    ours = load_tensors(root / "iree.safetensors")["sample"]
    theirs = diffusers_loop(DiffusersUNet.from_pretrained(src).eval(), x, 10, 7.5)
    assert rel_l2(ours, theirs) <= 1e-4
    assert rel_l2(ours, load_tensors(root / "eager.safetensors")["sample"]) <= 1e-4


def test_run_initialize_picks_the_row_at_run_time(compiled):
    """Guards: run_initialize returning a fixed row or row n-1: for 1, 20 and 99 steps its tables
    are diffusers' schedules, and its latents the noise times diffusers' init_noise_sigma."""
    root, _, vmfb = compiled
    from punet.runtime import Session

    s = Session.load(vmfb, root / "unet.irpa")
    init = s.entries["run_initialize"]
    noise = torch.randn(init.inputs[0].shape)
    ref = diffusers_scheduler()
    for n in (1, 20, 99):
        out = s.invoke("run_initialize", [s.upload(init.inputs[0], noise), s.upload(init.inputs[1], torch.tensor([n]))])
        lat, ids, ts, ss = (s.download(o, spec) for o, spec in zip(out, init.outputs))
        ref.set_timesteps(n)
        assert torch.equal(ts[:n], ref.timesteps) and not ts[n:].any()
        assert torch.equal(ss[: n + 1], ref.sigmas)
        torch.testing.assert_close(lat, noise * ref.init_noise_sigma, rtol=1e-6, atol=0)
        assert ids.tolist() == [[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2


def test_scheduled_bench_times_one_step(compiled, tmp_path):
    """Guards: `punet bench` on a scheduled module timing something other than run_forward, or
    failing on its int64 inputs: the record names run_forward and its eight inputs."""
    root, _, vmfb = compiled
    out = tmp_path / "b.json"
    r = run_cli("bench", str(vmfb), "--irpa", "unet.irpa", "--repeat", "2", "--warmup", "0", "--vs-eager",
                "--json", str(out), cwd=root)
    assert r.returncode == 0, r.stderr
    rec = json.loads(out.read_text())
    assert rec["entry"] == "run_forward" and rec["scheduled"] is True
    assert [i["name"] for i in rec["inputs"]][5:] == ["step_index", "timesteps", "sigmas"]
    assert len(rec["iree"]["samples_ms"]) == 2 and len(rec["eager"]["samples_ms"]) == 2
    assert "--function=run_forward" in rec["command"] and "--input=1xi64=1" in rec["command"]


@pytest.mark.parametrize("target", ["gfx942", "sm_80"])
def test_scheduled_module_compiles_for_gpus(compiled, target, tmp_path):
    """Guards: the scheduled module (int64 indices, gathers from constant tables) not compiling for
    the GPU targets the server runs on: both entries are in the .vmfb with the target's executables."""
    import iree.runtime as rt

    from punet.compile import TARGETS

    from .vmfb_check import EXECUTABLE_FORMATS

    root, _, _ = compiled
    out = tmp_path / f"s.{target}.vmfb"
    r = run_cli("compile", f"unet_b1_64x64_f32_t{TOKENS}_scheduled.mlir", "--target", target, "-o", str(out), cwd=root)
    assert r.returncode == 0, r.stderr
    module = rt.VmModule.mmap(rt.VmInstance(), str(out))
    assert {"run_initialize", "run_forward"} <= set(module.function_names)
    assert module.name == "compiled_spunet"
    assert EXECUTABLE_FORMATS[TARGETS[target].backend] in out.read_bytes()


def test_serving_entry_compiles_and_runs(compiled, tmp_path):
    """Guards: `export --serving` writing another entry or argument order than the server calls
    (`compiled_punet.main(sample, timestep, encoder_hidden_states, text_embeds, time_ids,
    guidance_scale)`), or computing other than the eager CFG step."""
    import iree.runtime as rt

    root, _, _ = compiled
    for args in (
        ["export", "unet.irpa", "--serving", "--tokens", str(TOKENS), *HW, "-o", str(tmp_path / "s.mlir")],
        ["compile", str(tmp_path / "s.mlir"), "--target", "cpu"],
        ["run", str(tmp_path / "s.cpu.vmfb"), "--irpa", "unet.irpa", "--save-inputs", str(tmp_path / "in.safetensors"),
         "-o", str(tmp_path / "iree.safetensors")],
    ):
        r = run_cli(*args, cwd=root)
        assert r.returncode == 0, (args, r.stderr)
    module = rt.VmModule.mmap(rt.VmInstance(), str(tmp_path / "s.cpu.vmfb"))
    assert module.name == "compiled_punet" and "main" in module.function_names
    x = load_tensors(tmp_path / "in.safetensors")
    assert sorted(x) == sorted(["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids", "guidance_scale"])
    assert x["timestep"].shape == (1,)
    from punet.weights import load_model

    model, _ = load_model(root / "unet.irpa")
    with torch.inference_mode():
        want = ServingUNet(model)(**x)
    assert rel_l2(load_tensors(tmp_path / "iree.safetensors")["sample"], want) <= 1e-4
    # The same module cannot be run by `punet generate`, which says what to do instead.
    r = run_cli("generate", str(tmp_path / "s.cpu.vmfb"), "--irpa", "unet.irpa", "-o", str(tmp_path / "g.safetensors"),
                cwd=root)
    one_line_error(r, 1, "not a scheduled module", "--scheduled")


def test_generate_mistakes_are_one_line(compiled, tmp_path):
    """Guards: loop mistakes ending in a traceback or a half-written output: a step count the
    tables do not hold, prompt rows not doubled for CFG, shape flags against a compiled module,
    `punet run` on a scheduled module, a scheduler config on a non-scheduled export."""
    root, _, vmfb = compiled
    out = tmp_path / "o.safetensors"
    one_line_error(run_cli("generate", str(vmfb), "--irpa", "unet.irpa", "--steps", "100", "-o", str(out), cwd=root),
                   1, "--steps 100", "1 to 99")
    x = load_tensors(root / "in.safetensors")
    bad = tmp_path / "bad.safetensors"
    save_tensors(bad, dict(x, encoder_hidden_states=x["encoder_hidden_states"][:1]))
    one_line_error(run_cli("generate", str(vmfb), "--irpa", "unet.irpa", "--inputs", str(bad), "-o", str(out), cwd=root),
                   1, "'encoder_hidden_states'", "negative rows, then positive")
    one_line_error(run_cli("generate", str(vmfb), "--irpa", "unet.irpa", "--height", "128", "-o", str(out), cwd=root),
                   2, "--height")
    one_line_error(run_cli("run", str(vmfb), "--irpa", "unet.irpa", "-o", str(out), cwd=root), 2, "punet generate")
    one_line_error(run_cli("export", "unet.irpa", "--scheduler-config", "x.json", *HW, "-o", str(tmp_path / "x.mlir"),
                           cwd=root), 1, "--scheduler-config", "--scheduled")
    one_line_error(run_cli("export", "unet.irpa", "--scheduled", "--module-name", "a-b", *HW, "-o",
                           str(tmp_path / "x.mlir"), cwd=root), 1, "identifier")
    assert not out.exists() and not (tmp_path / "x.mlir").exists()


def test_loop_benchmark_runners_agree(compiled, tmp_path):
    """Guards: bench/loop.py timing a loop that computes something else than torch's (a runner fed
    other inputs or another schedule): the scheduled module's latents match torch eager's and the
    report shows both rows."""
    import subprocess
    import sys
    from pathlib import Path

    root, _, vmfb = compiled
    script = Path(__file__).resolve().parents[1] / "bench" / "loop.py"
    for runner in ("torch", "scheduled"):
        r = subprocess.run([sys.executable, str(script), runner, "--irpa", str(root / "unet.irpa"), "--vmfb", str(vmfb),
                            "--steps", "3", "--threads", "1", "--out", str(tmp_path)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    r = subprocess.run([sys.executable, str(script), "--report", "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = {row["key"]: row for row in json.loads((tmp_path / "report.json").read_text())}
    assert set(rows) == {"torch", "scheduled"} and rows["scheduled"]["rel_l2_vs_torch"] <= 1e-4
    assert rows["torch"]["rel_l2_vs_torch"] == 0 and len(rows["scheduled"]["step_ms"]) == 3
    assert "64x64, float32, 16 tokens, 3 steps" in r.stdout


