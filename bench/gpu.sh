#!/usr/bin/env bash
# GPU benchmark of the SDXL UNet CFG step (1024x1024, 2 UNet rows, fp16): IREE CUDA + Vulkan vs torch.
#
#   bash bench/gpu.sh --prepare artifacts/gpu   # on a CPU machine with the compiler: export + compile (~5 min)
#                                               # -> artifacts/gpu/vmfb/: the .vmfb files and build records
#   bash bench/gpu.sh artifacts/gpu/vmfb [--torch-compile]
#                                               # on the NVIDIA machine: weights, then the benchmark (<8 min)
#
# The .vmfb files hold no weights (about 2 MiB each), so they travel; the weights are generated where
# they run (punet's deterministic random weights, the real SDXL base config).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONFIG=tests/data/configs/sdxl-base-1.0-unet.json
SHAPE=(--cfg --batch 1 --height 1024 --width 1024)

if [[ "${1:-}" == "--prepare" ]]; then
  out=${2:?usage: bench/gpu.sh --prepare DIR}
  mkdir -p "$out/vmfb"
  [[ -f "$out/checkpoint/config.json" ]] || $PY bench/make_checkpoint.py "$CONFIG" "$out/checkpoint" --dtype float16
  $PY -m punet.cli import "$out/checkpoint" -o "$out/unet_f16.irpa"
  $PY -m punet.cli export "$out/unet_f16.irpa" "${SHAPE[@]}"
  $PY -m punet.cli export "$out/unet_f16.irpa" "${SHAPE[@]}" --decompose-attention
  fused=$out/unet_b1_1024x1024_f16_cfg.mlir
  decomposed=$out/unet_b1_1024x1024_f16_cfg_decomposed.mlir
  $PY -m punet.cli compile "$fused" --target sm_80 -o "$out/vmfb/$(basename "$fused" .mlir).sm_80.vmfb"
  $PY -m punet.cli compile "$fused" --target sm_80 --plain -o "$out/vmfb/$(basename "$fused" .mlir).sm_80-plain.vmfb"
  $PY -m punet.cli compile "$decomposed" --target sm_80 -o "$out/vmfb/$(basename "$decomposed" .mlir).sm_80.vmfb"
  $PY -m punet.cli compile "$decomposed" --target vulkan-ampere \
    -o "$out/vmfb/$(basename "$decomposed" .mlir).vulkan-ampere.vmfb"
  ls -la "$out"/vmfb/*.vmfb
  exit 0
fi

dir=${1:?usage: bench/gpu.sh DIR (with the prepared .vmfb files) [--torch-compile]}
shift
ls "$dir"/*.vmfb >/dev/null 2>&1 || { echo "bench/gpu.sh: error: no .vmfb in $dir (run --prepare first)" >&2; exit 1; }
$PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || { echo "bench/gpu.sh: error: no CUDA GPU visible to torch; run this on an NVIDIA machine" >&2; exit 1; }
work=${WORK:-/tmp/punet-gpu}
mkdir -p "$work"
[[ -f "$work/checkpoint/config.json" ]] || $PY bench/make_checkpoint.py "$CONFIG" "$work/checkpoint" --dtype float16
[[ -f "$work/unet_f16.irpa" ]] || $PY -m punet.cli import "$work/checkpoint" -o "$work/unet_f16.irpa"
$PY bench/gpu.py "$dir" --irpa "$work/unet_f16.irpa" --json "${GPU_JSON:-$work/gpu.json}" "$@"
