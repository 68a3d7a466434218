#!/usr/bin/env bash
# The GPU check behind the CUDA rows of bench/RESULTS.md, in one command on a CUDA machine:
#   bash bench/gpu_check.sh OUTDIR
# 1. the CUDA tests (tests/test_cuda.py) next to the rest of the suite (pytest-xdist when
#    installed), 2. the real-size training benchmark (ResNet-50, 288x144, 32 RGB + 32 IR),
# 3. the real-size SYSU-MM01 test benchmark. Each stage has a time cap so the whole check
# fits a short GPU lease; every output is tee'd into OUTDIR.
set -uo pipefail
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  echo "CPU cores: $(nproc)"; date -u
} 2>&1 | tee "$out/env.txt"

# 1. tests: the CUDA ones in the foreground, the CPU suite beside them (its runs name --gpu cpu)
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 6" || echo "")
OMP_NUM_THREADS=2 timeout 240 python3 -m pytest -q $xdist tests --ignore=tests/test_cuda.py \
  --basetemp=/tmp/gpu_check_cpu >"$out/tests_cpu.txt" 2>&1 &
cpu_suite=$!
timeout 240 python3 -m pytest -q -rs tests/test_cuda.py --basetemp=/tmp/gpu_check_cuda 2>&1 |
  tee "$out/tests_cuda.txt"
wait $cpu_suite
echo "CPU suite exit $?: $(tail -1 "$out/tests_cpu.txt")"

# 2.-3. benchmarks on the otherwise idle machine
timeout 110 python3 bench/bench_train.py --device cuda --arch resnet50 --img_h 288 --img_w 144 \
  --batch-size 32 2>&1 | tee "$out/bench_train.txt"
timeout 110 python3 bench/bench_test.py --device cuda 2>&1 | tee "$out/bench_test.txt"
