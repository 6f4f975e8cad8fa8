"""What the shared JPEG copy of CIFAR-10 costs: airbench94 (a supervised recipe with a well-known mean) fed our images.

    python bench/data_cost.py --runs 10                 # CUDA: 10 airbench94 trainings on the JPEG copy (~4 s each)
    python bench/data_cost.py --device cpu              # CPU: writes and reads back airbench's data files only

airbench94 (Jordan 2024, the ``airbench`` package) reaches 94.01% mean test accuracy on the original CIFAR-10 (its
README: 94.01% in 3.83 s on an A100; the mean of many runs, spread about 0.14 points). Run on the same recipe with the
JPEG copy's pixels instead (quality 75, 4:2:0 chroma: ``../shared/data/cifar10-jpeg.tar.xz``), the shortfall of the
mean is what the copy costs a supervised CIFAR-10 number: subtract it before comparing ours with a published figure.

airbench reads ``cifar10/train.pt`` and ``cifar10/test.pt`` (uint8 HWC images, labels, class names) from the working
directory; this script writes them from our decoded archive into a temporary directory and runs there. Prints JSON
lines: ``data_cost/airbench94`` per run (``figure`` = test accuracy in %, TTA level 2 as airbench reports), then
``data_cost/summary`` (mean, std, n, the published 94.01 and ``cost`` = 94.01 - mean).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench.jsonl import emit  # noqa: E402
from data import load_source  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
PUBLISHED = 94.01  # airbench94, original CIFAR-10 (README of KellerJordan/cifar10-airbench and of the package)


def write_airbench_files(root: Path, data_path: str, cache_dir: str) -> Path:
    """Our decoded images as airbench's ``<root>/cifar10/{train,test}.pt``; returns that directory."""
    data = load_source("folder", data_path, cache_dir=cache_dir)
    out = root / "cifar10"
    out.mkdir(parents=True, exist_ok=True)
    for name, images, labels in (("train", data.train_images, data.train_labels),
                                 ("test", data.test_images, data.test_labels)):
        torch.save({"images": images.permute(0, 2, 3, 1).contiguous(), "labels": labels, "classes": data.classes},
                   out / f"{name}.pt")
    return out


def main(argv: Optional[list[str]] = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--data", default=str(ARCHIVE))
    p.add_argument("--cache-dir", default="~/.cache/simclr/decoded")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    args = p.parse_args(argv)
    try:
        import airbench
    except ImportError:
        emit({"what": "data_cost/skipped", "reason": "the airbench package is not installed (pip install airbench)"},
             args.out)
        return []
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="airbench-") as tmp:
        folder = write_airbench_files(Path(tmp), args.data, args.cache_dir)
        loader = airbench.CifarLoader(str(folder), train=False, batch_size=2000, gpu=args.device)
        settings = {"data": Path(args.data).name, "device": str(args.device), "shape": list(loader.images.shape)}
        if args.device == "cpu":  # airbench's model and timing are CUDA-only: check the files it reads, then stop
            assert loader.images.shape == (10000, 3, 32, 32) and len(loader.labels) == 10000
            emit({"what": "data_cost/skipped", "reason": "airbench94 trains on CUDA only; its data files were "
                  "written and read back", **settings}, args.out)
            return []
        cwd = os.getcwd()
        os.chdir(tmp)  # airbench's train94 reads ./cifar10/{train,test}.pt
        try:
            with contextlib.redirect_stdout(sys.stderr):
                airbench.warmup94()  # first run: cuDNN autotuning and lazy set-up, not counted
            for run in range(args.runs):
                tick = time.perf_counter()
                model = airbench.train94(verbose=False)
                seconds = time.perf_counter() - tick
                accuracy = 100.0 * airbench.evaluate(model, loader, tta_level=2)
                rows.append({"what": "data_cost/airbench94", "run": run, "figure": round(accuracy, 3),
                             "seconds": round(seconds, 2), **settings})
                emit(rows[-1], args.out)
        finally:
            os.chdir(cwd)
    accuracies = [r["figure"] for r in rows]
    mean = statistics.fmean(accuracies)
    emit({"what": "data_cost/summary", "figure": round(PUBLISHED - mean, 3), "unit": "points lost to the JPEG copy",
          "mean": round(mean, 3), "std": round(statistics.stdev(accuracies), 3) if len(rows) > 1 else None,
          "n": len(rows), "published": PUBLISHED, "published_protocol": "airbench94, original CIFAR-10, TTA level 2",
          **settings}, args.out)
    return rows


if __name__ == "__main__":
    main()
