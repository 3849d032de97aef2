#!/usr/bin/env bash
# The shortfin environment of tests/test_shortfin.py and docs/serving.md, kept apart from punet's.
#
#   tests/shortfin/setup_env.sh VENV [--apps]
#   export PUNET_SHORTFIN_PYTHON=VENV/bin/python
#   python -m pytest -m shortfin tests/test_shortfin.py
#
# shortfin 3.9.0 bundles an IREE runtime whose VM reads bytecode version 15. iree-base-compiler
# 3.10 and newer write version 16 ("bytecode version mismatch; runtime supports 15.0, module has
# 16.0"); 3.13, punet's compiler, fails earlier still ("required module features [...] are not
# available"). So modules for shortfin 3.9.0 are compiled with iree-base-compiler 3.9.0, installed
# here. The .mlir that punet's iree-turbine writes and the .irpa that `punet import` writes are
# read by both as they are.
#
# --apps also installs shortfin's app dependencies (FastAPI, uvicorn, transformers for the CLIP
# tokenizers, ...) for `python -m shortfin_apps.sd.server`; the test needs none of them.
# PYTHON picks the interpreter (default python3; shortfin 3.9.0 has wheels for CPython 3.10-3.13).
set -euo pipefail

usage="usage: $0 VENV [--apps]"
venv="${1:?$usage}"
apps=0
case "${2:-}" in
  "") ;;
  --apps) apps=1 ;;
  *) echo "$usage" >&2; exit 2 ;;
esac

SHORTFIN_VERSION=3.9.0
IREE_COMPILER_VERSION=3.9.0

"${PYTHON:-python3}" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)
if [ "$apps" = 1 ]; then
  "${pip[@]}" "shortfin[apps]==$SHORTFIN_VERSION" "iree-base-compiler==$IREE_COMPILER_VERSION" numpy
else
  "${pip[@]}" "shortfin==$SHORTFIN_VERSION" "iree-base-compiler==$IREE_COMPILER_VERSION" numpy
fi

"$venv/bin/python" - <<EOF
import importlib.metadata as md
import shortfin, shortfin.host  # noqa: F401  (the native library loads)
for name, want in (("shortfin", "$SHORTFIN_VERSION"), ("iree-base-compiler", "$IREE_COMPILER_VERSION")):
    got = md.version(name)
    assert got == want, f"{name} {got}, expected {want}"
print("shortfin", md.version("shortfin"), "+ iree-base-compiler", md.version("iree-base-compiler"))
EOF
"$venv/bin/iree-compile" --version | head -2
echo "export PUNET_SHORTFIN_PYTHON=$(cd "$venv" && pwd)/bin/python"
