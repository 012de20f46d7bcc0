#!/usr/bin/env bash
# The GPU checks as one prepared run, for a lent CUDA machine (H100/H200: Python 3.12, torch 2.11, no package
# registry). Run from the repository root; logs and JSON go to ${OUT} (the device tool's output folder) or ./gpu-out.
# At most 9 minutes (the step timeouts add up to 525 s); every step has its own timeout so one hang costs little.
# The recipes step trains pretrain_vl and vl_contrastive at base size through `python -m one_peace.run`
# (trainer.device=cuda, bf16-autocast, 8 decoding workers started by forkserver, eager and trainer.compile=true),
# then kills a run after its mid-run checkpoint and resumes it: samples/s, data-wait fraction, MFU, resume equality.
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

step gpu-tests 120 python3 -m pytest -q -p no:cacheprovider -m gpu -o addopts="" tests/test_device.py
step recipes 270 python3 -m benchmarks.recipes --device cuda --size base --steps 30 --batch-size 64 --workers 8 \
  --start forkserver --timeout 100 --json "${OUT}/recipes.json"
step encoder-base 60 python3 -m benchmarks.encoder --device cuda --size base --batch-size 128 \
  --modalities text image audio --seconds 2 --compile --json "${OUT}/encoder-base.json"
step train-base 45 python3 -m benchmarks.train --device cuda --size base --batch-size 64 --seconds 2 --skip-objectives
step generate 30 python3 -m benchmarks.generate --device cuda --batch-size 64 --seconds 1
