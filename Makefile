# eep — set-up and everyday commands. `make demo` and `make test` work on a fresh Debian 12.
BUILD_DIR ?= build
JOBS ?= $(shell nproc)
CMAKE_FLAGS ?=
# CUDA sources build when nvcc is present (CI has the toolkit); override with EEP_ENABLE_CUDA=OFF.
NVCC := $(shell command -v nvcc 2>/dev/null || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
EEP_ENABLE_CUDA ?= $(if $(NVCC),ON,OFF)
DEMO_MODEL ?= tests/data/models/qwen3moe-tiny

.PHONY: deps configure build test demo clean format

deps:
	@scripts/install-deps.sh

configure: deps
	@cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_BUILD_TYPE=Release -DEEP_ENABLE_CUDA=$(EEP_ENABLE_CUDA) $(CMAKE_FLAGS) >/dev/null

build: configure
	@cmake --build $(BUILD_DIR) -j $(JOBS)

test: build
	@cd $(BUILD_DIR) && ctest --output-on-failure -j $(JOBS) --timeout 900

# Serve on 4 ranks with the DRAM backup, send traffic, kill a rank, scale back up; timeline + summary.
demo: build
	@scripts/demo.sh $(BUILD_DIR)/bin/eep $(DEMO_MODEL)

format:
	@clang-format -i $$(git ls-files '*.cc' '*.h' '*.cu' '*.cuh')

clean:
	@rm -rf $(BUILD_DIR)
