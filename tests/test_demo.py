"""`punet demo`, the README's main job, on the built-in model: run in-process as the CLI runs it."""

from __future__ import annotations

import pytest

from punet.cli import main

# 64x64 pixels (an 8x8 latent): the built-in tiny SDXL's three levels at the lowest cost.
ARGS = ["--height", "64", "--width", "64", "--repeat", "1", "--threads", "2"]
CHECKS = ("IREE float32 vs torch eager fp32", "torch eager fp32 vs diffusers fp32", "IREE float32 vs diffusers fp32")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


def _demo(demo_dir, capsys, monkeypatch) -> tuple[int, str, str]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(demo_dir / "cache"))  # where builtin:tiny-sdxl is written
    monkeypatch.setenv("COLUMNS", "250")  # rich tables: one row per line, no wrapping
    code = main(["demo", "--out-dir", str(demo_dir / "out"), *ARGS])
    out, err = capsys.readouterr()
    return code, out, err


def _table_rows(out: str, first: tuple[str, ...]) -> dict[str, list[str]]:
    """Rows of a rich table in `out` whose first cell is one of `first`: name -> the other cells."""
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.replace("|", "│").split("│")]
        cells = [c for c in cells if c]
        if cells and cells[0] in first:
            rows[cells[0]] = cells[1:]
    return rows


def test_demo_passes(demo_dir, capsys, monkeypatch):
    """Every stage runs and each numerical check is within its tolerance: exit code 0."""
    code, out, err = _demo(demo_dir, capsys, monkeypatch)
    assert code == 0, err[-2000:]
    stages = _table_rows(out, ("import", "export", "compile", "run (IREE)", "compare", "bench"))
    assert list(stages) == ["import", "export", "compile", "run (IREE)", "compare", "bench"], out
    checks = _table_rows(out, CHECKS)
    assert list(checks) == list(CHECKS), out
    for name, (max_abs, max_ref, rel, tol, result) in checks.items():
        assert result == "ok" and float(rel) <= float(tol) == 1e-4, (name, checks[name])
        assert 0 < float(max_ref) and float(max_abs) < 1e-3 * float(max_ref), (name, checks[name])
    assert "IREE / torch eager speed" in out


def test_demo_fails_when_a_check_fails(demo_dir, capsys, monkeypatch):
    """The compiled output 1% off (relative L2 0.01 > 1e-4): FAIL rows and a non-zero exit code.

    Guards against `DemoResult.ok` always true (a failed comparison exiting 0).
    """
    from punet.runtime import Session

    to_torch = Session.to_torch
    monkeypatch.setattr(Session, "to_torch", lambda self, result: to_torch(self, result) * 1.01)
    code, out, err = _demo(demo_dir, capsys, monkeypatch)
    assert code == 1, out
    assert "punet demo: error: a numerical check failed" in err
    checks = _table_rows(out, CHECKS)
    assert list(checks) == list(CHECKS), out
    for name, (_, _, rel, _, result) in checks.items():
        if name.startswith("IREE"):
            assert result == "FAIL" and float(rel) == pytest.approx(1e-2, rel=0.05), (name, checks[name])
        else:  # the torch eager vs diffusers check does not involve the compiled module
            assert result == "ok", (name, checks[name])
