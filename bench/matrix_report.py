"""Render the target matrix (tests/test_matrix.py -m matrix) as docs/targets.md.

    PUNET_MATRIX_REPORT=artifacts/matrix.jsonl python -m pytest -m matrix -n 2 tests/test_matrix.py
    python bench/matrix_report.py artifacts/matrix.jsonl [-o docs/targets.md]

Each cell: compiled (seconds, tuned or plain set, and for CPU modules the relative L2 against
torch eager fp32), refused before iree-compile (with the one-line message), or a known compiler
crash. The rules themselves live in punet/compile/targets.py; this page shows what they did.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HEADER = """# Targets: what compiles, in which dtype, with which flags

`punet export` writes one module; `punet compile --target T` takes it for every target in the
table. Per target (`punet compile --list-targets` prints the same rules):

- **dtypes**: a dtype the target cannot take is refused before iree-compile, in one line naming
  target and dtype and what would work;
- **tuned set for**: the dtypes the tuned flag set is for; any other dtype compiles with the
  plain set, said in one line and recorded in the build record (`flag_set_note`);
- **attention**: targets that want attention as matmul + fp32 softmax get the module re-exported
  that way from its `.signature.json` (no weights needed; cached as `<stem>_decomposed.mlir`),
  by slices of (batch row, head) pairs on the CPU targets and all pairs at once on the GPUs
  (`<stem>_decomposed_unsliced.mlir`; a decomposed module sliced the other way is re-exported too),
  said in one line and recorded (`attention`, `exported_from`);
- **--plain refused**: where the plain set was measured to give wrong results.

## Why compile re-exports instead of asking for `export --decompose-attention`

The options were: one module holding both attention forms (iree-compile compiles every public
function, so both would be compiled: twice the time and size); letting iree-compile decompose
(`iree-linalg-ext-decompose-attention` in the preprocessing pipeline compiles for CPU, measured
exact, but the SPIR-V backend still fails on the 77-token cross-attention it produces); or
deriving the decomposed module at compile time from what the signature records (the config and
the shapes: export builds the model on the meta device, so this needs no weights and takes
seconds at small sizes, 30 s at full size). The last one keeps "export once, compile anywhere"
with punet's own tested decomposition (fp32 softmax) and no extra flag.

"""


def rules_table() -> str:
    from punet.compile import TARGETS

    short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
    rows = ["| target | device | dtypes | tuned set for | attention (tuned / plain) | --plain | notes |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for t in TARGETS.values():
        att = f"{'decomposed' if t.decompose_attention else 'as exported'} / " \
              f"{'decomposed' if t.decompose_attention_plain else 'as exported'}"
        why = "; ".join(x for x in (t.dtype_reason, t.tuned_dtype_reason, t.attention_reason) if x)
        rows.append(f"| `{t.name}` | {t.driver} | {' '.join(short[d] for d in t.dtypes)} | "
                    f"{' '.join(short[d] for d in t.tuned_dtypes)} | {att} | "
                    f"{'refused' if t.plain_refused else 'ok'} | {why} |")
    return "\n".join(rows)


def cell(r: dict | None) -> str:
    if r is None:
        return "not run"
    if r["result"] == "compiled":
        s = f"compiled, {r['seconds']:.0f} s, {'tuned' if r['tuned'] else 'plain'}"
        if "rel_l2" in r:
            s += f", L2 {r['rel_l2']:.1e}"
        return s
    msg = re.sub(r" \(full log: [^)]*\)", "", r["message"]).replace("|", "/")
    return f"{r['result']}: {msg}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("report", help="JSON lines written by the matrix test (PUNET_MATRIX_REPORT)")
    p.add_argument("-o", "--output", default=str(ROOT / "docs" / "targets.md"))
    a = p.parse_args()
    from punet.compile import TARGETS, compiler_version
    from punet.host import describe

    results = {}
    for line in Path(a.report).read_text().splitlines():
        r = json.loads(line)
        results[r["target"], r["dtype"], r["decomposed"]] = r
    cpu = describe()
    out = [HEADER, "## The rules\n", rules_table(), "",
           "## The matrix\n",
           f"A two-level SDXL-architecture UNet (`tests/test_matrix.py`, batch 2, 128x128, 77 tokens), "
           f"{compiler_version()}, on {cpu}. Seconds are iree-compile's wall time on 2 cores while "
           "another job ran (compare rows with care); L2 is the compiled CPU module's relative L2 "
           "against torch eager fp32.\n",
           "| target | dtype | default export (fused attention) | `--decompose-attention` export |",
           "| --- | --- | --- | --- |"]
    for name in TARGETS:
        for dtype in ("float32", "float16", "bfloat16"):
            out.append(f"| `{name}` | {dtype} | {cell(results.get((name, dtype, False)))} | "
                       f"{cell(results.get((name, dtype, True)))} |")
    out.append("")
    Path(a.output).write_text("\n".join(out) + "\n")
    print(f"wrote {a.output} ({len(results)} cells)")


if __name__ == "__main__":
    main()
