#!/usr/bin/env bash
# Full-size SDXL UNet on 2 local CPU devices vs 1 (docs/partitioning.md's figures).
#
#   bash bench/sharded_full.sh UNET_F32.IRPA [OUT_DIR]        # TP=2 vs TP=1 (default OUT_DIR artifacts/tp, git-ignored)
#   bash bench/sharded_full.sh UNET_F32.IRPA OUT_DIR --dp     # the CFG step: DP=2 vs one device
#
# Each stage runs in its own process under /usr/bin/time -v (wall time, peak RSS) and adds a line to
# OUT_DIR/stages.tsv. Both modules of a pair are compiled with the same flags (the `cpu` target without
# data tiling, which IREE 3.13 does only for one device), and both run with 2 threads in all: one per
# device on two devices, two on one. Needs ~11 GB of disk beside the archive and ~15 GB of RAM for a run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
irpa=${1:?usage: bench/sharded_full.sh UNET_F32.IRPA [OUT_DIR] [--dp]}
out=${2:-artifacts/tp}
mkdir -p "$out"
log=$out/stages.tsv
SHAPE=(--batch 1 --height 256 --width 256 --decompose-attention)

stage() {  # stage NAME CMD...: one line "name wall-time peak-rss-MiB" appended to the log
  local name=$1; shift
  /usr/bin/time -v "$@" >"$out/$name.out" 2>"$out/$name.err" || { echo "stage $name failed: $out/$name.err" >&2; exit 1; }
  local s rss
  s=$(grep "Elapsed (wall clock)" "$out/$name.err" | awk '{print $NF}')
  rss=$(grep "Maximum resident set size" "$out/$name.err" | awk '{printf "%.0f", $NF/1024}')
  printf '%s\t%s\t%s\n' "$name" "$s" "$rss" | tee -a "$log"
}

build() {  # build NAME ARCHIVE EXPORT-FLAGS...: export and compile OUT_DIR/NAME.cpu.vmfb
  local name=$1 archive=$2; shift 2
  stage "export_$name" $PY -m punet.cli export "$archive" "$@" -o "$out/$name.mlir" --force
  stage "compile_$name" $PY -m punet.cli compile "$out/$name.mlir" --target cpu \
    --flags-extra=--iree-opt-data-tiling=false -o "$out/$name.cpu.vmfb" --force
}

measure() {  # measure ONE ONE_ARCHIVE TWO TWO_ARCHIVE: both on the same inputs, compared, then timed
  stage "run_$1" $PY -m punet.cli run "$out/$1.cpu.vmfb" --irpa "$2" --seed 0 --save-inputs "$out/$1.in.safetensors" \
    -o "$out/$1.safetensors"
  stage "run_$3" $PY -m punet.cli run "$out/$3.cpu.vmfb" --irpa "$4" --inputs "$out/$1.in.safetensors" \
    -o "$out/$3.safetensors"
  $PY -m punet.cli compare "$out/$3.safetensors" "$out/$1.safetensors" --rtol 1e-4 | tee "$out/compare_$3.txt"
  stage "bench_$1" $PY -m punet.cli bench "$out/$1.cpu.vmfb" --irpa "$2" --threads 2 --warmup 1 --repeat 3 \
    --json "$out/bench_$1.json"
  stage "bench_$3" $PY -m punet.cli bench "$out/$3.cpu.vmfb" --irpa "$4" --threads 1 --warmup 1 --repeat 3 \
    --json "$out/bench_$3.json"
}

if [[ "${3:-}" == "--dp" ]]; then
  build dp2 "$irpa" "${SHAPE[@]}" --cfg --dp 2
  build cfg1 "$irpa" "${SHAPE[@]}" --cfg
  measure cfg1 "$irpa" dp2 "$irpa"
  exit 0
fi

: >"$log"
stage shard $PY -m punet.cli shard "$irpa" --tp 2 -o "$out/unet.tp2.irpa"
ls -l "$out"/unet.tp2*.irpa "$irpa" | tee "$out/sizes.txt"
build tp2 "$out/unet.tp2.irpa" "${SHAPE[@]}"
build tp1 "$irpa" "${SHAPE[@]}"
measure tp1 "$irpa" tp2 "$out/unet.tp2.irpa"
cat "$log"
