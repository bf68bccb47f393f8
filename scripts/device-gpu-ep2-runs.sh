#!/usr/bin/env bash
# [gpu-ep] runs that need two GPUs (device kind nvidia-h200-x2), from a .devbuild packed here with
# `scripts/device-run.sh pack build-cuda eep`: --ep 2 over NCCL (one rank per GPU) against
# --ep 1 on the golden models and a 64-expert make-model checkpoint, and a rank killed
# mid-generation. Logs go to $OUT (or /tmp/eep-out).
set -uo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/device-run.sh env)"
export NCCL_NVLS_ENABLE=0
out=${OUT:-/tmp/eep-out}
mkdir -p "$out"
B=.devbuild/bin
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
gen() {  # model, extra flags...
  local m=$1; shift
  timeout 120 $B/eep generate --model "$m" --prompt-ids 1,2,3,4,5,6,7,8 --max-new-tokens 24 --ignore-eos --json \
    --backend cuda --log-level warn "$@" 2>>"$out/gen.err" | tail -1
}
check() {  # label, model, flags for the compared run
  local label=$1 m=$2; shift 2
  local ref got
  ref=$(gen "$m" --ep 1 --ep-communicator nccl)
  got=$(gen "$m" "$@")
  if [ -n "$ref" ] && [ "$ref" = "$got" ]; then echo "PASS $label"; else echo "FAIL $label: ref=$ref got=$got"; fi
}
$B/eep make-model --arch qwen3_moe --layers 4 --hidden 256 --experts 64 --moe-intermediate 128 --heads 4 --kv-heads 2 \
  --head-dim 64 --seed 7 --out /tmp/m64 >/dev/null 2>&1
for m in tests/data/models/qwen3moe-tiny tests/data/models/mixtral-tiny tests/data/models/deepseekv3-tiny /tmp/m64; do
  n=$(basename $m)
  check "$n ep2 nccl = ep1" $m --ep 2 --ep-communicator nccl
  check "$n ep2 nccl + 4 redundant = ep1" $m --ep 2 --ep-communicator nccl --num-redundant-experts 4
  check "$n ep2 nccl, rank 1 killed after 4 steps = ep1" $m --ep 2 --ep-communicator nccl \
    --inject-fault rank=1,after-steps=4,mode=kill
  # logits of the prompt, byte for byte
  timeout 120 $B/eep logits --model $m --prompt-ids 1,2,3,4,5,6,7,8 --backend cuda --ep 1 --ep-communicator nccl \
    --out "$out/$n.ep1.safetensors" --log-level warn 2>>"$out/gen.err"
  timeout 120 $B/eep logits --model $m --prompt-ids 1,2,3,4,5,6,7,8 --backend cuda --ep 2 --ep-communicator nccl \
    --out "$out/$n.ep2.safetensors" --log-level warn 2>>"$out/gen.err"
  if cmp -s "$out/$n.ep1.safetensors" "$out/$n.ep2.safetensors"; then echo "PASS $n logits ep2 == ep1 (bytes)";
  else echo "DIFF $n logits ep2 vs ep1 (see files)"; fi
done
grep -E "failover|error" "$out/gen.err" | cut -c1-300 | head -20
echo "== wall time, 64 tokens on /tmp/m64 (start and load included)"
for ep in 1 2; do
  /usr/bin/time -f "ep=$ep %e s" timeout 120 $B/eep generate --model /tmp/m64 --prompt-ids 1,2,3 --max-new-tokens 64 \
    --ignore-eos --json --backend cuda --ep $ep --ep-communicator nccl --log-level warn >/dev/null 2>>"$out/timing.log"
  tail -1 "$out/timing.log"
done
