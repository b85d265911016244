#!/usr/bin/env bash
# Compiles every csrc/cuda/*.cu with nvcc alone, as CI does on machines without a GPU: the
# kernels are torch-free, so a CUDA build break shows here although nothing built from them
# runs. Flags as in a torch CUDAExtension build (no half/bfloat16 operators or implicit
# conversions), warnings as errors, and both kernel-argument layouts (CUDA >= 12.1, and the
# 4 KiB one of older toolkits).
#
# Usage: bash csrc/check_cuda_compiles.sh   (NVCC=/path/to/nvcc and ARCHS="80 90" to override)
set -euo pipefail

cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCHS=${ARCHS:-"80 90"}
if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compiles: $NVCC not found" >&2
  exit 1
fi

gencode=()
for arch in $ARCHS; do
  gencode+=(-gencode "arch=compute_${arch},code=sm_${arch}")
done
torch_defines=(-D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
               -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__)
objects=$(mktemp -d)
trap 'rm -rf "$objects"' EXIT

status=0
for source in csrc/cuda/*.cu; do
  for variant in "" "-DEMTL_SMALL_KERNEL_PARAMS"; do
    echo "nvcc ${source} ${variant:-(default kernel arguments)}"
    if ! "$NVCC" -std=c++17 -O3 -Icsrc "${torch_defines[@]}" ${variant} "${gencode[@]}" \
        --Werror all-warnings -Xcompiler -Wall,-Wextra \
        -c "$source" -o "$objects/$(basename "$source" .cu).o"; then
      status=1
    fi
  done
done
exit $status
