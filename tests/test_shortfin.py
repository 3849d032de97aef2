"""Opt-in: shortfin, shark-ai's serving engine, loads punet's scheduled UNet and runs its loop.

shortfin 3.9.0 reads only modules from iree-base-compiler <= 3.9 (VM bytecode version 15), so
these tests compile with the iree-compile of a separate environment and run shortfin there, in a
subprocess (tests/shortfin/drive.py, the SD server's calls through shortfin's program API):

    tests/shortfin/setup_env.sh /path/to/sfenv
    PUNET_SHORTFIN_PYTHON=/path/to/sfenv/bin/python python -m pytest -m shortfin tests/test_shortfin.py

Skipped unless PUNET_SHORTFIN_PYTHON is set; never part of CI. Nothing here uses the network.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from punet.builtin import write_checkpoint
from punet.compare import TOLERANCE
from punet.tensors import save_tensors

from .conftest import MICRO_SDXL, run_cli
from .shortfin import toy

SHORTFIN_PYTHON = os.environ.get("PUNET_SHORTFIN_PYTHON")
pytestmark = [
    pytest.mark.shortfin,
    pytest.mark.skipif(
        not SHORTFIN_PYTHON,
        reason="opt-in: run tests/shortfin/setup_env.sh VENV, then set PUNET_SHORTFIN_PYTHON=VENV/bin/python",
    ),
]

HERE = Path(__file__).parent / "shortfin"
SHORTFIN_VERSION = "3.9.0"
COMPILER_VERSION = "3.9."  # the newest iree-base-compiler whose modules shortfin 3.9.0 loads
# llvm-cpu for this machine, nothing else: every flag exists in iree-compile 3.9 and 3.13 alike.
CPU_FLAGS = (
    "--iree-hal-target-device=local",
    "--iree-hal-local-target-device-backends=llvm-cpu",
    "--iree-llvmcpu-target-cpu=host",
)
STEPS, GUIDANCE = 4, 7.5


@pytest.fixture(scope="module")
def sfenv() -> tuple[Path, Path]:
    """(python, iree-compile) of the shortfin environment, versions checked."""
    python = Path(SHORTFIN_PYTHON)
    compiler = python.parent / "iree-compile"
    probe = "import importlib.metadata as m, shortfin.host; print(m.version('shortfin'), m.version('iree-base-compiler'))"
    r = subprocess.run([str(python), "-c", probe], check=False, capture_output=True, text=True)
    assert r.returncode == 0, f"PUNET_SHORTFIN_PYTHON={python}: cannot import shortfin: {r.stderr.strip()[-500:]}"
    shortfin_version, compiler_version = r.stdout.split()
    assert shortfin_version == SHORTFIN_VERSION and compiler_version.startswith(COMPILER_VERSION), (
        f"{python}: shortfin {shortfin_version} + iree-base-compiler {compiler_version}; "
        f"expected {SHORTFIN_VERSION} + {COMPILER_VERSION}x (tests/shortfin/setup_env.sh)"
    )
    assert compiler.is_file(), f"{compiler}: not found"
    return python, compiler


def compile_cpu(compiler: Path, mlir: Path, vmfb: Path) -> None:
    r = subprocess.run([str(compiler), str(mlir), *CPU_FLAGS, "-o", str(vmfb)], check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]


def drive(python: Path, vmfb: Path, irpa: Path, inputs: Path, output: Path, dtype: str, **names: str):
    """tests/shortfin/drive.py in the shortfin environment: run_initialize, then STEPS run_forward."""
    args = [str(python), str(HERE / "drive.py"), "--vmfb", str(vmfb), "--irpa", str(irpa), "--inputs", str(inputs),
            "--steps", str(STEPS), "--guidance", str(GUIDANCE), "--dtype", dtype, "-o", str(output)]
    for flag, value in names.items():
        args += [f"--{flag.replace('_', '-')}", value]
    return subprocess.run(args, check=False, capture_output=True, text=True)


def assert_close(output: Path, reference: Path, rtol: float) -> None:
    r = run_cli("compare", str(output), str(reference), "--rtol", str(rtol))
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_toy_scheduled_module_runs_in_shortfin(sfenv, tmp_path, dtype):
    """The recipe alone: both entry points, weights under scope "model", i64[1] indices, the loop."""
    python, compiler = sfenv
    torch_dtype = getattr(torch, dtype)
    model = toy.build(torch_dtype)
    inputs = toy.make_inputs(torch_dtype)
    save_tensors(tmp_path / "in.safetensors", inputs)
    save_tensors(tmp_path / "ref.safetensors", {"sample": toy.generate(model, inputs, STEPS, GUIDANCE)})
    toy.export(model, tmp_path / "toy.mlir", tmp_path / "toy.irpa")
    compile_cpu(compiler, tmp_path / "toy.mlir", tmp_path / "toy.vmfb")

    r = drive(python, tmp_path / "toy.vmfb", tmp_path / "toy.irpa", tmp_path / "in.safetensors",
              tmp_path / "out.safetensors", dtype)
    assert r.returncode == 0, r.stderr
    assert_close(tmp_path / "out.safetensors", tmp_path / "ref.safetensors", {"float32": 1e-5, "float16": 1e-2}[dtype])


def test_module_from_punets_compiler_is_refused(sfenv, tmp_path):
    """The version constraint docs/serving.md states: a module from punet's iree-compile (3.13) does not load."""
    python, _ = sfenv
    model = toy.build(torch.float32)
    save_tensors(tmp_path / "in.safetensors", toy.make_inputs(torch.float32))
    toy.export(model, tmp_path / "toy.mlir", tmp_path / "toy.irpa")
    from iree.compiler.tools import compile_file  # punet's iree-compile (3.13)

    compile_file(str(tmp_path / "toy.mlir"), output_file=str(tmp_path / "toy.vmfb"), extra_args=list(CPU_FLAGS))
    r = drive(python, tmp_path / "toy.vmfb", tmp_path / "toy.irpa", tmp_path / "in.safetensors",
              tmp_path / "out.safetensors", "float32")
    assert r.returncode == 1 and "INVALID_ARGUMENT" in r.stderr, r.stderr
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("dtype", ["float32", "float16"])  # float16: the I/O dtype shortfin's SD server takes
def test_scheduled_unet_in_shortfin_matches_punet_generate(sfenv, tmp_path, dtype):
    """punet's scheduled UNet, compiled for shortfin, against `punet generate` (torch eager) on the same inputs."""
    python, compiler = sfenv
    write_checkpoint(tmp_path / "ckpt", MICRO_SDXL)
    for args in (
        ["import", str(tmp_path / "ckpt"), "--dtype", dtype, "-o", "unet.irpa"],
        ["export", "unet.irpa", "--scheduled", "--module-name", "compiled_spunet", "--tokens", "64",
         "--height", "64", "--width", "64", "-o", "spunet.mlir"],
    ):
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 0, (args, r.stderr)

    g = torch.Generator().manual_seed(0)
    text = MICRO_SDXL["projection_class_embeddings_input_dim"] - 6 * MICRO_SDXL["addition_time_embed_dim"]
    inputs = {
        "sample": torch.randn(1, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(2, 64, MICRO_SDXL["cross_attention_dim"], generator=g),
        "text_embeds": torch.randn(2, text, generator=g),
    }
    save_tensors(tmp_path / "in.safetensors", {k: v.to(getattr(torch, dtype)) for k, v in inputs.items()})
    r = run_cli("generate", "unet.irpa", "--steps", str(STEPS), "--guidance", str(GUIDANCE),
                "--inputs", "in.safetensors", "-o", "ref.safetensors", cwd=tmp_path)
    assert r.returncode == 0, r.stderr

    compile_cpu(compiler, tmp_path / "spunet.mlir", tmp_path / "spunet.vmfb")
    r = drive(python, tmp_path / "spunet.vmfb", tmp_path / "unet.irpa", tmp_path / "in.safetensors",
              tmp_path / "shortfin.safetensors", dtype)
    assert r.returncode == 0, r.stderr
    assert_close(tmp_path / "shortfin.safetensors", tmp_path / "ref.safetensors", TOLERANCE[dtype])
