"""The path a user walks, mistakes included: each test names the defect it guards against.

One small SDXL-architecture checkpoint (diffusers' own save_pretrained) goes through the plain
path: import, export with no options, compile for cpu, run, compare with diffusers. Around it,
the ordinary mistakes each get one line on stderr, the right exit code and no traceback.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from punet import cli
from punet.artifacts import sha256_file
from punet.compile import compiler_version
from punet.tensors import load_tensors
from punet.weights import import_checkpoint

from .conftest import rel_l2, run_cli

HW = ("--height", "64", "--width", "64")


def one_line_error(r, code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    # Progress notes ("· ...") may come first; the error itself is one line.
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip() and not ln.startswith("·")]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr and "nanobind" not in r.stderr
    line = lines[0]
    assert line.count(": error:") == 1, line  # no doubled "punet run: error: punet run: ..."
    for n in needles:
        assert n in line, (n, line)
    return line


@pytest.fixture(scope="module")
def plain(tmp_path_factory, checkpoints):
    """import -> export (no options) -> compile --target cpu -> run -> reference, as a user types them."""
    root = tmp_path_factory.mktemp("plain")
    src = checkpoints["tiny-sdxl"]
    for args in (
        ["import", str(src), "-o", "unet.irpa"],
        ["export", "unet.irpa", *HW, "--batch", "2", "-o", "unet.mlir"],
        ["compile", "unet.mlir", "--target", "cpu"],
        ["run", "unet.cpu.vmfb", "--irpa", "unet.irpa", "--save-inputs", "in.safetensors", "-o", "iree.safetensors"],
        ["reference", str(src), "--inputs", "in.safetensors", "-o", "ref.safetensors"],
    ):
        r = run_cli(*args, cwd=root)
        assert r.returncode == 0, (args, r.stderr)
    return root, src


def test_plain_path_matches_diffusers(plain):
    """Guards: `punet compile --target cpu` refusing the default export ("export with
    --decompose-attention"), and a compiled module that disagrees with diffusers."""
    root, _ = plain
    assert (root / "unet.cpu.vmfb").is_file()  # named after the .mlir, as the README says
    info = json.loads((root / "unet.cpu.vmfb.json").read_text())
    assert info["attention"] == "decomposed" and info["exported_from"] == str((root / "unet.mlir").resolve())
    # Compiled from a relative path in another folder, the record still leads to its .mlir (bench/cpu_profile.py
    # reads it from the .vmfb's record to classify dispatches).
    assert sha256_file(Path(info["mlir"]["path"])) == info["mlir"]["sha256"]
    got, ref = load_tensors(root / "iree.safetensors")["sample"], load_tensors(root / "ref.safetensors")["sample"]
    assert got.shape == (2, 4, 8, 8) and rel_l2(got, ref) <= 1e-4


@pytest.mark.parametrize("target", ["cpu --plain", "gfx942", "gfx1100", "vulkan", "sm_80"])
def test_same_export_compiles_for_each_target(plain, target):
    """Guards: the default export refused or failing for a target in the table (vulkan and
    cpu --plain refused it; gfx942's tuned set failed on fp32)."""
    root, _ = plain
    name, *rest = target.split()
    r = run_cli("compile", "unet.mlir", "--target", name, *rest, "-o", f"unet.{name}{''.join(rest)}.vmfb", cwd=root)
    assert r.returncode == 0, r.stderr
    info = json.loads((root / f"unet.{name}{''.join(rest)}.vmfb.json").read_text())
    if name == "gfx942":  # its tuned set is for fp16/bf16: said in one line and in the record
        assert not info["tuned"] and "plain set" in info["flag_set_note"] and "plain set" in r.stderr
    if name == "cpu":  # --plain takes fused attention as it is
        assert info["attention"] == "fused" and info["exported_from"] is None


def test_new_weights_need_no_new_export(plain, checkpoints, tmp_path):
    """Guards: a fine-tune (same architecture, other weights) refused on its digest, and the
    export cache keyed on the weights (new weights = new export + compile)."""
    root, _ = plain
    from .conftest import diffusers_tiny

    tuned = tmp_path / "finetune"
    diffusers_tiny("tiny-sdxl", seed=7).save_pretrained(tuned)
    r = run_cli("import", str(tuned), "-o", str(tmp_path / "ft.irpa"))
    assert r.returncode == 0, r.stderr
    r = run_cli("run", "unet.cpu.vmfb", "--irpa", str(tmp_path / "ft.irpa"), "--inputs", "in.safetensors",
                "-o", str(tmp_path / "ft.safetensors"), cwd=root)
    assert r.returncode == 0 and "differs from the archive" in r.stderr, r.stderr
    r = run_cli("run", str(tmp_path / "ft.irpa"), "--inputs", str(root / "in.safetensors"),
                "-o", str(tmp_path / "ft_eager.safetensors"))
    got, ref = load_tensors(tmp_path / "ft.safetensors")["sample"], load_tensors(tmp_path / "ft_eager.safetensors")["sample"]
    assert rel_l2(got, ref) <= 1e-4  # the fine-tune's weights were used, not the exported ones
    assert rel_l2(got, load_tensors(root / "iree.safetensors")["sample"]) > 1e-2
    r = run_cli("run", "unet.cpu.vmfb", "--irpa", str(tmp_path / "ft.irpa"), "--exact-weights",
                "-o", str(tmp_path / "x.safetensors"), cwd=root)
    one_line_error(r, 1, "ft.irpa", "--exact-weights")
    r = run_cli("export", str(tmp_path / "ft.irpa"), *HW, "--batch", "2", "-o", str(root / "unet.mlir"))
    assert r.returncode == 0 and "up to date" in r.stdout, r.stdout  # the weights are not part of the module


def test_build_record_has_the_compiler_version_line(plain):
    """Guards: compiler_version() returning 'IREE (https://iree.dev):', the banner, not the version."""
    root, _ = plain
    info = json.loads((root / "unet.cpu.vmfb.json").read_text())
    assert info["compiler_version"].startswith("IREE compiler version 3.13")
    assert info["compiler_version"] == compiler_version() and "@" in compiler_version()
    assert compiler_version() in (root / "unet.cpu.vmfb.compile.sh").read_text()


def test_refusals_before_iree_compile(plain, checkpoints, tmp_path):
    """Guards: sizes and targets that fail deep inside a stage (the tiny-sd15 64x64 iree-compile
    error at its 2x2 -> 1x1 downsample; `demo --target nope` as a ValueError), not up front."""
    root, _ = plain
    import_checkpoint(str(checkpoints["tiny-sd15"]), tmp_path / "sd15.irpa")
    t0 = time.perf_counter()
    r = run_cli("export", str(tmp_path / "sd15.irpa"), *HW, "-o", str(tmp_path / "x.mlir"))
    one_line_error(r, 1, "height 64 px", "4 levels", "at least 72 px")
    r = run_cli("demo", "builtin:tiny-sd15", *HW, "--out-dir", str(tmp_path / "d1"))
    one_line_error(r, 1, "height 64 px", "at least 72 px")
    r = run_cli("demo", "--target", "nope", "--out-dir", str(tmp_path / "d2"))
    one_line_error(r, 2, "--target", "nope", "gfx942")
    assert time.perf_counter() - t0 < 20  # three processes, none of which did any work
    assert not (tmp_path / "d1").exists() and not (tmp_path / "d2").exists() and not (tmp_path / "x.mlir").exists()


def test_demo_on_a_gpu_target_says_only_compilation_was_checked(tmp_path):
    """Guards: `demo --target gfx942` ending like a pass although nothing ran."""
    r = run_cli("demo", "builtin:tiny-sdxl", *HW, "--target", "gfx942", "--dtype", "float16",
                "--out-dir", str(tmp_path / "d"))
    assert r.returncode == 0, r.stderr
    assert "only compilation was checked" in r.stdout and "hip" in r.stdout


def test_output_errors_are_one_line(plain, tmp_path, monkeypatch, capsys):
    """Guards: OSError/IsADirectoryError tracebacks for a read-only or folder output, and
    export/eager run doing all their work before finding that out."""
    root, _ = plain
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder.irpa").mkdir()
    for args in (
        ["import", "builtin:tiny-sdxl", "-o", str(tmp_path / "folder.irpa")],
        ["run", str(root / "unet.irpa"), *HW, "-o", str(tmp_path / "folder")],
        ["export", str(root / "unet.irpa"), *HW, "-o", str(tmp_path / "folder")],
        ["compile", str(root / "unet.mlir"), "-o", str(tmp_path / "folder")],
    ):
        one_line_error(run_cli(*args), 1, "folder", "is a folder")
    # A read-only folder (simulated: root ignores permission bits): refused before any work.
    import punet.eager
    import punet.export

    def boom(*_a, **_k):
        raise AssertionError("did the work before checking the output")

    monkeypatch.setattr(punet.export, "export_module", boom)
    monkeypatch.setattr(punet.eager, "run_eager", boom)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m: False if str(p).startswith(str(tmp_path / "ro")) else real_access(p, m))
    (tmp_path / "ro").mkdir()
    for args in (
        ["export", str(root / "unet.irpa"), *HW, "-o", str(tmp_path / "ro" / "x.mlir")],
        ["run", str(root / "unet.irpa"), *HW, "-o", str(tmp_path / "ro" / "x.safetensors")],
        ["import", "builtin:tiny-sdxl", "-o", str(tmp_path / "ro" / "x.irpa")],
    ):
        assert cli.main(args) == 1
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "cannot write in" in err and "read-only" in err, err
    # A write that fails anyway (e.g. the file system turned read-only): still one line.
    import tempfile

    def erofs(*_a, **_k):
        raise OSError(30, "Read-only file system")

    monkeypatch.undo()
    monkeypatch.setattr(tempfile, "mkstemp", erofs)
    assert cli.main(["run", str(root / "unet.irpa"), *HW, "-o", str(tmp_path / "y.safetensors")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Read-only file system" in err and "y.safetensors" in err, err


def test_usage_mistakes_are_one_line_exit_2(plain, tmp_path):
    """Guards: values accepted silently or failing late (--tokens 0, --threads -1 handed to IREE,
    --rtol -1, bench --repeat 0's min() of an empty list, a bad --height exiting 1), a .vmfb run
    at shapes it was not compiled for, eager runs on IREE device names, import writing an .irpa
    under a .safetensors name, IREE's archive options (--weights, --exact-weights) ignored by an
    eager run."""
    root, _ = plain
    out = str(tmp_path / "o.safetensors")
    cases = [
        (["run", "unet.irpa", "--tokens", "0", "-o", out], ["--tokens", ">= 1"]),
        (["run", "unet.irpa", "--height", "100", "-o", out], ["--height", "multiple of 8"]),
        (["run", "unet.irpa", "--batch", "0", "-o", out], ["--batch", ">= 1"]),
        (["bench", "unet.cpu.vmfb", "--irpa", "unet.irpa", "--threads", "-1"], ["--threads", ">= 1"]),
        (["bench", "unet.cpu.vmfb", "--irpa", "unet.irpa", "--repeat", "0"], ["--repeat", ">= 1"]),
        (["demo", "--threads", "0"], ["--threads"]),
        (["compare", out, out, "--rtol", "-1"], ["--rtol", ">= 0"]),
        (["run", "unet.cpu.vmfb", "--irpa", "unet.irpa", "--height", "512", "-o", out], ["--height 512", "height 64"]),
        (["run", "unet.cpu.vmfb", "--irpa", "unet.irpa", "--batch", "4", "-o", out], ["--batch 4", "batch 2"]),
        (["run", "unet.cpu.vmfb", "--irpa", "unet.irpa", "--dtype", "float16", "-o", out], ["--dtype", "float32"]),
        (["run", "unet.irpa", "--device", "local-task", "-o", out], ["--device local-task", "torch"]),
        (["run", "unet.cpu.vmfb", "--irpa", "unet.irpa", "--device", "cpu", "-o", out], ["--device cpu", "IREE"]),
        (["run", "unet.cpu.vmfb", "-o", out], ["--irpa"]),
        (["run", "unet.irpa", "--weights", "memory", "-o", out], ["--weights", ".vmfb", "torch eager"]),
        (["run", "unet.irpa", "--exact-weights", "-o", out], ["--exact-weights", ".vmfb"]),
        (["import", "builtin:tiny-sdxl", "-o", str(tmp_path / "model.safetensors")], ["-o", ".irpa"]),
        (["compile", "unet.mlir", "--target", "nope"], ["--target", "nope"]),
        (["compile", "unet.mlir", "--flags-extra", "oops"], ["--flags-extra", "'-'"]),
    ]
    for args, needles in cases:
        one_line_error(run_cli(*args, cwd=root), 2, *needles)
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_eager_run_on_cuda_without_cuda_is_one_line(plain, tmp_path):
    """Guards: `run X.irpa --device cuda` printing torch's traceback and nanobind leak lines."""
    root, _ = plain
    r = run_cli("run", "unet.irpa", "--device", "cuda", "-o", str(tmp_path / "o.safetensors"), cwd=root)
    one_line_error(r, 1, "--device cuda", "CUDA")


def test_compile_details(plain, tmp_path):
    """Guards: an unknown --flags-extra reported as "Did you mean ..." rather than the log's
    "Unknown command line argument"; no default compile target; no --version."""
    root, _ = plain
    r = run_cli("compile", "unet.mlir", "--flags-extra=--iree-no-such-flag", "-o", str(tmp_path / "x.vmfb"), cwd=root)
    one_line_error(r, 1, "Unknown command line argument", "--iree-no-such-flag")
    assert not (tmp_path / "x.vmfb").exists()
    r = run_cli("compile", "unet.mlir", cwd=root)  # the default target is cpu
    assert r.returncode == 0 and "unet.cpu.vmfb" in r.stdout, r.stderr
    r = run_cli("--version")
    assert r.returncode == 0 and "iree-base-compiler 3.13" in r.stdout and "torch" in r.stdout


def test_cli_parser_loads_without_torch():
    """Bug: a constant the parser needs (the `--weights` choices) imported from a module that imports torch,
    which put ~1 s on every `punet` command, `punet --help` and `punet compile` included. Reference: the
    modules a fresh interpreter holds after building the parser."""
    code = "import sys, punet.cli; punet.cli.build_parser(); sys.exit('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_list_targets_table_and_closed_pipe():
    """Guards: `punet compile --list-targets | head` ending in a BrokenPipeError traceback, and
    a target table without a header or the dtypes each target takes."""
    r = run_cli("compile", "--list-targets")
    assert r.returncode == 0
    head = r.stdout.splitlines()
    assert any("target" in ln and "dtypes" in ln and "tuned set for" in ln for ln in head[:6])
    vulkan = next(ln for ln in head if ln.split("│")[1:2] and ln.split("│")[1].strip() == "vulkan")
    assert "f32" in vulkan and "f16" not in vulkan  # the baseline profile is fp32 only
    p = subprocess.Popen([sys.executable, "-m", "punet.cli", "compile", "--list-targets"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.read(10)
    p.stdout.close()
    err = p.stderr.read().decode()
    p.wait()
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_outputs_are_world_readable_and_commands_uncut(plain, tmp_path):
    """Guards: output .safetensors written 0600 while .irpa/.mlir are 0644; bench's
    `equivalent:` command wrapped over lines and paths cut with '...' when stdout is a pipe."""
    root, _ = plain
    umask = os.umask(0o022)
    os.umask(umask)
    want = 0o666 & ~umask
    assert (root / "iree.safetensors").stat().st_mode & 0o777 == want
    assert (root / "unet.irpa").stat().st_mode & 0o777 == want
    r = run_cli("bench", str(root / "unet.cpu.vmfb"), "--irpa", str(root / "unet.irpa"), "--repeat", "1")
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("equivalent:"))
    assert "iree-benchmark-module" in line and "--parameters=model=" in line and str(root / "unet.irpa") in line
    assert "…" not in r.stdout and "..." not in r.stdout


def test_reference_is_quiet(plain, tmp_path):
    """Guards: diffusers' "accelerate was not found" / "modules that should be kept in float32"
    notes on every `punet reference`."""
    root, src = plain
    r = run_cli("reference", str(src), "--inputs", str(root / "in.safetensors"), "-o", str(tmp_path / "r.safetensors"))
    assert r.returncode == 0 and r.stderr.strip() == "", r.stderr
