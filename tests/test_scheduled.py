"""The scheduled UNet (issue 11): Euler tables, the denoising loop and shark-ai's serving entries.

The reference throughout is diffusers: `EulerDiscreteScheduler` for the
tables and the step, and a loop of diffusers' `UNet2DConditionModel` plus
that scheduler, written as diffusers' SDXL pipeline writes it.
"""

from __future__ import annotations

import copy
import json
from importlib import resources

import pytest
import torch

from punet.config import UNetConfig
from punet.errors import PunetError
from punet.model import UNet2DConditionModel
from punet.scheduled import ScheduledUNet, SchedulerConfig, ServingUNet, euler
from punet.scheduled.generate import EagerStepper, make_loop_inputs, run_loop
from punet.signature import Signature, default_time_ids, make_inputs
from punet.tensors import load_tensors, save_tensors

from .conftest import diffusers_tiny, rel_l2, run_cli
from .test_user_path import one_line_error

SDXL_SCHEDULER = json.loads(
    (resources.files("punet.scheduled") / "configs" / euler.SDXL_SCHEDULER_CONFIG).read_text()
)
STEPS = (1, 2, 3, 7, 10, 25, 50, 99)
HW = ("--height", "64", "--width", "64")
TOKENS = 16


def diffusers_scheduler(overrides: dict | None = None):
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler.from_config({**SDXL_SCHEDULER, **(overrides or {})})


def diffusers_loop(unet, tensors: dict, steps: int, guidance: float, scheduler=None, punet_unet: bool = False):
    """diffusers' SDXL pipeline loop: latents * init_noise_sigma, then scale, CFG UNet call, Euler step."""
    sched = scheduler or diffusers_scheduler()
    sched.set_timesteps(steps)
    dtype = tensors["sample"].dtype
    latents = tensors["sample"] * sched.init_noise_sigma
    text = {"text_embeds": tensors["text_embeds"], "time_ids": tensors["time_ids"].to(dtype)}
    with torch.inference_mode():
        for t in sched.timesteps:
            x = sched.scale_model_input(torch.cat([latents] * 2), t)
            if punet_unet:
                noise = unet(sample=x, timestep=t.reshape(1), encoder_hidden_states=tensors["encoder_hidden_states"],
                             text_embeds=tensors["text_embeds"], time_ids=tensors["time_ids"])
            else:
                noise = unet(x, t, tensors["encoder_hidden_states"], added_cond_kwargs=text).sample
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance * (cond - uncond)
            latents = sched.step(noise, t, latents).prev_sample
    return latents


# ---- tables -----------------------------------------------------------------------


@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "linear"])
def test_tables_equal_diffusers(spacing, beta_schedule):
    """Guards: a wrong step ratio, steps_offset, spacing, beta schedule, interpolation, or trailing sigma:
    punet's timesteps and sigmas must be bit-identical to `set_timesteps(n)` for every n tried."""
    overrides = {"timestep_spacing": spacing, "beta_schedule": beta_schedule}
    cfg = SchedulerConfig.from_dict({**SDXL_SCHEDULER, **overrides})
    ref = diffusers_scheduler(overrides)
    for n in STEPS:
        ref.set_timesteps(n)
        t, s = euler.tables(cfg, n)
        assert torch.equal(t, ref.timesteps), (n, t[:4], ref.timesteps[:4])
        assert torch.equal(s, ref.sigmas), (n, s[:4], ref.sigmas[:4])
        assert torch.equal(euler.init_noise_sigma(cfg, s), torch.as_tensor(ref.init_noise_sigma)), n


def test_step_tables_rows_are_the_padded_schedules():
    """Guards: run_initialize picking the wrong row (off by one) or padding with stale values:
    row n of the 100x100 tables is the n-step schedule followed by zeros."""
    cfg = SchedulerConfig.sdxl()
    ts, ss = euler.step_tables(cfg)
    assert ts.shape == ss.shape == (100, 100)
    assert not ts[0].any() and not ss[0].any()
    for n in STEPS:
        t, s = euler.tables(cfg, n)
        assert torch.equal(ts[n, :n], t) and not ts[n, n:].any()
        assert torch.equal(ss[n, : n + 1], s) and not ss[n, n + 1 :].any()


def test_shipped_config_is_sdxl_base():
    """Guards: the shipped scheduler config drifting from SDXL base's scheduler_config.json
    (stabilityai/stable-diffusion-xl-base-1.0/scheduler): its 20-step schedule, worked out by hand,
    starts at timestep 951 (= 19 * 50 + 1) and ends at 1; at timestep 999 the noise level is SDXL's
    well-known sigma_max of 14.6146."""
    cfg = SchedulerConfig.sdxl()
    assert (cfg.beta_start, cfg.beta_end, cfg.beta_schedule) == (0.00085, 0.012, "scaled_linear")
    assert (cfg.timestep_spacing, cfg.steps_offset, cfg.prediction_type) == ("leading", 1, "epsilon")
    t, s = euler.tables(cfg, 20)
    assert t[0].item() == 951 and t[-1].item() == 1 and s[-1].item() == 0
    t, s = euler.tables(SchedulerConfig.from_dict({**SDXL_SCHEDULER, "timestep_spacing": "linspace"}), 20)
    assert t[0].item() == 999 and abs(s[0].item() - 14.6146) < 1e-4


@pytest.mark.parametrize(
    "change, needle",
    [
        ({"prediction_type": "v_prediction"}, "prediction_type='v_prediction'"),
        ({"use_karras_sigmas": True}, "use_karras_sigmas=True"),
        ({"interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
        ({"timestep_spacing": "even"}, "timestep_spacing='even'"),
        ({"_class_name": "DDIMScheduler"}, "'DDIMScheduler'"),
        ({"shift": 3.0}, "unknown scheduler config key 'shift'"),
    ],
)
def test_unsupported_scheduler_config_names_the_key(change, needle, tmp_path):
    """Guards: a scheduler feature punet does not implement (v-prediction, Karras sigmas, another
    scheduler) accepted silently and giving another schedule than diffusers."""
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps({**SDXL_SCHEDULER, **change}))
    with pytest.raises(PunetError) as e:
        SchedulerConfig.from_json(path)
    assert needle in str(e.value) and str(path) in str(e.value)


# ---- the loop, eager --------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    ref = diffusers_tiny("tiny-sdxl")
    config = UNetConfig.from_dict(dict(ref.config))
    return ref, config


def _punet(ref, config, dtype):
    unet = UNet2DConditionModel(config)
    unet.load_state_dict(ref.state_dict())
    return unet.to(dtype).eval()


def _loop_inputs(config, dtype: str, seed: int = 0):
    sig = Signature(1, 64, 64, dtype, tokens=TOKENS, scheduled=True)
    return sig, make_loop_inputs(config, sig, seed)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_scheduler_math_is_bit_exact(tiny, dtype):
    """Guards: any dtype detail of the step (a sigma rounded where torch keeps it, a product in fp32
    where torch rounds, the update not in fp32, the init scale): with the same UNet in both loops,
    punet's ScheduledUNet and diffusers' scheduler give bit-identical latents after 10 steps."""
    ref, config = tiny
    unet = _punet(ref, config, getattr(torch, dtype))
    sig, x = _loop_inputs(config, dtype)
    model = ScheduledUNet(unet, SchedulerConfig.sdxl(), default_time_ids(sig, 2, 6))
    ours = run_loop(EagerStepper(model), x, sig, steps=10, guidance=7.5, runner="eager").latents
    theirs = diffusers_loop(unet, x, 10, 7.5, punet_unet=True)
    assert ours.dtype == theirs.dtype
    assert torch.equal(ours, theirs), rel_l2(ours, theirs)


# punet's 10-step loop against diffusers' (UNet + scheduler) on this model, relative L2, measured:
# float32 1.7e-6 (the issue's bound: 1e-5). In float16 / bfloat16, against diffusers' float32 loop:
# punet 3.0e-3 / 3.3e-2, diffusers' own loop in that dtype 3.1e-3 / 2.7e-2 (punet keeps norm statistics
# in fp32, diffusers' CPU kernels upcast differently). Bound: no worse than 1.5x diffusers' own error,
# the bound test_model.py sets for one UNet call.
LOWP_FACTOR = 1.5


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_eager_loop_matches_diffusers(tiny, dtype):
    """Guards: the loop drifting from diffusers' SDXL pipeline (rows swapped in CFG, the wrong
    timestep fed to the UNet, a missing scale, the wrong init sigma) in any dtype."""
    ref, config = tiny
    sig, x = _loop_inputs(config, dtype)
    model = ScheduledUNet(_punet(ref, config, getattr(torch, dtype)), SchedulerConfig.sdxl(), default_time_ids(sig, 2, 6))
    ours = run_loop(EagerStepper(model), x, sig, steps=10, guidance=7.5, runner="eager").latents
    exact = diffusers_loop(ref, {k: v.float() for k, v in x.items()}, 10, 7.5)
    if dtype == "float32":
        assert rel_l2(ours, exact) <= 1e-5
        return
    theirs = diffusers_loop(copy.deepcopy(ref).to(getattr(torch, dtype)), x, 10, 7.5)
    assert ours.dtype == theirs.dtype
    assert rel_l2(ours, exact) <= LOWP_FACTOR * rel_l2(theirs, exact), (rel_l2(ours, exact), rel_l2(theirs, exact))


def test_given_time_ids_are_used(tiny):
    """Guards: the loop ignoring the inputs' time_ids for the defaults: with other micro-conditioning
    (a 2x original size, a crop) the result follows diffusers with those time ids, not the defaults."""
    ref, config = tiny
    sig, x = _loop_inputs(config, "float32")
    x["time_ids"] = torch.tensor([[128.0, 128.0, 16.0, 8.0, 64.0, 64.0]] * 2)
    model = ScheduledUNet(_punet(ref, config, torch.float32), SchedulerConfig.sdxl(), default_time_ids(sig, 2, 6))
    ours = run_loop(EagerStepper(model), x, sig, steps=4, guidance=5.0, runner="eager").latents
    assert rel_l2(ours, diffusers_loop(ref, x, 4, 5.0)) <= 1e-5
    default = dict(x, time_ids=default_time_ids(sig, 2, 6))
    assert rel_l2(ours, diffusers_loop(ref, default, 4, 5.0)) > 1e-3


def test_serving_unet_is_the_cfg_step(tiny):
    """Guards: the serving entry (`compiled_punet.main`, conditioning in the model dtype) computing
    something else than the CFG step: in float16 it equals diffusers' CFG step on the same inputs
    to the UNet's own float16 error."""
    ref, config = tiny
    sig = Signature(1, 64, 64, "float16", tokens=TOKENS, serving=True)
    assert [(s.name, s.shape, s.dtype) for s in sig.inputs(config)][1] == ("timestep", (1,), "float16")
    x = make_inputs(config, sig, 0)
    with torch.inference_mode():
        ours = ServingUNet(_punet(ref, config, torch.float16))(**x)
        noise = ref(torch.cat([x["sample"].float()] * 2), x["timestep"].float(), x["encoder_hidden_states"].float(),
                            added_cond_kwargs={"text_embeds": x["text_embeds"].float(), "time_ids": x["time_ids"].float()}).sample
    uncond, cond = noise.chunk(2)
    want = uncond + x["guidance_scale"].float() * (cond - uncond)
    assert rel_l2(ours, want) <= 5e-3


def test_signature_kinds():
    """Guards: the entry names, argument order and dtypes shark-ai's server calls drifting
    (amdsharktank/torch_exports/sdxl/unet.py and shortfin_apps/sd, v3.9.0)."""
    config = UNetConfig.from_dict(dict(diffusers_tiny("tiny-sdxl").config))
    sched = Signature(2, 64, 64, "float16", tokens=64, scheduled=True)
    assert (sched.cfg, sched.serving, sched.module_name) == (True, True, "compiled_spunet")
    init, fwd = sched.entries(config)
    assert (init.name, [s.name for s in init.inputs], [s.shape for s in init.inputs]) == (
        "run_initialize", ["sample", "num_steps"], [(2, 4, 8, 8), (1,)])
    assert [o.name for o in init.outputs] == ["latents", "time_ids", "timesteps", "sigmas"]
    assert [o.shape for o in init.outputs][1:] == [(4, 6), (100,), (100,)]
    assert fwd.name == "run_forward"
    assert [(s.name, s.dtype) for s in fwd.inputs] == [
        ("latents", "float16"), ("prompt_embeds", "float16"), ("text_embeds", "float16"), ("time_ids", "float32"),
        ("guidance_scale", "float16"), ("step_index", "int64"), ("timesteps", "float32"), ("sigmas", "float32"),
    ]
    assert fwd.inputs[1].shape == (4, 64, config.cross_attention_dim)
    serving = Signature(1, 64, 64, "float16", serving=True)
    assert (serving.entry, serving.module_name, serving.cfg) == ("main", "compiled_punet", True)
    assert Signature(1, 64, 64, module_name="mine", scheduled=True).module_name == "mine"
    with pytest.raises(PunetError, match="bfloat16 rounds timesteps"):
        Signature(1, 64, 64, "bfloat16", serving=True)
    with pytest.raises(PunetError, match="identifier"):
        Signature(1, 64, 64, module_name="compiled-spunet", scheduled=True)
    with pytest.raises(PunetError, match="two entries"):
        sched.inputs(config)


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


def test_cuda_refuses_low_precision_at_token_counts_it_miscompiles():
    """Guards: a CUDA module that runs but is wrong. On H100/H200, IREE 3.13's float16/bfloat16 CUDA code
    was wrong whenever the text length was a multiple of 16 (the serving length 64 among them) and right
    at 72 and 77 and in float32 (docs/benchmarks.md, GPU runs 4-7): compile refuses exactly those."""
    from punet.compile import TARGETS, plan_compile

    config = UNetConfig.from_dict(dict(diffusers_tiny("tiny-sdxl").config))
    for name in ("sm_80", "sm_86", "sm_89", "hopper"):
        for dtype in ("float16", "bfloat16"):
            with pytest.raises(PunetError, match=f"{dtype}, 64 text tokens.*--tokens 77"):
                plan_compile(TARGETS[name], Signature(1, 64, 64, dtype, tokens=64, scheduled=True), config,
                             tuned=True, decomposed=False)
            for ok in (72, 77):
                plan_compile(TARGETS[name], Signature(1, 64, 64, dtype, tokens=ok), config, tuned=True, decomposed=False)
        plan_compile(TARGETS[name], Signature(1, 64, 64, "float32", tokens=64), config, tuned=True, decomposed=False)
    # Not a CUDA problem elsewhere: the ROCm target takes the serving length.
    plan_compile(TARGETS["gfx942"], Signature(1, 64, 64, "float16", tokens=64, scheduled=True), config, tuned=True,
                 decomposed=False)
