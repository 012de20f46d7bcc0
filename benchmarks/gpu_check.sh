#!/usr/bin/env bash
# The GPU checks of the accelerator issue as one prepared run, for a lent CUDA machine (the H200 here: Python 3.12,
# torch 2.11, no package registry). Run from the repository root; logs and JSON go to ${OUT} (the device tool's
# output folder) or ./gpu-out. About 8 minutes on an H200; every step has its own timeout so one hang costs little.
#
# Before the call, on this machine (the device has no registry; the other core dependencies are installed there):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl soxr soundfile omegaconf==2.3.0 hydra-core==1.3.2 antlr4-python3-runtime==4.9.3
# and call the device tool with carry=[".whl"] and command "bash benchmarks/gpu_check.sh".
set -uo pipefail
OUT="${OUT:-gpu-out}"
mkdir -p "${OUT}"
export PYTHONUNBUFFERED=1
SITE=/tmp/one-peace-site
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "${SITE}" .whl/*.whl
fi
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "${SITE}" . || exit 1
export PYTHONPATH="${SITE}:${PWD}"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "${OUT}/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a timeout, log to OUT/NAME.log, keep going on failure
  local name=$1 seconds=$2
  shift 2
  echo "== ${name}"
  timeout "${seconds}" "$@" 2>&1 | tee "${OUT}/${name}.log"
  echo "== ${name}: exit ${PIPESTATUS[0]}" | tee -a "${OUT}/summary.txt"
}

step gpu-tests 240 python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="" tests/test_device.py
step encoder-base 120 python3 -m benchmarks.encoder --device cuda --size base --batch-size 128 \
  --modalities text image audio --seconds 2 --compile --json "${OUT}/encoder-base.json"
step encoder-large 120 python3 -m benchmarks.encoder --device cuda --size large --batch-size 64 \
  --modalities text image --modes fwd-amp fwd+bwd-amp --seconds 2 --compile --json "${OUT}/encoder-large.json"
step train-base 60 python3 -m benchmarks.train --device cuda --size base --batch-size 64 --seconds 2 --skip-objectives
step train-large 60 python3 -m benchmarks.train --device cuda --size large --batch-size 32 --seconds 2 --skip-objectives
step generate 60 python3 -m benchmarks.generate --device cuda --batch-size 64 --seconds 1
