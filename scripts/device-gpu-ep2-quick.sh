#!/usr/bin/env bash
# [gpu-ep] quick 2-GPU check (device kind nvidia-h200-x2) from a .devbuild packed with
# `scripts/device-run.sh pack build-cuda eep`: greedy tokens of --ep 2 over NCCL (one rank per
# GPU) against --ep 1 on the golden models and a 64-expert make-model checkpoint, then rank 1
# killed mid-generation. Results in $OUT/summary.txt, logs beside it.
set -uo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/device-run.sh env)"
export NCCL_NVLS_ENABLE=0
out=${OUT:-/tmp/eep-out}; mkdir -p "$out"; B=.devbuild/bin
$B/eep make-model --arch qwen3_moe --layers 4 --hidden 256 --experts 64 --moe-intermediate 128 --heads 4 --kv-heads 2 \
  --head-dim 64 --seed 7 --out /tmp/m64 >/dev/null 2>&1
gen() { timeout 60 $B/eep generate --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 24 --ignore-eos --json --backend cuda \
  --ep-communicator nccl "$@"; }
for m in tests/data/models/qwen3moe-tiny tests/data/models/mixtral-tiny tests/data/models/deepseekv3-tiny /tmp/m64; do
  n=$(basename $m)
  gen --model $m --ep 1 --log-level warn > "$out/$n.ep1.json" 2>>"$out/gen.err"
  gen --model $m --ep 2 --log-level warn > "$out/$n.ep2.json" 2>>"$out/gen.err"
  gen --model $m --ep 2 --inject-fault rank=1,after-steps=4,mode=kill --log-level info > "$out/$n.kill.json" 2>"$out/$n.kill.err"
  rc=$?
  cmp -s "$out/$n.ep1.json" "$out/$n.ep2.json" && r1=PASS || r1=FAIL
  [ -s "$out/$n.ep1.json" ] && cmp -s "$out/$n.ep1.json" "$out/$n.kill.json" && r2=PASS || r2="FAIL(rc=$rc)"
  echo "$n: ep2 nccl = ep1: $r1; rank 1 killed after 4 steps = ep1: $r2" | tee -a "$out/summary.txt"
  grep -h "failover →" "$out/$n.kill.err" | cut -c1-260 | tee -a "$out/summary.txt"
done
