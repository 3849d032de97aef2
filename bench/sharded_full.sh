#!/usr/bin/env bash
# Full-size SDXL UNet, tensor-parallel over 2 local CPU devices vs 1 (docs/partitioning.md's figures).
#
#   bash bench/sharded_full.sh UNET_F32.IRPA [OUT_DIR]     # default OUT_DIR artifacts/tp (git-ignored)
#   bash bench/sharded_full.sh UNET_F32.IRPA OUT_DIR --dp   # the CFG step: DP=2 vs one device
#
# Each stage runs in its own process under /usr/bin/time -v (wall time, peak RSS). The TP=1 baseline is
# compiled with the same flags as TP=2 (the `cpu` target without data tiling, which IREE 3.13 does only
# for one device), and both run with 2 threads in all: TP=2 one per device, TP=1 two on its one device.
# Needs ~11 GB of disk beside the archive and ~11 GB of RAM for a run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
irpa=${1:?usage: bench/sharded_full.sh UNET_F32.IRPA [OUT_DIR]}
out=${2:-artifacts/tp}
mkdir -p "$out"
log=$out/stages.tsv
SHAPE=(--batch 1 --height 256 --width 256 --decompose-attention)
NO_DT=--flags-extra=--iree-opt-data-tiling=false

stage() {  # stage NAME CMD...: one line "name seconds peak_rss_mib" appended to the log
  local name=$1; shift
  /usr/bin/time -v "$@" >"$out/$name.out" 2>"$out/$name.err" || { echo "stage $name failed: $out/$name.err" >&2; exit 1; }
  local s rss
  s=$(grep "Elapsed (wall clock)" "$out/$name.err" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$out/$name.err" | awk '{printf "%.0f", $NF/1024}')
  printf '%s\t%s\t%s\n' "$name" "$s" "$rss" | tee -a "$log"
}

if [[ "${3:-}" == "--dp" ]]; then  # the CFG step: DP=2 (weights replicated) vs one device, same flags
  CFG=(--cfg --batch 1 --height 256 --width 256 --decompose-attention)
  stage export_dp2 $PY -m punet.cli export "$irpa" "${CFG[@]}" --dp 2 -o "$out/dp2.mlir" --force
  stage compile_dp2 $PY -m punet.cli compile "$out/dp2.mlir" --target cpu -o "$out/dp2.cpu.vmfb" --force
  stage export_cfg1 $PY -m punet.cli export "$irpa" "${CFG[@]}" -o "$out/cfg1.mlir" --force
  stage compile_cfg1 $PY -m punet.cli compile "$out/cfg1.mlir" --target cpu "$NO_DT" -o "$out/cfg1.cpu.vmfb" --force
  stage run_cfg1 $PY -m punet.cli run "$out/cfg1.cpu.vmfb" --irpa "$irpa" --seed 0 \
    --save-inputs "$out/cfg_in.safetensors" -o "$out/cfg1.safetensors"
  stage run_dp2 $PY -m punet.cli run "$out/dp2.cpu.vmfb" --irpa "$irpa" --inputs "$out/cfg_in.safetensors" \
    -o "$out/dp2.safetensors"
  $PY -m punet.cli compare "$out/dp2.safetensors" "$out/cfg1.safetensors" --rtol 1e-4 | tee "$out/compare_dp.txt"
  stage bench_cfg1 $PY -m punet.cli bench "$out/cfg1.cpu.vmfb" --irpa "$irpa" --threads 2 --warmup 1 --repeat 3
  stage bench_dp2 $PY -m punet.cli bench "$out/dp2.cpu.vmfb" --irpa "$irpa" --threads 1 --warmup 1 --repeat 3
  exit 0
fi

: >"$log"
stage shard $PY -m punet.cli shard "$irpa" --tp 2 -o "$out/unet.tp2.irpa"
ls -l "$out"/unet.tp2*.irpa "$irpa" | tee "$out/sizes.txt"
stage export_tp2 $PY -m punet.cli export "$out/unet.tp2.irpa" "${SHAPE[@]}" -o "$out/tp2.mlir" --force
stage compile_tp2 $PY -m punet.cli compile "$out/tp2.mlir" --target cpu -o "$out/tp2.cpu.vmfb" --force
ln -sf "$(realpath "$irpa")" "$out/unet.irpa"
stage export_tp1 $PY -m punet.cli export "$out/unet.irpa" "${SHAPE[@]}" -o "$out/tp1.mlir" --force
stage compile_tp1 $PY -m punet.cli compile "$out/tp1.mlir" --target cpu "$NO_DT" -o "$out/tp1.cpu.vmfb" --force
stage run_tp1 $PY -m punet.cli run "$out/tp1.cpu.vmfb" --irpa "$out/unet.irpa" --seed 0 \
  --save-inputs "$out/in.safetensors" -o "$out/tp1.safetensors"
stage run_tp2 $PY -m punet.cli run "$out/tp2.cpu.vmfb" --irpa "$out/unet.tp2.irpa" --inputs "$out/in.safetensors" \
  -o "$out/tp2.safetensors"
$PY -m punet.cli compare "$out/tp2.safetensors" "$out/tp1.safetensors" --rtol 1e-4 | tee "$out/compare.txt"
stage bench_tp1 $PY -m punet.cli bench "$out/tp1.cpu.vmfb" --irpa "$out/unet.irpa" --threads 2 --warmup 1 --repeat 3 \
  --json "$out/bench_tp1.json"
stage bench_tp2 $PY -m punet.cli bench "$out/tp2.cpu.vmfb" --irpa "$out/unet.tp2.irpa" --threads 1 --warmup 1 \
  --repeat 3 --json "$out/bench_tp2.json"
cat "$log"
