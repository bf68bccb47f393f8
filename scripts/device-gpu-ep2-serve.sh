#!/usr/bin/env bash
# Runs scripts/device-gpu-ep2-serve.py on the device (nvidia-h200-x2) from a .devbuild packed with
# `scripts/device-run.sh pack build-cuda eep`.
eval "$(scripts/device-run.sh env)"; export NCCL_NVLS_ENABLE=0; command -v python3; timeout 280 python3 scripts/device-gpu-ep2-serve.py .devbuild/bin/eep tests/data/models/qwen3moe-tiny; echo rc=$?; grep -hE "failover →|scale-up →|prefetch" /tmp/serve*.err | cut -c1-300 | head
