#!/usr/bin/env bash
# GPU runs of issue 10 that one GPU can hold, on the device machine, from a .devbuild packed
# here with `scripts/device-run.sh pack build-cuda eep cuda_ep_gpu cuda_nccl_gpu cuda_golden_gpu
# cuda_restore_gpu`: EP ranks sharing one GPU (tests + decode timings) and the nccl
# communicator at world size 1. Logs go to $OUT (or /tmp/eep-out).
set -uo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/device-run.sh env)"
out=${OUT:-/tmp/eep-out}
mkdir -p "$out"
ulimit -l unlimited 2>/dev/null || true
B=.devbuild/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
for t in cuda_nccl_gpu cuda_ep_gpu cuda_golden_gpu cuda_restore_gpu; do
  [ -x $B/$t ] || continue
  case $t in cuda_ep_gpu) limit=300 ;; *) limit=100 ;; esac
  timeout $limit $B/$t 2>&1 | tee "$out/$t.log" | grep -E '^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|vs --ep|vs in-process' | head -40
done
m=tests/data/models/qwen3moe-tiny
echo "== nccl end to end (world 1)"
timeout 60 $B/eep generate --model $m --prompt-ids 1,2,3 --max-new-tokens 8 --ignore-eos --json --backend cuda --ep 1 \
  --ep-communicator nccl --log-level warn 2>&1 | tee "$out/nccl_e2e.log" | tail -3
timeout 60 $B/eep generate --model $m --prompt-ids 1,2,3 --max-new-tokens 8 --ignore-eos --json --backend cuda --ep 1 \
  --log-level warn 2>&1 | tail -1
echo "== decode wall time, 64 tokens, qwen3moe-tiny (process start and load included)"
for ep in 0 1 2 4; do
  flags="--ep $ep"; [ $ep = 0 ] && flags=""
  /usr/bin/time -f "ep=$ep %e s" timeout 120 $B/eep generate --model $m --prompt-ids 1,2,3 --max-new-tokens 64 \
    --ignore-eos --json --backend cuda $flags --log-level warn >/dev/null 2>>"$out/timing.log"
  tail -1 "$out/timing.log"
done
