#!/usr/bin/env bash
# The speed check on one GPU in about 5 minutes: gpu tests, the ResNet-18 step (views/s, MFU, peers' pipelines), the
# fused NT-Xent vs the reference, pretrain.py's views/s (what and how: bench/gpu_speed.py's docstring).
#   bench/gpu_speed.sh OUTDIR                                   # on the GPU machine; results in OUTDIR/speed.jsonl
#   PYTHON=.venv/bin/python bench/gpu_speed.sh OUTDIR --tiny     # CPU plumbing check (tests/test_bench.py)
# Through the device tool (its python3 has torch, torchvision, timm, einops, pytest; not omegaconf or lightly):
# `make gpu-carry`, then
#   run(command="bench/gpu_speed.sh $OUT", carry=[".gpu", ".whl"], timeout_s=420)
exec "$(dirname "$0")/gpu_run.sh" gpu_speed.py "${@:?usage: bench/gpu_speed.sh OUTDIR [options of bench/gpu_speed.py]}"
