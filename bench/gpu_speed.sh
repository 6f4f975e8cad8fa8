#!/usr/bin/env bash
# The speed check on one GPU in about 5 minutes: gpu tests, the ResNet-18 step (views/s, MFU, peers' pipelines), the
# fused NT-Xent vs the reference, pretrain.py's views/s (what and how: bench/gpu_speed.py's docstring).
#   bench/gpu_speed.sh OUTDIR                                   # on the GPU machine; results in OUTDIR/speed.jsonl
#   PYTHON=.venv/bin/python bench/gpu_speed.sh OUTDIR --tiny     # CPU plumbing check (tests/test_bench.py)
# Through the device tool (its python3 has torch, torchvision, timm, einops, pytest; not omegaconf or lightly):
# `make gpu-carry`, then
#   run(command="bench/gpu_speed.sh $OUT", carry=[".gpu", ".whl"], timeout_s=420)
set -euo pipefail
OUT=${1:?usage: bench/gpu_speed.sh OUTDIR [options of bench/gpu_speed.py]}
shift
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then  # carried wheels: installed beside the image's packages, not over them
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=${DATA:-}
for candidate in .gpu/cifar10-jpeg.tar.xz ../shared/data/cifar10-jpeg.tar.xz; do
  if [[ -z $DATA && -f $candidate ]]; then DATA=$candidate; fi
done
exec "${PYTHON:-python3}" bench/gpu_speed.py "$OUT" ${DATA:+--data "$DATA"} "$@"
