#!/usr/bin/env bash
# GPU benchmark of the SDXL UNet CFG step (1024x1024, 2 UNet rows, fp16): IREE CUDA + Vulkan vs torch.
#
#   bash bench/gpu.sh --prepare artifacts/gpu   # on a CPU machine with the compiler: export + compile (~3 min)
#                                               # -> artifacts/gpu/vmfb/: the .vmfb files and build records
#   bash bench/gpu.sh artifacts/gpu/vmfb [--torch-compile]
#                                               # on the NVIDIA machine: weights, then the benchmark (<8 min)
#   bash bench/gpu.sh --prepare-parallel artifacts/gpu   # TP=2 and DP=2 CFG steps for two GPUs (sm_80, gfx942)
#   bash bench/gpu.sh --parallel artifacts/gpu/vmfb-parallel   # on a 2-GPU machine: vs torch, and timed
#
# The .vmfb files hold no weights (about 2 MiB each), so they travel; the weights are generated where
# they run (punet's deterministic random weights, the real SDXL base config).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CONFIG=tests/data/configs/sdxl-base-1.0-unet.json
SHAPE=(--cfg --batch 1 --height 1024 --width 1024)

if [[ "${1:-}" == "--prepare-parallel" ]]; then
  # TP=2 (sharded archive) and DP=2 CFG steps for two GPUs (docs/partitioning.md): -> DIR/vmfb-parallel/
  out=${2:?usage: bench/gpu.sh --prepare-parallel DIR}
  mkdir -p "$out/vmfb-parallel"
  [[ -f "$out/checkpoint/config.json" ]] || $PY bench/make_checkpoint.py "$CONFIG" "$out/checkpoint" --dtype float16
  [[ -f "$out/unet_f16.irpa" ]] || $PY -m punet.cli import "$out/checkpoint" -o "$out/unet_f16.irpa"
  [[ -f "$out/unet_f16.tp2.irpa" ]] || $PY -m punet.cli shard "$out/unet_f16.irpa" --tp 2
  $PY -m punet.cli export "$out/unet_f16.tp2.irpa" "${SHAPE[@]}"
  $PY -m punet.cli export "$out/unet_f16.irpa" "${SHAPE[@]}" --dp 2
  for m in unet_b1_1024x1024_f16_cfg_tp2 unet_b1_1024x1024_f16_cfg_dp2; do
    for target in sm_80 gfx942; do
      $PY -m punet.cli compile "$out/$m.mlir" --target $target -o "$out/vmfb-parallel/$m.$target.vmfb"
    done
  done
  ls -la "$out"/vmfb-parallel/*.vmfb
  exit 0
fi

if [[ "${1:-}" == "--parallel" ]]; then
  # On a machine with two GPUs of one kind: each TP=2 / DP=2 module vs torch eager on one GPU, and its time.
  dir=${2:?usage: bench/gpu.sh --parallel DIR/vmfb-parallel}
  work=${WORK:-/tmp/punet-gpu}
  mkdir -p "$work"
  [[ -f "$work/checkpoint/config.json" ]] || $PY bench/make_checkpoint.py "$CONFIG" "$work/checkpoint" --dtype float16
  [[ -f "$work/unet_f16.irpa" ]] || $PY -m punet.cli import "$work/checkpoint" -o "$work/unet_f16.irpa"
  [[ -f "$work/unet_f16.tp2.irpa" ]] || $PY -m punet.cli shard "$work/unet_f16.irpa" --tp 2
  $PY -m punet.cli run "$work/unet_f16.irpa" "${SHAPE[@]}" --device cuda --seed 0 \
    --save-inputs "$work/in.safetensors" -o "$work/torch.safetensors"
  for vmfb in "$dir"/*.vmfb; do
    read -r driver tp < <($PY -c "import json,sys; i=json.load(open(sys.argv[1]+'.json')); \
print(i['driver'], i['signature'].get('tp', 1))" "$vmfb")
    archive=$work/unet_f16.irpa; [[ $tp == 1 ]] || archive=$work/unet_f16.tp$tp.irpa
    $PY -c "import iree.runtime as rt, sys; rt.get_driver(sys.argv[1])" "$driver" 2>/dev/null || continue
    echo "== $(basename "$vmfb") on 2 x $driver"
    $PY -m punet.cli run "$vmfb" --irpa "$archive" --device "$driver" --inputs "$work/in.safetensors" \
      -o "$work/$(basename "$vmfb").safetensors"
    $PY -m punet.cli compare "$work/$(basename "$vmfb").safetensors" "$work/torch.safetensors" --rtol 1e-2 || true
    $PY -m punet.cli bench "$vmfb" --irpa "$archive" --device "$driver" --repeat 10
  done
  exit 0
fi

if [[ "${1:-}" == "--prepare" ]]; then
  out=${2:?usage: bench/gpu.sh --prepare DIR}
  mkdir -p "$out/vmfb"
  [[ -f "$out/checkpoint/config.json" ]] || $PY bench/make_checkpoint.py "$CONFIG" "$out/checkpoint" --dtype float16
  [[ -f "$out/unet_f16.irpa" ]] || $PY -m punet.cli import "$out/checkpoint" -o "$out/unet_f16.irpa"
  $PY -m punet.cli export "$out/unet_f16.irpa" "${SHAPE[@]}"
  fused=$out/unet_b1_1024x1024_f16_cfg.mlir
  # CUDA and Vulkan compile attention decomposed (derived from the signature: punet/compile/targets.py);
  # CUDA's plain set is refused (measured wrong), so the tuned sm_80 build is the one CUDA row.
  $PY -m punet.cli compile "$fused" --target sm_80 -o "$out/vmfb/$(basename "$fused" .mlir).sm_80.vmfb"
  $PY -m punet.cli compile "$fused" --target vulkan-ampere -o "$out/vmfb/$(basename "$fused" .mlir).vulkan-ampere.vmfb"
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
