#!/usr/bin/env bash
# Every GPU check of the project in one run, for a short lease on a GPU machine:
# the CUDA tests (probe engine on the GPU and streamed from pinned host memory, bf16,
# every selection mode, the autocast build, a sweep), the paper-scale probe benchmark in
# fp32 / TF32 / bf16 (goal: <= 2 s on one H100) with a profile of where the time goes, the
# build benchmark on a JPEG folder (goal: build >= 0.9 x the backbone's synthetic-tensor
# rate, resnet50 at 224 px) and the CKA benchmark.
#
# Here (with PyPI):            bash benchmarks/gpu_wheels.sh     # wheels the GPU image lacks -> .whl/
# On the GPU machine:          bash benchmarks/gpu_check.sh [STEP ...]   # carry .whl; logs go to $OUT (or /tmp)
#
# Each step is limited (STEP_TIMEOUT, default 240 s) and a failing step does not stop the
# next; the exit code is the number of failed steps. Naming steps runs only those.
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
# featstore's own metadata (the `featstore.commands` entry points); the code itself is the working tree's
$PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target /tmp/site . >/dev/null 2>&1 \
  && export PYTHONPATH=$PWD:/tmp/site || echo "gpu_check: featstore's metadata not installed (CLI sub-commands missing)"
failed=0
only=" $* "
step() {
  local name=$1; shift
  if [ "$only" != "  " ] && [[ "$only" != *" $name "* ]]; then return; fi
  echo "== $name: $*" | tee -a "$LOG_DIR/gpu_check.log"
  local t0=$SECONDS
  timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$LOG_DIR/gpu_check.log"
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG_DIR/gpu_check.log"
  [ "$rc" = 0 ] || failed=$((failed + 1))
}
step device nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step torch $PY -c "import os, torch, featstore, probes, pipelines; print('torch', torch.__version__, torch.cuda.get_device_name(0), os.cpu_count(), 'cores')"
step tests $PY -m pytest -q -p no:cacheprovider -m gpu -rA tests/test_probes.py tests/test_build_store.py tests/test_sweep.py tests/test_decode.py
for prec in fp32 tf32 bf16; do
  extra=""; [ "$prec" = fp32 ] && extra="--profile"
  step "paper-$prec" $PY benchmarks/bench_probes.py --paper-scale --precision $prec --orders per-seed --no-baselines --repeats 2 $extra
done
step paper-fp32-eager $PY benchmarks/bench_probes.py --paper-scale --precision fp32 --orders per-seed --no-baselines --repeats 2 --eager
for prec in fp32 tf32; do
  step "blocks-$prec" $PY benchmarks/bench_probes.py --paper-scale --precision $prec --orders per-seed --no-baselines --repeats 2 --min-blocks 64,256,1024,4096
done
step decode $PY benchmarks/bench_decode.py --device cuda
step build $PY benchmarks/bench_build.py --device cuda --dataset jpeg --images ${BUILD_IMAGES:-4000} --models ${BUILD_MODELS:-resnet50,tf_efficientnet_lite0} --decodes pil,device --repeats 1
step cka $PY benchmarks/bench_cka.py --baseline-subsets 2
# issue 30: the paper grid as a sweep against the engine alone (goal <= 1.25x), its layers joined by --share-rows auto
step sweep $PY benchmarks/bench_sweep.py --device cuda --paper-scale --paper-epochs 50 --repeats 2 --no-demo
# issue 31: the lbfgs solver on the paper grid, one C and 8 Cs (goal: one C <= 1 s; scikit-learn's side: on the CPU)
step lbfgs $PY benchmarks/bench_probes.py --device cuda --paper-scale --solver lbfgs --cs 1,8 --sklearn-draws 0
echo "gpu_check: $failed step(s) failed; log in $LOG_DIR/gpu_check.log"
exit $failed
