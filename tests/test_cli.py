"""The CLI as a user meets it: one-line errors, exit codes, no half-written files."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from punet.signature import Signature, make_inputs
from punet.weights import import_checkpoint

from .conftest import run_cli


def _one_line_error(r, code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def irpa(tmp_path_factory, checkpoints):
    path = tmp_path_factory.mktemp("cli") / "u.irpa"
    import_checkpoint(str(checkpoints["tiny-sd15"]), path)
    return path


def test_import_run_reference_compare(checkpoints, tmp_path):
    src = checkpoints["tiny-sdxl"]
    r = run_cli("import", str(src), "-o", str(tmp_path / "u.irpa"))
    assert r.returncode == 0, r.stderr
    # The summary line counts the checkpoint's tensors; nothing on stderr is an error.
    n = len(load_file(str(src / "diffusion_pytorch_model.safetensors")))
    assert r.stdout.startswith(f"wrote {tmp_path / 'u.irpa'}: {n} tensors, "), r.stdout
    assert "error" not in r.stderr.lower(), r.stderr
    r = run_cli("run", str(tmp_path / "u.irpa"), "--height", "64", "--width", "64", "--batch", "2", "--seed", "1",
                "--save-inputs", str(tmp_path / "in.safetensors"), "-o", str(tmp_path / "out.safetensors"))
    assert r.returncode == 0, r.stderr
    r = run_cli("reference", str(src), "--inputs", str(tmp_path / "in.safetensors"), "-o", str(tmp_path / "ref.safetensors"))
    assert r.returncode == 0, r.stderr
    r = run_cli("compare", str(tmp_path / "out.safetensors"), str(tmp_path / "ref.safetensors"), "--rtol", "1e-5")
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout
    # A tolerance the result cannot meet fails with exit code 1.
    r = run_cli("compare", str(tmp_path / "out.safetensors"), str(tmp_path / "ref.safetensors"), "--rtol", "1e-12")
    assert r.returncode == 1 and "FAIL" in r.stdout


def test_bad_inputs_each_one_line(checkpoints, irpa, tmp_path):
    cases = []
    # usage errors (exit 2)
    cases.append((["import", str(checkpoints["tiny-sd15"]), "-o", str(tmp_path / "x.irpa"), "--dtype", "float8"],
                  2, ["--dtype", "float8"]))
    cases.append((["run", str(irpa)], 2, ["-o/--output"]))
    cases.append((["run", str(tmp_path / "x.onnx"), "-o", str(tmp_path / "o.safetensors")], 2, ["x.onnx", ".irpa"]))
    cases.append((["compile", "x.mlir", "--target", "gfx9000"], 2, ["gfx9000", "expected one of"]))
    # failures (exit 1)
    cases.append((["import", str(tmp_path / "absent"), "-o", str(tmp_path / "x.irpa")], 1, ["absent", "no such folder"]))
    cases.append((["run", str(tmp_path / "absent.irpa"), "-o", str(tmp_path / "o.safetensors")], 1,
                  ["absent.irpa", "file not found"]))
    notst = tmp_path / "in.safetensors"
    notst.write_text("garbage")
    cases.append((["run", str(irpa), "--inputs", str(notst), "-o", str(tmp_path / "o.safetensors")], 1,
                  ["in.safetensors", "not a readable safetensors file"]))
    for args, code, needles in cases:
        _one_line_error(run_cli(*args), code, *needles)
    assert not (tmp_path / "x.irpa").exists() and not (tmp_path / "o.safetensors").exists()


def test_inputs_that_do_not_fit_the_config(irpa, tmp_path):
    from punet.weights import load_irpa

    config, _ = load_irpa(irpa)
    x = make_inputs(config, Signature(1, 64, 64, tokens=7), 0)
    bad = dict(x, encoder_hidden_states=x["encoder_hidden_states"][..., :5].contiguous())
    save_file(bad, str(tmp_path / "bad.safetensors"))
    line = _one_line_error(
        run_cli("run", str(irpa), "--inputs", str(tmp_path / "bad.safetensors"), "-o", str(tmp_path / "o.safetensors")),
        1, "encoder_hidden_states", "expected",
    )
    assert "[1, 7, 48]" in line
    extra = dict(x, text_embeds=x["sample"].flatten(1).clone())
    save_file(extra, str(tmp_path / "extra.safetensors"))
    _one_line_error(
        run_cli("run", str(irpa), "--inputs", str(tmp_path / "extra.safetensors"), "-o", str(tmp_path / "o.safetensors")),
        1, "unexpected input 'text_embeds'",
    )
    assert not (tmp_path / "o.safetensors").exists()


def test_bad_checkpoint_via_cli(checkpoints, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoints["tiny-sd15"], folder)
    d = json.loads((folder / "config.json").read_text())
    d["class_embed_type"] = "timestep"
    (folder / "config.json").write_text(json.dumps(d))
    _one_line_error(run_cli("import", str(folder), "-o", str(tmp_path / "u.irpa")), 1,
                    "config.json", "unsupported config: class_embed_type='timestep'")
    assert not (tmp_path / "u.irpa").exists() and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_verbose_shows_traceback(tmp_path):
    r = run_cli("--verbose", "run", str(tmp_path / "absent.irpa"), "-o", str(tmp_path / "o.safetensors"))
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_every_verb_has_an_example():
    for verb in ("import", "run", "reference", "compare", "export", "compile", "bench", "demo"):
        r = run_cli(verb, "--help")
        assert r.returncode == 0 and "example:" in r.stdout and "punet " in r.stdout, verb
