#!/usr/bin/env bash
# Every GPU check of the project in one run, for a short lease on a GPU machine:
# the CUDA tests (probe engine on the GPU and streamed from pinned host memory, bf16,
# projection modes, the autocast build, a sweep) and the probe benchmarks (K = 507 with
# baselines, bf16, and the paper-scale run whose goal is under a minute on one H100).
#
# Here (with PyPI):            bash benchmarks/gpu_wheels.sh     # wheels the GPU image lacks -> .whl/
# On the GPU machine:          bash benchmarks/gpu_check.sh      # carry .whl; logs go to $OUT (or /tmp)
#
# Each step is limited (STEP_TIMEOUT, default 240 s) and a failing step does not stop the
# next; the exit code is the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG_DIR=${OUT:-/tmp/featstore-gpu-check}
mkdir -p "$LOG_DIR"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
if [ -d .whl ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 99
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
failed=0
step() {
  local name=$1; shift
  echo "== $name: $*" | tee -a "$LOG_DIR/gpu_check.log"
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$LOG_DIR/gpu_check.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG_DIR/gpu_check.log"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}
step device nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
step torch $PY -c "import torch, featstore, probes, pipelines; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
step tests $PY -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_probes.py tests/test_build_store.py tests/test_sweep.py
step bench-k507 $PY benchmarks/bench_probes.py --repeats 2
step bench-bf16 $PY benchmarks/bench_probes.py --precision bf16 --no-baselines --repeats 2
step bench-paper-scale $PY benchmarks/bench_probes.py --paper-scale --no-baselines --repeats 1
echo "gpu_check: $failed step(s) failed; log in $LOG_DIR/gpu_check.log"
exit $failed
