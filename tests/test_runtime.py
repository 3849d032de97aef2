"""punet.runtime (Session, run_vmfb, bench) on a small compiled SDXL-architecture UNet, against torch eager.

The .irpa/.mlir/.vmfb are built once into pytest's cache folder (keyed by punet's source), so a
re-run, and each mutant of a mutation-testing run, costs no compile.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import punet
from punet.builtin import write_checkpoint
from punet.compile import compile_vmfb
from punet.eager import call_model
from punet.errors import PunetError
from punet.export import export_mlir
from punet.runtime import Session, load_build_info, run_vmfb
from punet.runtime.bench import BenchResult, Stats, benchmark, benchmark_command, host_info
from punet.signature import Signature, make_inputs
from punet.tensors import load_tensors
from punet.weights import import_checkpoint, load_model, read_metadata

from .conftest import MICRO_SDXL, eager_fp32, rel_l2

H = W = 64


def _source_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(Path(punet.__file__).parent.rglob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def built(request, tmp_path_factory):
    """dtype -> (vmfb, irpa), plus "other": an fp32 archive of the same architecture with other weights."""
    cache = getattr(request.config, "cache", None)
    root = cache.mkdir(f"punet-runtime-{_source_digest()}") if cache else tmp_path_factory.mktemp("runtime")
    if not (root / "ckpt" / "config.json").is_file():
        write_checkpoint(root / "ckpt", MICRO_SDXL, seed=0)
        write_checkpoint(root / "ckpt-other", MICRO_SDXL, seed=1)
    out = {}
    for dtype in ("float32", "bfloat16"):
        irpa = root / f"u_{dtype}.irpa"
        if not irpa.is_file():
            import_checkpoint(str(root / "ckpt"), irpa, dtype=dtype)
        mlir = export_mlir(irpa, sig=Signature(1, H, W, dtype, tokens=8), decompose_attention=True).mlir
        out[dtype] = compile_vmfb(mlir, "cpu").vmfb, irpa
    other = root / "other_float32.irpa"
    if not other.is_file():
        import_checkpoint(str(root / "ckpt-other"), other)
    out["other"] = other
    return out


def test_session_matches_eager_fp32(built):
    vmfb, irpa = built["float32"]
    session = Session.load(vmfb, irpa)
    assert session.signature == Signature(1, H, W, "float32", tokens=8) and session.device == "local-task"
    assert session.config.block_out_channels == (32, 64) and session.info["target"] == "cpu"
    x = make_inputs(session.config, session.signature, 1)
    got = session(x)
    assert got.dtype == torch.float32 and got.shape == (1, 4, H // 8, W // 8)
    assert rel_l2(got, eager_fp32(irpa, x)) <= 1e-4
    assert torch.equal(session(x), got)  # a second call on the same session gives the same bits


def test_session_bf16_in_and_out(built):
    """bf16 tensors cross the runtime boundary as bf16 (not as uint16 numbers, not via fp32)."""
    vmfb, irpa = built["bfloat16"]
    session = Session.load(vmfb, irpa)
    x = make_inputs(session.config, session.signature, 1)
    assert x["sample"].dtype == torch.bfloat16
    got = session(x)
    assert got.dtype == torch.bfloat16 and got.shape == (1, 4, H // 8, W // 8)
    expected = eager_fp32(irpa, x)
    model, _ = load_model(irpa, dtype="bfloat16")
    eager_err = rel_l2(call_model(model, x).float(), expected)
    # Measured (seeds 0-2): compiled 1.00e-2 to 1.12e-2, torch eager bf16 1.22e-2 to 1.41e-2. A bf16
    # buffer read as uint16 numbers, or a lost bf16 cast, is off by orders of magnitude.
    assert rel_l2(got.float(), expected) <= 1.25 * eager_err


def test_session_load_refusals(built, tmp_path):
    vmfb, irpa = built["float32"]
    bf16_irpa = built["bfloat16"][1]
    with pytest.raises(PunetError, match=rf"{bf16_irpa}: weights are bfloat16, {vmfb.name} takes float32"):
        Session.load(vmfb, bf16_irpa)
    with pytest.raises(PunetError, match=r"unknown device 'tpu' \(expected one of: local-task, local-sync, hip"):
        Session.load(vmfb, irpa, device="tpu")
    with pytest.raises(PunetError, match=rf"{vmfb.name} was compiled for target cpu \(device local-task\), not vulkan"):
        Session.load(vmfb, irpa, device="vulkan")
    Session.load(vmfb, irpa, device="local-sync")  # the other local driver is the same device kind
    lonely = tmp_path / "lonely.vmfb"
    shutil.copy(vmfb, lonely)
    with pytest.raises(PunetError, match=r"lonely.vmfb: no build record lonely.vmfb.json beside it"):
        Session.load(lonely, irpa)
    (tmp_path / "lonely.vmfb.json").write_text("{not json")
    with pytest.raises(PunetError, match=r"lonely.vmfb.json: malformed JSON"):
        Session.load(lonely, irpa)
    with pytest.raises(PunetError, match=r"absent.vmfb: file not found"):
        Session.load(tmp_path / "absent.vmfb", irpa)


def test_other_weights_reported_or_refused_with_exact_weights(built):
    """An archive of the same architecture with other weights (a fine-tune): used and reported,
    or refused with exact_weights."""
    vmfb, irpa = built["float32"]
    other = built["other"]
    with pytest.raises(PunetError, match=rf"weights digest \w{{12}} differs from the archive {vmfb.name} was "
                                         rf"exported from \(\w{{12}}, {irpa}\) and --exact-weights was given"):
        Session.load(vmfb, other, exact_weights=True)
    notes = []
    session = Session.load(vmfb, other, progress=notes.append)
    assert len(notes) == 1 and "same architecture, running with these weights" in notes[0]
    Session.load(vmfb, irpa, progress=notes.append)
    assert len(notes) == 1  # the exported archive itself: nothing to report
    x = make_inputs(session.config, session.signature, 2)
    got = session(x)
    assert rel_l2(got, eager_fp32(other, x)) <= 1e-4  # the parameters really come from `other`
    assert rel_l2(got, eager_fp32(irpa, x)) > 0.1


def test_session_checks_inputs(built):
    vmfb, irpa = built["float32"]
    session = Session.load(vmfb, irpa)
    x = make_inputs(session.config, session.signature, 0)
    with pytest.raises(PunetError, match=r"inputs: input 'sample' has shape \[2, 4, 8, 8\], expected \[1, 4, 8, 8\]"):
        session(dict(x, sample=torch.cat([x["sample"], x["sample"]])))
    with pytest.raises(PunetError, match=r"inputs: input 'encoder_hidden_states' has dtype torch.float16"):
        session(dict(x, encoder_hidden_states=x["encoder_hidden_states"].half()))


def test_run_vmfb_writes_the_session_output(built, tmp_path):
    vmfb, irpa = built["float32"]
    info = run_vmfb(vmfb, irpa, tmp_path / "out.safetensors", seed=3, save_inputs=tmp_path / "in.safetensors")
    assert info["signature"] == Signature(1, H, W, tokens=8) and info["dtype"] == "float32"
    assert info["device"] == "local-task" and info["ms"] > 0
    saved = load_tensors(tmp_path / "in.safetensors")
    session = Session.load(vmfb, irpa)
    expected = make_inputs(session.config, session.signature, 3)
    assert set(saved) == set(expected) and all(torch.equal(saved[k], expected[k]) for k in saved)
    out = load_tensors(tmp_path / "out.safetensors")
    assert list(out) == ["sample"] and torch.equal(out["sample"], session(expected))
    # The same inputs from a file give the same output.
    run_vmfb(vmfb, irpa, tmp_path / "again.safetensors", inputs=tmp_path / "in.safetensors")
    assert torch.equal(load_tensors(tmp_path / "again.safetensors")["sample"], out["sample"])
    from safetensors.torch import save_file

    save_file({k: v for k, v in saved.items() if k != "time_ids"}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(PunetError, match=r"bad.safetensors: missing input 'time_ids'"):
        run_vmfb(vmfb, irpa, tmp_path / "x.safetensors", inputs=tmp_path / "bad.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_build_info(built):
    vmfb, irpa = built["float32"]
    info = load_build_info(vmfb)
    assert info == json.loads(Path(str(vmfb) + ".json").read_text())
    assert info["irpa"]["weights_sha256"] == read_metadata(irpa)["weights_sha256"]


def test_stats_known_values():
    s = Stats([4.0, 1.0, 3.0, 2.0, 10.0])
    assert (s.min, s.median, s.mean, s.p90) == (1.0, 3.0, 4.0, 10.0)
    assert Stats([5.0, 1.0]).median == 3.0
    assert Stats(list(map(float, range(1, 11)))).p90 == 9.0  # nearest rank of 0.9 * (n - 1)
    assert Stats(list(map(float, range(1, 22)))).p90 == 19.0
    assert Stats([2.0]).p90 == 2.0
    assert s.to_dict() == {"min_ms": 1.0, "median_ms": 3.0, "p90_ms": 10.0, "mean_ms": 4.0,
                           "samples_ms": [4.0, 1.0, 3.0, 2.0, 10.0]}


def test_benchmark(built):
    vmfb, irpa = built["float32"]
    res = benchmark(vmfb, irpa, warmup=1, repeat=3, threads=1, vs_eager=True)
    assert isinstance(res, BenchResult)
    assert len(res.iree.samples_ms) == 3 and len(res.eager.samples_ms) == 3
    assert all(t > 0 for t in res.iree.samples_ms + res.eager.samples_ms)
    assert res.speedup_vs_eager == res.eager.median / res.iree.median
    assert (res.target, res.device, res.threads, res.entry, res.dtype) == ("cpu", "local-task", 1, "main", "float32")
    assert res.inputs == load_build_info(vmfb)["inputs"] and (res.vmfb, res.irpa) == (str(vmfb), str(irpa))
    d = res.to_dict()
    assert d["iree"]["samples_ms"] == res.iree.samples_ms and d["eager"]["median_ms"] == res.eager.median
    assert d["speedup_vs_eager"] == res.speedup_vs_eager and d["threads"] == 1
    assert res.command == (
        f"iree-benchmark-module --module={vmfb} --parameters=model={irpa} --device=local-task --function=main "
        "--input=1x4x8x8xf32 --input=1xf32 --input=1x8x32xf32 --input=1x32xf32 --input=1x6xf32 "
        "--task_topology_max_group_count=1"
    )
    assert set(res.host) == {"cpu", "cpu_id", "isa", "cores", "torch", "python"} and res.host["torch"] == torch.__version__
    alone = benchmark(vmfb, irpa, warmup=0, repeat=1, threads=1)
    assert alone.eager is None and alone.speedup_vs_eager is None and alone.to_dict()["eager"] is None


def test_benchmark_command_without_threads(built):
    vmfb, irpa = built["bfloat16"]
    session = Session.load(vmfb, irpa)
    cmd = benchmark_command(session, None)
    assert cmd.endswith("--input=1x4x8x8xbf16 --input=1xf32 --input=1x8x32xbf16 --input=1x32xbf16 --input=1x6xf32")
    assert "--task_topology_max_group_count" not in cmd


def test_benchmark_defaults_and_progress(built):
    """threads defaults to every core; each warm-up and timed call is reported, in order."""
    import os

    vmfb, irpa = built["float32"]
    said = []
    res = benchmark(vmfb, irpa, warmup=2, repeat=2, progress=said.append)
    assert said == ["warm-up 1/2", "warm-up 2/2", "call 1/2", "call 2/2"]
    assert res.threads == os.cpu_count() and res.eager is None and len(res.iree.samples_ms) == 2
    assert res.command.endswith(f"--task_topology_max_group_count={os.cpu_count()}")


def test_host_info_known_values():
    """`punet bench` records the CPU as punet.host reads it (tests/test_host.py), with the cores and
    versions. Catches a record without the family and model or the ISA flags."""
    import os
    import platform

    from punet import host

    assert host_info() == {**host.info(), "cores": os.cpu_count(), "torch": torch.__version__,
                           "python": platform.python_version()}


def test_run_vmfb_defaults_device_and_metadata(built, tmp_path, monkeypatch):
    """Seed 0 by default; the device asked for is the one loaded; the output says who made it."""
    import os
    import time

    from safetensors import safe_open

    vmfb, irpa = built["float32"]
    loaded = []
    load = Session.load.__func__

    def spy(cls, *args, **kwargs):
        loaded.append(args[2] if len(args) > 2 else kwargs.get("device", "local-task"))
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(Session, "load", classmethod(spy))
    t0 = time.perf_counter()
    info = run_vmfb(vmfb, irpa, tmp_path / "out.safetensors", save_inputs=tmp_path / "in.safetensors",
                    device="local-sync")
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert loaded == ["local-sync"] and info["device"] == "local-sync" and info["threads"] == os.cpu_count()
    assert 0.05 < info["ms"] < wall_ms  # milliseconds of the call alone
    session = load(Session, vmfb, irpa)
    saved = load_tensors(tmp_path / "in.safetensors")
    assert all(torch.equal(v, make_inputs(session.config, session.signature, 0)[k]) for k, v in saved.items())
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata() == {"producer": "punet-iree", "device": "local-sync"}


def test_benchmark_defaults_device_and_timing(built, monkeypatch):
    """warmup 1 and repeat 5 by default; the device asked for is loaded; samples are milliseconds."""
    import time

    vmfb, irpa = built["float32"]
    said = []
    t0 = time.perf_counter()
    res = benchmark(vmfb, irpa, device="local-sync", threads=1, vs_eager=True, progress=said.append)
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert said == ["warm-up 1/1"] + [f"call {i}/5" for i in range(1, 6)]
    assert "--device=local-sync" in res.command and res.device == "local-sync"
    samples = res.iree.samples_ms + res.eager.samples_ms
    assert len(samples) == 10 and all(0.05 < t for t in samples) and sum(samples) < wall_ms
    d = res.to_dict()
    assert d["iree"]["median_ms"] == res.iree.median and d["eager"]["p90_ms"] == res.eager.p90


def test_benchmark_command_names_every_dtype():
    """float16 inputs are written f16 (IREE's spelling), as f32 and bf16 are."""
    from types import SimpleNamespace

    from punet import UNetConfig

    config = UNetConfig.from_dict(MICRO_SDXL)
    session = SimpleNamespace(vmfb="m.vmfb", parameters=[("model", "p.irpa")], device="local-task", info={"entry": "main"},
                              config=config, signature=Signature(1, H, W, "float16", tokens=8))
    assert benchmark_command(session, 2) == (
        "iree-benchmark-module --module=m.vmfb --parameters=model=p.irpa --device=local-task --function=main "
        "--input=1x4x8x8xf16 --input=1xf32 --input=1x8x32xf16 --input=1x32xf16 --input=1x6xf32 "
        "--task_topology_max_group_count=2"
    )
    assert "--task_topology" not in benchmark_command(SimpleNamespace(**{**vars(session), "device": "local-sync"}), 2)


def test_device_not_available_is_one_line(built, tmp_path):
    """A module built for a GPU driver this host lacks: refused naming the device."""
    vmfb, irpa = built["float32"]
    gpu = tmp_path / "gpu.vmfb"
    shutil.copy(vmfb, gpu)
    info = load_build_info(vmfb)
    (tmp_path / "gpu.vmfb.json").write_text(json.dumps({**info, "driver": "hip", "target": "gfx942"}))
    with pytest.raises(PunetError, match=r"^device 'hip' is not available here: (?!None$)\S.*$"):  # the reason
        Session.load(gpu, irpa, device="hip")


def test_archive_of_another_architecture_is_refused(built):
    """Guards: a check that compares only dtypes (or nothing) letting an archive of another
    architecture reach the runtime, which fails there on a missing or misshapen parameter."""
    from punet.runtime import check_archive_fits

    vmfb, irpa = built["float32"]
    info, meta = load_build_info(vmfb), read_metadata(irpa)
    check_archive_fits(info, meta, vmfb, irpa)  # its own archive fits
    wider = {**meta, "config": {**meta["config"], "cross_attention_dim": 2 * meta["config"]["cross_attention_dim"]}}
    with pytest.raises(PunetError, match=r"another architecture than .* \(config differs in: cross_attention_dim\)"):
        check_archive_fits(info, wider, vmfb, irpa)
    two = {**wider, "config": {**wider["config"], "norm_eps": 0.5}}
    with pytest.raises(PunetError, match=rf"^{re.escape(str(irpa))}: another architecture than {vmfb.name} was "
                                         r"exported for \(config differs in: norm_eps, cross_attention_dim\)$"):
        check_archive_fits(info, two, vmfb, irpa)


def test_run_and_benchmark_pass_on_exact_weights_and_the_report(built, tmp_path):
    """Bugs: `run_vmfb` / `benchmark` not handing `exact_weights` or their progress callback to `Session.load`
    (a fine-tune neither refused under --exact-weights nor reported), or refusing fine-tunes by default.
    Reference: the archives' digests and the build record (the report in full), Session.load's refusal."""
    vmfb, irpa = built["float32"]
    other = built["other"]
    info = load_build_info(vmfb)
    report = (
        f"{other.name}: weights digest {read_metadata(other)['weights_sha256'][:12]} differs from the archive "
        f"{vmfb.name} was exported from ({info['irpa']['weights_sha256'][:12]}, {info['irpa']['path']})"
    )
    with pytest.raises(PunetError) as refused:
        Session.load(vmfb, other, exact_weights=True)
    assert str(refused.value) == report + " and --exact-weights was given"
    runs = {
        "run_vmfb": lambda **kw: run_vmfb(vmfb, other, tmp_path / "o.safetensors", **kw),
        "benchmark": lambda **kw: benchmark(vmfb, other, warmup=0, repeat=1, **kw),
    }
    for name, run in runs.items():
        with pytest.raises(PunetError, match="^" + re.escape(str(refused.value)) + "$"):
            run(exact_weights=True)
        notes = []
        run(**{"progress" if name == "run_vmfb" else "say": notes.append})  # not refused by default
        assert notes == [report + ": same architecture, running with these weights"], name


def test_benchmark_refuses_bad_counts(built):
    """Bug: the warm-up/repeat check joined with `and`, so one bad count alone is let through (a negative
    warm-up silently skipped, zero timed calls failing later on an empty list)."""
    vmfb, irpa = built["float32"]
    for warmup, repeat in ((-1, 5), (1, 0), (-1, 0)):
        message = rf"^benchmark needs warmup >= 0 and repeat >= 1 \(got {warmup}, {repeat}\)$"
        with pytest.raises(ValueError, match=message):
            benchmark(vmfb, irpa, warmup=warmup, repeat=repeat)


def test_weights_in_memory_are_used_in_place(built):
    """`Session.load(weights="memory")` (`punet run/bench --weights memory`): the archive read into this
    process's memory, which the device must use in place. Bugs: the weights read wrong (a short read, an
    offset lost: other output bits than the mapped archive's), the buffer handed to IREE as a copy (two
    archives in memory: the resident size the mode must keep), or a mode that silently maps the file.
    Reference: the same module with its archive mapped, bit for bit; IREE holding the buffer (an mmap
    with exported pointers cannot be closed)."""
    vmfb, irpa = built["float32"]
    notes = []
    mapped = Session.load(vmfb, irpa)
    memory = Session.load(vmfb, irpa, weights="memory", progress=notes.append)
    assert mapped.weights == "mapped" and memory.weights == "memory"
    x = make_inputs(memory.config, memory.signature, 3)
    assert torch.equal(memory(x), mapped(x))
    (buf,) = memory._buffers
    assert len(buf) == irpa.stat().st_size and bytes(buf[:4]) == irpa.read_bytes()[:4]
    with pytest.raises(BufferError):
        buf.close()  # IREE imported it: no copy was made
    assert re.fullmatch(rf"read {irpa.name} into memory \(0\.\d\d GiB\) in \d+\.\d s", notes[-1])
    with pytest.raises(PunetError, match=r"unknown weights mode 'disk' \(expected one of: mapped, memory\)"):
        Session.load(vmfb, irpa, weights="disk")
    with pytest.raises(PunetError, match=r"weights in memory is for CPU devices \(local-task, local-sync\), not cuda"):
        Session.load(vmfb, irpa, device="cuda", weights="memory")
    res = benchmark(vmfb, irpa, warmup=0, repeat=1, weights="memory")
    assert res.weights == "memory" and res.to_dict()["weights"] == "memory"
