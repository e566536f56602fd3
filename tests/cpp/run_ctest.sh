#!/usr/bin/env bash
# Configures the CMake build against the torch of `python`, builds it and runs ctest.
#   bash tests/cpp/run_ctest.sh [extra cmake arguments, e.g. -DCKBN_CUDA=ON]
# CKBN_CMAKE_BUILD_DIR picks the build folder (default build/cmake, which git ignores).
set -euo pipefail
cd "$(dirname "$0")/../.."

build_dir=${CKBN_CMAKE_BUILD_DIR:-build/cmake}
torch_prefix=$(python -c "import torch.utils; print(torch.utils.cmake_prefix_path)")

cmake -S . -B "$build_dir" -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$torch_prefix" "$@"
cmake --build "$build_dir" -j2
ctest --test-dir "$build_dir" --output-on-failure
