#!/usr/bin/env bash
# CUDA ranks sharing one GPU (kind nvidia-h100-x1): the four-rank failure and scaling scenario
# (scripts/scenario-ep4.py, [gpu4]'s scenario on the GPU the session has) and the failover and
# scale benchmarks with --backend cuda. From a .devbuild packed with
# `scripts/device-run.sh pack build-cuda eep`.
set -u
eval "$(scripts/device-run.sh env)"
export NCCL_NVLS_ENABLE=0
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
$EEP_BIN make-model --arch qwen3_moe --layers 2 --hidden 256 --experts 64 --moe-intermediate 256 --experts-per-tok 4 --seed 3 --out /tmp/m64 2>&1 | tail -1
$EEP_BIN make-model --arch qwen3_moe --layers 2 --hidden 512 --experts 384 --moe-intermediate 512 --experts-per-tok 4 --seed 1 --out /tmp/fm 2>&1 | tail -1
echo "== scenario-ep4 (4 CUDA ranks on one GPU, shm)"
EEP_BACKEND=cuda EEP_COMMUNICATOR=shm EEP_LOGDIR=/tmp timeout 240 python3 scripts/scenario-ep4.py $EEP_BIN /tmp/m64 4; echo rc=$?
echo "== bench failover --backend cuda"
timeout 200 $EEP_BIN bench failover --model /tmp/fm --backend cuda --repeat 2 2>/tmp/bf.err; echo rc=$?; grep -E "error|Error" /tmp/bf.err | head -5
echo "== bench scale --backend cuda"
timeout 200 $EEP_BIN bench scale --model /tmp/fm --backend cuda --backup on 2>/tmp/bs.err; echo rc=$?; grep -E "error|Error" /tmp/bs.err | head -5
