#!/usr/bin/env bash
# Installs eep's build and test dependencies from Debian 12 packages, only if missing.
# Runs apt as root or through sudo. Safe to run repeatedly.
set -euo pipefail

PACKAGES=(
  build-essential cmake ninja-build pkg-config
  nlohmann-json3-dev      # JSON: configs, tokenizer.json, HTTP bodies, descriptors
  libcpp-httplib-dev      # HTTP server (OpenAI API)
  libspdlog-dev libfmt-dev  # the one logger; formatting
  libcli11-dev            # command line of the eep binary
  libzmq3-dev cppzmq-dev  # control plane of backup managers and ranks
  libucx-dev ucx-utils    # one-sided RMA between hosts (transfer engine); ucx_perftest ceiling
  libpcre2-dev            # tokenizer pre-tokenizer regex (\p{L}, lookahead)
  libopenblas-dev         # CPU GEMM
  libgtest-dev libgmock-dev libbenchmark-dev  # tests and micro-benchmarks
  curl python3            # `make demo` drives the HTTP server and reads its JSON
  etcd-server iproute2    # multi-host membership tests: a real etcd; network namespaces for test hosts
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
echo "installing: ${missing[*]}" >&2
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
