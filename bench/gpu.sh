#!/usr/bin/env bash
# GPU benchmark of the SDXL UNet CFG step (1024x1024, 2 UNet rows, fp16): IREE CUDA + Vulkan vs torch eager.
#
#   bash bench/gpu.sh --prepare artifacts/gpu   # on a CPU machine with the compiler: export + compile (~10 min)
#   bash bench/gpu.sh artifacts/gpu             # on the NVIDIA machine: weights, then the benchmark (<10 min)
#
# The .vmfb files hold no weights, so they travel; the weights are generated where they run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONFIG=tests/data/configs/sdxl-base-1.0-unet.json

if [[ "${1:-}" == "--prepare" ]]; then
  out=${2:?usage: bench/gpu.sh --prepare DIR}
  mkdir -p "$out"
  [[ -f "$out/checkpoint/config.json" ]] || $PY bench/make_checkpoint.py "$CONFIG" "$out/checkpoint" --dtype float16
  $PY -m punet.cli import "$out/checkpoint" -o "$out/unet_f16.irpa"
  $PY -m punet.cli export "$out/unet_f16.irpa" --cfg --batch 1 --height 1024 --width 1024
  $PY -m punet.cli export "$out/unet_f16.irpa" --cfg --batch 1 --height 1024 --width 1024 --decompose-attention
  $PY -m punet.cli compile "$out/unet_b1_1024x1024_f16_cfg.mlir" --target sm_80
  $PY -m punet.cli compile "$out/unet_b1_1024x1024_f16_cfg_decomposed.mlir" --target vulkan-ampere
  ls -la "$out"/*.vmfb
  exit 0
fi

dir=${1:?usage: bench/gpu.sh DIR (with the prepared .vmfb files)}
ls "$dir"/*.vmfb >/dev/null 2>&1 || { echo "bench/gpu.sh: error: no .vmfb in $dir (run --prepare first)" >&2; exit 1; }
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "bench/gpu.sh: error: no CUDA GPU visible to torch; run this on an NVIDIA machine" >&2; exit 1; }
work=${WORK:-/tmp/punet-gpu}
mkdir -p "$work"
[[ -f "$work/checkpoint/config.json" ]] || $PY bench/make_checkpoint.py "$CONFIG" "$work/checkpoint" --dtype float16
[[ -f "$work/unet_f16.irpa" ]] || $PY -m punet.cli import "$work/checkpoint" -o "$work/unet_f16.irpa"
$PY bench/gpu.py "$dir" --irpa "$work/unet_f16.irpa" --json "$work/gpu.json"
