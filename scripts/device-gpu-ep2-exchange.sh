#!/usr/bin/env bash
# [gpu-ep] what is left to run on two GPUs (device kind nvidia-h200-x2), from a .devbuild packed
# here with `scripts/device-run.sh pack build-cuda eep`; one rank per GPU over NCCL:
#   1. EPLB weight exchange GPU to GPU (ExchangeDevice: expert slots -> the peer's device staging)
#      against raw NCCL send/recv between device buffers in the same run (goal >= 80%), sync and
#      async (stall);
#   2. a killed rank with the communicator shrunk (EEP_NCCL_SHRINK=1, ncclCommShrink) instead of
#      aborted and re-created: greedy tokens equal to --ep 1, and the failover phases of both;
#   3. eep bench failover --backend cuda over NCCL, both ways.
# Results in $OUT (or /tmp/eep-out)/summary.txt, logs beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/device-run.sh env)"
export NCCL_NVLS_ENABLE=0
out=${OUT:-/tmp/eep-out}; mkdir -p "$out"; B=.devbuild/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/summary.txt"
$B/eep make-model --arch qwen3_moe --layers 4 --hidden 2048 --experts 64 --moe-intermediate 768 --experts-per-tok 8 \
  --heads 16 --kv-heads 4 --head-dim 128 --vocab 4096 --seed 5 --out /tmp/xm >/dev/null 2>&1
$B/eep make-model --arch qwen3_moe --layers 2 --hidden 512 --experts 384 --moe-intermediate 512 --experts-per-tok 4 \
  --seed 1 --out /tmp/fm >/dev/null 2>&1
echo "== 1. bench exchange --backend cuda --ep-communicator nccl --ep 2" | tee -a "$out/summary.txt"
timeout 240 $B/eep bench exchange --model /tmp/xm --backend cuda --ep-communicator nccl --ep 2 --repeats 3 \
  --rank-log-level debug 2>"$out/exchange.err" | tee -a "$out/summary.txt"
grep -hE "exchange phases|rebalance switch" "$out/exchange.err" | cut -c1-260 | head -8 | tee -a "$out/summary.txt"
echo "== 2. rank 1 killed: abort + new communicator vs shrink" | tee -a "$out/summary.txt"
gen() { timeout 90 $B/eep generate --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 24 --ignore-eos --json --backend cuda \
  --ep-communicator nccl "$@"; }
for m in tests/data/models/qwen3moe-tiny /tmp/xm; do
  n=$(basename $m)
  gen --model $m --ep 1 --log-level warn > "$out/$n.ep1.json" 2>>"$out/gen.err"
  for shrink in 0 1; do
    EEP_NCCL_SHRINK=$shrink gen --model $m --ep 2 --inject-fault rank=1,after-steps=4,mode=kill --log-level info \
      > "$out/$n.kill$shrink.json" 2>"$out/$n.kill$shrink.err"
    rc=$?
    [ -s "$out/$n.ep1.json" ] && cmp -s "$out/$n.ep1.json" "$out/$n.kill$shrink.json" && r=PASS || r="FAIL(rc=$rc)"
    echo "$n EEP_NCCL_SHRINK=$shrink: killed rank 1 = ep1: $r" | tee -a "$out/summary.txt"
    grep -hE "failover →|shrunk|error" "$out/$n.kill$shrink.err" | cut -c1-260 | head -4 | tee -a "$out/summary.txt"
  done
done
echo "== 3. bench failover --backend cuda --communicator nccl --ep 2" | tee -a "$out/summary.txt"
for shrink in 0 1; do
  EEP_NCCL_SHRINK=$shrink timeout 240 $B/eep bench failover --model /tmp/fm --backend cuda --communicator nccl --ep 2 \
    --kill-rank 1 --backup on --repeat 2 2>"$out/failover$shrink.err" | sed "s/^/[shrink=$shrink] /" | tee -a "$out/summary.txt"
done
