"""Linear-probe time on extracted features: the batched weight-decay grid vs one classifier at a time, one run.

    python bench/probe.py                      # CPU: 50,000 x 512 features, 10 classes, 5 weight decays
    python bench/probe.py --device cuda --dims 512 2048

Both fit the same grid with the same recipe (100 epochs, batch 1024, SGD + Nesterov, cosine): ours trains the
whole grid as one batched weight [G, d, C] (evaluation.probe.train_probes) and then refits one classifier, as
finetune.py does; the baseline trains one nn.Linear per weight decay with torch.optim.SGD(weight_decay=...), the
usual loop, and no refit. JSON lines {"what", "shape", "device",
"figure", "unit"}: seconds of each, then the ratio baseline / ours.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from optim.optimizers import lr_at, set_lr  # noqa: E402
from evaluation.probe import feature_stats, train_probes  # noqa: E402

GRID = [0.0, 1e-5, 1e-4, 1e-3, 1e-2]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(features, labels, epochs: int, batch: int) -> None:
    """The whole probe fit of finetune.py's linear mode: the grid, then the chosen decay refit once more."""
    mean, std = feature_stats(features)
    standardized = (features - mean) / std
    for grid in (GRID, GRID[-1:]):
        train_probes(lambda idx, step: standardized[idx], labels, num_classes=10, mean=mean, std=std,
                     weight_decays=grid, epochs=epochs, batch_size=batch, lr=0.1, seed=0)


def one_at_a_time(features, labels, epochs: int, batch: int) -> None:
    mean, std = feature_stats(features)
    x = (features - mean) / std
    steps = epochs * math.ceil(len(labels) / batch)
    for wd in GRID:
        head = torch.nn.Linear(x.shape[1], 10).to(x.device)
        optimizer = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=wd)
        step = 0
        for _ in range(epochs):
            for idx in torch.randperm(len(labels), device=x.device).split(batch):
                loss = F.cross_entropy(head(x[idx]), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                set_lr(optimizer, lr_at(step, peak_lr=0.1, warmup_steps=0, total_steps=steps))
                optimizer.step()
                step += 1


def timed(fn, *args, device: str) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn(*args)
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--dims", type=int, nargs="+", default=[512])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch", type=int, default=1024)
    args = parser.parse_args()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"
    for dim in args.dims:
        g = torch.Generator().manual_seed(0)
        features = torch.randn(args.samples, dim, generator=g).to(args.device)
        labels = torch.randint(0, 10, (args.samples,), generator=g).to(args.device)
        ours(features[:2048], labels[:2048], 1, args.batch)  # warm-up (CUDA context, kernels)
        shape = [args.samples, dim, len(GRID)]
        seconds = {}
        for what, fn in (("probe/batched_grid_and_refit", ours), ("probe/one_at_a_time", one_at_a_time)):
            seconds[what] = timed(fn, features, labels, args.epochs, args.batch, device=args.device)
            print(json.dumps({"what": what, "shape": shape, "device": name, "figure": round(seconds[what], 3),
                              "unit": "s"}), flush=True)
        print(json.dumps({"what": "probe/one_at_a_time_over_ours", "shape": shape, "device": name,
                          "figure": round(seconds["probe/one_at_a_time"] / seconds["probe/batched_grid_and_refit"], 3),
                          "unit": "x"}), flush=True)


if __name__ == "__main__":
    main()
