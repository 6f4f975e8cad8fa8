#!/usr/bin/env bash
# What bench/gpu_accuracy.sh and bench/gpu_speed.sh run: bench/gpu_run.sh SCRIPT.py OUTDIR [options of SCRIPT.py].
# The device tool's image lacks some packages, so carried wheels (.whl/, `make gpu-carry`) are installed beside its
# packages, not over them; the CIFAR-10 archive is the carried .gpu/ copy or ../shared's (DATA overrides both).
set -euo pipefail
SCRIPT=${1:?usage: bench/gpu_run.sh SCRIPT.py OUTDIR [options]}
OUT=${2:?usage: bench/gpu_run.sh SCRIPT.py OUTDIR [options]}
shift 2
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
DATA=${DATA:-}
for candidate in .gpu/cifar10-jpeg.tar.xz ../shared/data/cifar10-jpeg.tar.xz; do
  if [[ -z $DATA && -f $candidate ]]; then DATA=$candidate; fi
done
exec "${PYTHON:-python3}" "bench/$SCRIPT" "$OUT" ${DATA:+--data "$DATA"} "$@"
