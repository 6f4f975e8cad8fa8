#!/usr/bin/env bash
# The accuracy check on one GPU in under 9 minutes: JPEG-copy cost (airbench94), dkobak's 100-epoch recipe, lightly's
# 200-epoch recipe, each scored with its author's protocol (what and how: bench/gpu_accuracy.py's docstring).
#   bench/gpu_accuracy.sh OUTDIR                 # on the GPU machine; results in OUTDIR/accuracy.jsonl
#   PYTHON=.venv/bin/python bench/gpu_accuracy.sh OUTDIR --tiny      # CPU plumbing check (tests/test_bench.py)
# Through the device tool (its python3 has torch, torchvision, timm, einops; not omegaconf or airbench): copy the
# archive to .gpu/ and the wheels to .whl/ (both ignored by git, see README "GPU results"), then
#   run(command="bench/gpu_accuracy.sh $OUT", carry=[".gpu", ".whl"], timeout_s=600)
exec "$(dirname "$0")/gpu_run.sh" gpu_accuracy.py "${@:?usage: bench/gpu_accuracy.sh OUTDIR [options of bench/gpu_accuracy.py]}"
