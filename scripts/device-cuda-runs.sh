#!/usr/bin/env bash
# GPU runs of issue 9 (restore into GPU slots, decode vs roofline) on the device machine, from a
# .devbuild packed here with `scripts/device-run.sh pack build-cuda eep cuda_restore_gpu
# cuda_golden_gpu cuda_ops_gpu`. Logs go to $OUT (or /tmp/eep-out); the last lines summarise.
#   scripts/device-cuda-runs.sh [tests] [restore] [decode]   (default: all three)
set -uo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/device-run.sh env)"
out=${OUT:-/tmp/eep-out}
mkdir -p "$out"
# Tests find the eep binary at the build path compiled into them.
src=$(cat .devbuild/srcdir)
mkdir -p "$src/build-cuda/bin" && ln -sf "$PWD/.devbuild/bin/eep" "$src/build-cuda/bin/eep"
ulimit -l unlimited 2>/dev/null || true
steps=${*:-tests restore decode}
B=.devbuild/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
for s in $steps; do
  case $s in
    tests)
      for t in cuda_restore_gpu cuda_golden_gpu cuda_ops_gpu; do
        timeout 300 $B/$t 2>&1 | tee "$out/$t.log" | grep -E '^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure' | head -20
      done
      ;;
    restore)
      timeout 400 $B/eep bench restore --backend cuda --size-gib 4 --num-nodes 2 --repeat 5 2>&1 |
        tee "$out/bench_restore_cuda.log" | grep -v '^\s*$' | tail -14
      ;;
    decode)
      m=/tmp/qwen3-30b-shaped
      /usr/bin/time -f 'make-model %e s' timeout 300 $B/eep make-model --arch qwen3_moe --layers 8 --hidden 2048 \
        --experts 128 --experts-per-tok 8 --moe-intermediate 768 --intermediate 6144 --heads 32 --kv-heads 4 \
        --head-dim 128 --vocab 151936 --seed 1 --out $m 2>&1 | tail -2
      du -sh $m
      timeout 400 $B/eep bench decode --model $m --skip-cpu --mode both --tokens 32 --json 2>&1 |
        tee "$out/bench_decode.log" | grep -v '^{' | tail -14
      ;;
  esac
done
