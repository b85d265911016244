#!/usr/bin/env bash
# What a CUDA machine checks that CI cannot, in stages (each fits one device call):
#   tests     the extension built with its CUDA kernels; the GPU tests (Triton compiled for the
#             device, native CUDA kernels, the op contract and parity on CUDA, "auto" and the
#             float64 asserts, CUDA-graph capture of the passes and of whole steps)
#   sanitize  compute-sanitizer memcheck and racecheck over every CUDA kernel
#   bench     the kernel section at the GPU targets' sizes (P = 2^20, 2^24, 2^27), and ncu
#             profiles of each backend's passes at P = 2^24
# Usage: bash tests/gpu_checks.sh LOGS [STAGE ...] (default: every stage). The build is kept in
# place between calls on a warm machine.
set -uo pipefail
logs=${1:-.}
shift || true
stages=${*:-tests sanitize bench}
cd "$(dirname "$0")/.."
export PYTHONPATH=.
nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
if ! python3 -c "import emtl_kernels._extension as e; assert e.WITH_CUDA" 2>/dev/null; then
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout 200 python3 setup.py -q build_ext --inplace > "$logs/build.log" 2>&1
  echo "build: rc=$?"; tail -3 "$logs/build.log"
fi
python3 -c "import emtl_kernels as e, torch; print('backends on cuda:', e.available_backends(torch.device('cuda')))"
for stage in $stages; do
  case $stage in
    tests)
      timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py tests/test_triton_backend.py \
        tests/test_ops_auto.py tests/test_ops_asserts.py 2>&1 | tee "$logs/pytest.log" | tail -15
      timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_ops_parity.py tests/test_native_backend.py \
        tests/test_ops_contract.py -k cuda 2>&1 | tee -a "$logs/pytest.log" | tail -8 ;;
    sanitize)
      for tool in memcheck racecheck; do
        timeout 150 compute-sanitizer --tool $tool --error-exitcode 9 python3 tests/sanitizer_workload.py \
          > "$logs/$tool.log" 2>&1
        echo "$tool: rc=$?"; tail -4 "$logs/$tool.log"
      done ;;
    bench)
      timeout 330 python3 -m bench --full --device cuda --sections kernels --kernel-sizes 20,24,27 \
        --out "$logs/bench" > "$logs/bench.log" 2>&1
      echo "bench: rc=$?"; grep -A12 "^| target" "$logs/bench/report.md" | grep "kernel passes"
      timeout 120 ncu --profile-from-start off --set detailed -o "$logs/passes" python3 tests/profile_workload.py \
        > "$logs/ncu.log" 2>&1
      echo "ncu: rc=$?"; ncu --import "$logs/passes.ncu-rep" --page raw --csv \
        --metrics gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active \
        > "$logs/ncu.csv" 2>&1; cut -c1-400 "$logs/ncu.csv" | head -20 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
