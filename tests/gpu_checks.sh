#!/usr/bin/env bash
# What a CUDA machine checks that CI cannot: the extension built with its CUDA kernels, the GPU
# tests (Triton compiled for the device, native CUDA kernels, CUDA-graph capture) and
# compute-sanitizer's memcheck over every CUDA kernel. Logs go to $1 (default: the current folder).
set -uo pipefail
logs=${1:-.}
cd "$(dirname "$0")/.."
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
  timeout 200 python3 setup.py -q build_ext --inplace > "$logs/build.log" 2>&1
echo "build: rc=$?"; tail -3 "$logs/build.log"
python3 -c "import emtl_kernels as e, torch; print('backends on cuda:', e.available_backends(torch.device('cuda')))"
timeout 160 python3 -m pytest -q -p no:cacheprovider tests/test_triton_backend.py tests/test_cuda_graphs.py \
  2>&1 | tee "$logs/pytest.log" | tail -15
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_ops_parity.py tests/test_native_backend.py -k cuda \
  2>&1 | tee -a "$logs/pytest.log" | tail -15
timeout 100 compute-sanitizer --tool memcheck --error-exitcode 9 python3 tests/sanitizer_workload.py \
  > "$logs/sanitizer.log" 2>&1
echo "memcheck: rc=$?"; tail -5 "$logs/sanitizer.log"
