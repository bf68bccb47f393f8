#!/usr/bin/env bash
# Runs eep binaries built HERE (with nvcc, CUDA arch 90a;90) on the GPU device machine,
# whose image lacks ZeroMQ, cpp-httplib, and UCX/PCRE2 headers (shared/DEVICE.md, route 3).
#
#   scripts/device-run.sh pack [BUILD_DIR] [TARGET...]   # here: copy binaries + their non-CUDA
#                                                        # shared libraries into .devbuild/
#   (device) scripts/device-run.sh env                   # there: print the exports to eval (and
#                                                        # link the build's source path to here)
#
# Then call the device tool with carry [".devbuild"] and a command such as
#   eval "$(scripts/device-run.sh env)"; .devbuild/bin/cuda_ops_gpu; .devbuild/bin/eep bench decode ...
# .devbuild/ must be listed in .git/info/exclude (the script adds it).
set -euo pipefail
cd "$(dirname "$0")/.."
cmd=${1:-}
case "$cmd" in
  pack)
    build=${2:-build-cuda}
    shift $(( $# >= 2 ? 2 : $# ))
    targets=("$@")
    [ ${#targets[@]} -eq 0 ] && targets=(eep cuda_ops_gpu cuda_golden_gpu)
    grep -qx '.devbuild/' .git/info/exclude 2>/dev/null || echo '.devbuild/' >> .git/info/exclude
    rm -rf .devbuild && mkdir -p .devbuild/bin .devbuild/lib
    for t in "${targets[@]}"; do
      cp "$build/bin/$t" .devbuild/bin/ 2>/dev/null || cp "$build/tests/$t" .devbuild/bin/
    done
    # Every shared library the binaries need except glibc, the CUDA runtime libraries
    # (cudart/cuBLAS/NCCL/driver are on the device) and the loader.
    for b in .devbuild/bin/*; do ldd "$b"; done | awk '/=> \//{print $3}' | sort -u |
      grep -Ev '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*|libcuda|libcudart|libcublas[^/]*|libnccl|libgcc_s|libstdc\+\+)\.so' |
      # OpenBLAS (and its Fortran runtime) is on the device image and is most of the size.
      grep -Ev '/(libopenblas|libgfortran|libquadmath|libblas|liblapack)\.so' |
      while read -r lib; do cp -L "$lib" .devbuild/lib/; done
    strip --strip-debug .devbuild/bin/* .devbuild/lib/* 2>/dev/null || true
    # Test binaries find tests/data through the absolute source path compiled into them.
    pwd > .devbuild/srcdir
    echo "$build" > .devbuild/builddir
    # The tree and .devbuild share the device tool's 64 MiB: large CUDA fatbins travel compressed,
    # unpacked by `env`.
    if [ "$(du -sm .devbuild | cut -f1)" -gt 32 ]; then
      tar -C .devbuild -cJf .devbuild/pack.tar.xz bin lib && rm -rf .devbuild/bin .devbuild/lib
    fi
    du -sh .devbuild
    ;;
  env)
    # (python3's lzma: the device image has no xz)
    if [ -f .devbuild/pack.tar.xz ] && [ ! -d .devbuild/bin ]; then
      python3 -c "import tarfile; tarfile.open('.devbuild/pack.tar.xz').extractall('.devbuild')" >&2
    fi
    src=$(cat .devbuild/srcdir 2>/dev/null || echo "$PWD")
    if [ "$src" != "$PWD" ] && [ ! -e "$src" ]; then mkdir -p "$(dirname "$src")" && ln -s "$PWD" "$src"; fi
    # Tests run the eep binary through the build path compiled into them (EEP_BIN).
    build=$(cat .devbuild/builddir 2>/dev/null || echo build-cuda)
    mkdir -p "$src/$build/bin" && ln -sf "$PWD/.devbuild/bin/eep" "$src/$build/bin/eep"
    echo "export LD_LIBRARY_PATH=$PWD/.devbuild/lib:/usr/local/cuda/lib64:\${LD_LIBRARY_PATH:-}"
    echo "export NCCL_NVLS_ENABLE=0"
    echo "export EEP_BIN=$PWD/.devbuild/bin/eep"
    ;;
  *)
    echo "usage: $0 pack [BUILD_DIR] [TARGET...] | env" >&2
    exit 2
    ;;
esac
