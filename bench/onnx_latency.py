"""CPU latency of ONNX exports (fp32 and int8) under onnxruntime, at batch 1 and 256, in one run.

    python bench/onnx_latency.py model.onnx model_int8.onnx [--threads 2] [--repeats 50]

Each model gets a fresh InferenceSession (CPUExecutionProvider, intra-op threads as given), random uint8 images of
its input size, warm-up calls, then the median wall time of ``--repeats`` calls per batch size. JSON lines
{"what": "onnx/latency", "model", "shape", "figure" (ms per call), "per_image_ms", "size_mb"}; the ratio of each model
to the first one comes last.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.jsonl import emit  # noqa: E402


def latency_ms(session, images: np.ndarray, repeats: int) -> float:
    for _ in range(3):
        session.run(None, {"images": images})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"images": images})
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = parser.parse_args()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    first: dict[int, float] = {}
    for path in args.models:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        size = session.get_inputs()[0].shape[-1]
        rng = np.random.default_rng(0)
        for batch in args.batches:
            images = rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8)
            ms = latency_ms(session, images, args.repeats if batch == 1 else max(5, args.repeats // 5))
            first.setdefault(batch, ms)
            emit({"what": "onnx/latency", "model": path.name, "shape": list(images.shape),
                  "device": f"cpu x{args.threads} threads (onnxruntime {onnxruntime.__version__})",
                  "figure": round(ms, 3), "unit": "ms per call", "per_image_ms": round(ms / batch, 4),
                  "over_first_model": round(ms / first[batch], 3), "size_mb": round(path.stat().st_size / 1e6, 3)},
                 args.out)


if __name__ == "__main__":
    main()
