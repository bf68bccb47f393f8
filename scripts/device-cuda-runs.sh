#!/usr/bin/env bash
# GPU runs of issue 9 (restore into GPU slots; decode vs roofline: device-side MoE and CUDA
# graphs) on the device machine, from a .devbuild packed here with
#   scripts/device-run.sh pack build-cuda eep cuda_ops_gpu cuda_golden_gpu cuda_restore_gpu cuda_ep_gpu
# and the device tool called with carry [".devbuild"]. Logs go to $OUT (or /tmp/eep-out); the
# last lines of each step summarise.
#   scripts/device-cuda-runs.sh [tests] [restore] [decode] [variants] [auto]
#     tests     the GPU test binaries (ops, golden, restore, ep)
#     restore   eep bench restore --backend cuda
#     decode    make-model of the Qwen3-30B-A3B-shaped checkpoint + eep bench decode (defaults)
#     variants  bench decode without programmatic dependent launch, without graphs, and with
#               the fused MoE up to 256 tokens (split activations)
#     auto      eep generate/logits with the default --backend auto on qwen3moe-tiny
#     ab        bench decode at batch 1 and 16: default vs each entry of EEP_AB_VARIANTS (twice)
#     profile   ncu kernel durations of bench decode steps (no graphs) at batch 1 and 16 into
#               $OUT/ncu_b*.csv (scripts/ncu_steps.py summarises one step)
#     detail    ncu sections (speed of light, launch, occupancy, warp states) of the router,
#               attention and GEMV kernels of one batch-1 decode step into $OUT/ncu_detail.txt
#     sass      per-instruction stall samples of one router, attention and GEMV launch ($OUT/sass_*.csv)
#   (default: tests decode variants auto)
# (`scripts/device-run.sh pack` compresses the binaries when they outgrow the device tool's 64 MiB;
# `env` unpacks them.)
set -uo pipefail
cd "$(dirname "$0")/.."
eval "$(scripts/device-run.sh env)"
out=${OUT:-/tmp/eep-out}
mkdir -p "$out"
src=$(cat .devbuild/srcdir)  # the source path compiled into the binaries (test data)
ulimit -l unlimited 2>/dev/null || true
steps=${*:-tests decode variants auto}
B=.devbuild/bin
m=/tmp/qwen3-30b-shaped
make_model() {
  [ -f $m/config.json ] && return
  /usr/bin/time -f 'make-model %e s' timeout 300 $B/eep make-model --arch qwen3_moe --layers 8 --hidden 2048 \
    --experts 128 --experts-per-tok 8 --moe-intermediate 768 --intermediate 6144 --heads 32 --kv-heads 4 \
    --head-dim 128 --vocab 151936 --seed 1 --out $m 2>&1 | tail -2
  du -sh $m
}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/device.txt"
for s in $steps; do
  case $s in
    tests)
      for t in cuda_ops_gpu cuda_golden_gpu cuda_restore_gpu cuda_ep_gpu cuda_moe_mma_gpu cuda_compute_gpu; do
        [ -x $B/$t ] || continue
        echo "== $t"
        timeout 300 $B/$t 2>&1 | tee "$out/$t.log" |
          grep -E '^\[  (PASSED|FAILED|SKIPPED) |FAILED|Failure|fused MoE|rel err' | grep -v 'hidden' | head -40
      done
      ;;
    restore)
      timeout 400 $B/eep bench restore --backend cuda --size-gib 4 --num-nodes 2 --repeat 5 2>&1 |
        tee "$out/bench_restore_cuda.log" | grep -v '^\s*$' | tail -14
      ;;
    decode)
      make_model
      timeout 400 $B/eep bench decode --model $m --skip-cpu --mode both --tokens 32 --json 2>&1 |
        tee "$out/bench_decode.log" | grep -v '^{' | tail -14
      ;;
    variants)
      make_model
      echo "== no programmatic dependent launch (EEP_CUDA_PDL=0)"
      EEP_CUDA_PDL=0 timeout 300 $B/eep bench decode --model $m --skip-cpu --mode split --tokens 32 --json 2>&1 |
        tee "$out/bench_decode_nopdl.log" | grep -E '^cuda batch'
      echo "== no graphs"
      timeout 300 $B/eep bench decode --model $m --skip-cpu --mode split --tokens 32 --no-graphs --json 2>&1 |
        tee "$out/bench_decode_nographs.log" | grep -E '^cuda batch'
      echo "== fused MoE up to 256 tokens"
      timeout 300 $B/eep bench decode --model $m --skip-cpu --mode split --tokens 32 --fused-moe-max-tokens 256 \
        --batch 256 --json 2>&1 | tee "$out/bench_decode_fused256.log" | grep -E '^cuda batch'
      ;;
    auto)
      tm=$src/tests/data/models/qwen3moe-tiny
      timeout 60 $B/eep generate --model $tm --prompt-ids 1,2,3 --max-new-tokens 8 --ignore-eos --json 2>&1 |
        tee "$out/generate_auto.log" | tail -3
      timeout 60 $B/eep generate --model $tm --prompt-ids 1,2,3 --max-new-tokens 8 --ignore-eos --json \
        --backend cpu 2>&1 | tail -1
      ;;
    ab)
      # A/B of decode switches, interleaved twice at batch 1 and 16 (split mode): the default,
      # then each space-separated entry of EEP_AB_VARIANTS (';' between the variables of one
      # entry), e.g. EEP_AB_VARIANTS="EEP_CUDA_PDL=0 EEP_CUDA_GRAPHS=0".
      make_model
      for rep in 1 2; do
        for v in EEP_AB=default ${EEP_AB_VARIANTS:-}; do
          echo "== $v (round $rep)"
          env ${v//;/ } timeout 200 $B/eep bench decode --model $m --skip-cpu --mode split --tokens 64 --batch 1 16 \
            --json 2>&1 | tee -a "$out/bench_ab.log" | grep -E '^cuda batch' | sed 's/weights.step.*-> //'
        done
      done
      ;;
    profile)
      make_model
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      for b in 1 16; do
        timeout 240 $ncu --metrics gpu__time_duration.sum --csv --print-units base --clock-control none \
          --cache-control none $B/eep bench decode --model $m --skip-cpu --mode split --tokens 1 --prompt-len 2 \
          --batch $b --no-graphs > "$out/ncu_b$b.csv" 2> "$out/ncu_b$b.err"
        echo "ncu batch $b: rc $?, $(grep -c gpu__time_duration "$out/ncu_b$b.csv") kernels"
        python3 scripts/ncu_steps.py "$out/ncu_b$b.csv" 2 | tail -25
      done
      ;;
    detail)
      make_model
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      # Step 2 of `--tokens 2 --prompt-len 2` (prefill, decode, decode): skip the prefill's and first
      # decode's launches of each kernel (8 layers: 8 + 8 router/attention launches, 16 + 16 GEMVs).
      timeout 300 $ncu --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
        --section SchedulerStats --section MemoryWorkloadAnalysis --clock-control none \
        -k regex:'RouterPlanKernel|AttentionBatchedKernel|GemvKernel|MoeGateUpKernel|MoeDownKernel|MoeCombine' \
        --launch-skip 60 --launch-count 12 $B/eep bench decode --model $m --skip-cpu --mode split --tokens 2 \
        --prompt-len 2 --batch 1 --no-graphs > "$out/ncu_detail.txt" 2> "$out/ncu_detail.err"
      echo "ncu detail: rc $?"
      ;;
    sass)
      make_model
      ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
      # Per-instruction stall samples (SASS) of one router, attention and q/k/v GEMV launch.
      for k in RouterPlanKernel AttentionBatchedKernel GemvKernel; do
        timeout 200 $ncu --section SourceCounters --section WarpStateStats --clock-control none -k regex:$k \
          --launch-skip 9 --launch-count 1 -f -o /tmp/src_$k $B/eep bench decode --model $m --skip-cpu --mode split \
          --tokens 2 --prompt-len 2 --batch 1 --no-graphs > /dev/null 2>&1
        $ncu -i /tmp/src_$k.ncu-rep --page source --csv --print-source sass > "$out/sass_$k.csv" 2>&1
        echo "sass $k: $(wc -l < "$out/sass_$k.csv") lines"
      done
      grep -E '^  [A-Za-z].*\(|Duration|Registers Per|Achieved Occupancy|Memory Throughput|Block Limit|Stall|Warp Cycles Per Issued|Dynamic Shared|Grid Size|Waves Per SM|One or More Eligible|Issued Warp' \
        "$out/ncu_detail.txt" | head -150
      ;;
  esac
done
