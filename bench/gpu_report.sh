#!/usr/bin/env bash
# The GPU report in one command and one time budget (what and how: bench/gpu_report.py's docstring).
#   bench/gpu_report.sh OUTDIR [--budget-s 530] [--stages NAME ...]     # on the GPU machine
#   PYTHON=.venv/bin/python bench/gpu_report.sh OUTDIR --tiny            # CPU plumbing check (tests/test_bench.py)
# Through the device tool: `make gpu-carry` here, then
#   run(command="bench/gpu_report.sh $OUT", carry=[".gpu", ".whl"], timeout_s=600)
# The GPU image lacks a few packages: the carried wheels (.whl/) are installed beside its own, not over them. The
# CIFAR-10 archive is the carried .gpu/ copy, else ../shared's (DATA overrides both).
set -euo pipefail
OUT=${1:?usage: bench/gpu_report.sh OUTDIR [options of bench/gpu_report.py]}
shift
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=${DATA:-}
for candidate in .gpu/cifar10-jpeg.tar.xz ../shared/data/cifar10-jpeg.tar.xz; do
  if [[ -z $DATA && -f $candidate ]]; then DATA=$candidate; fi
done
exec "${PYTHON:-python3}" -u bench/gpu_report.py "$OUT" ${DATA:+--data "$DATA"} "$@"
