"""The README's verb-by-verb example block, run as written, in order, on a small checkpoint.

Guards: README commands that no longer work (file names punet never writes, flags that were
renamed, a stage that refuses what the previous one wrote), i.e. the documented path a user
walks. Only the hub download is skipped (no network here); sizes are scaled from 512 to 64
pixels so the block runs in a couple of minutes.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

from .conftest import run_cli

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_commands() -> list[str]:
    text = README.read_text()
    block = text[text.index("## One example per verb"):]
    block = block[block.index("```bash") + len("```bash"):]
    block = block[: block.index("```")]
    lines = [ln.split("#", 1)[0].strip() for ln in block.splitlines()]
    return [ln for ln in lines if ln.startswith("punet ")]


def test_readme_block_is_what_this_test_runs():
    """The block has every verb (so this test covers the README, not a subset of it)."""
    verbs = {shlex.split(c)[1] for c in readme_commands()}
    assert verbs == {
        "import", "run", "reference", "compare", "export", "compile", "pack", "bench", "generate", "quantize", "shard",
        "demo",
    }



def test_map_of_the_code_names_every_module():
    """The README's map lists every module and subpackage of `punet/` (the brief: keep the map true).
    Catches a module added without its row (punet/host.py, punet/fileio.py were) or a row left for one
    that was removed. Reference: the package's own directory listing."""
    text = README.read_text()
    table = text[text.index("## Map of the code"):]
    table = table[: table.index("\n## ", 1)]
    rows = set(re.findall(r"^\| `(punet/[^`]*?)/?` \|", table, re.M))
    pkg = README.parent / "punet"
    modules = {f"punet/{p.name}" for p in pkg.iterdir()
               if (p.suffix == ".py" and p.name != "__init__.py") or (p / "__init__.py").exists()}
    assert rows == modules, f"missing from the map: {sorted(modules - rows)}; gone: {sorted(rows - modules)}"

def test_readme_examples_run_in_order(checkpoints, tmp_path):
    shutil.copytree(checkpoints["tiny-sdxl"], tmp_path / "my-sdxl-unet")
    ran = 0
    for command in readme_commands():
        if "stabilityai/" in command:
            continue  # the hub download: no network here
        command = command.replace("512", "64")
        args = shlex.split(command)[1:]
        if args[0] == "demo" and "--height" not in args:
            args += ["--height", "64", "--width", "64"]
        r = run_cli(*args, cwd=tmp_path)
        assert r.returncode == 0, (command, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr
        ran += 1
        for produced in re.findall(r"-> (\S+)", _comment_of(command)):
            assert (tmp_path / produced.replace("512", "64")).is_file(), (command, produced)
    assert ran == len(readme_commands()) - 1
    # The compiled CPU module agrees with diffusers (the README's compare step passed at 1e-4).
    assert (tmp_path / "unet_b1_64x64_f32.cpu.vmfb").is_file()
    assert (tmp_path / "bench.json").is_file()


def _comment_of(command: str) -> str:
    """The README comment of a command (it names the file the command writes, after '->')."""
    text = README.read_text().replace("512", "64")
    for line in text.splitlines():
        if line.split("#", 1)[0].strip() == command and "#" in line:
            return line.split("#", 1)[1]
    return ""
