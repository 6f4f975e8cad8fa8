"""Run under torchrun with 2 CPU processes (gloo) by tests/test_gather_distributed.py.

Each rank computes NT-Xent on its shard of a global batch with gather=True; DDP's gradient averaging is done by
hand (all-reduce, divide by world size). The result must equal one process on the whole batch.
"""
import importlib
import json
import sys

import torch

from engine import dist
from losses import nt_xent

nt_xent_module = importlib.import_module("losses.nt_xent")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(out_path: str) -> None:
    dist.init_from_env(torch.device("cpu"))
    rank, world = dist.rank(), dist.world_size()
    nt_xent_module.BLOCK_ELEMENTS = 40  # force several blocks in the fused path, with rank offsets
    results = {"world_size": world}
    for impl in ("reference", "fused"):
        for n in (12, 10):  # shards of 6 and 5 pairs
            g = torch.Generator().manual_seed(n)
            weight = torch.randn(16, 8, dtype=torch.float64, generator=g)
            x1, x2 = (torch.randn(n, 16, dtype=torch.float64, generator=g) for _ in range(2))
            whole = weight.clone().requires_grad_()
            loss_whole = nt_xent(x1 @ whole, x2 @ whole, 0.3, impl=impl)
            loss_whole.backward()
            shard = weight.clone().requires_grad_()
            rows = slice(rank * n // world, (rank + 1) * n // world)
            loss_shard = nt_xent(x1[rows] @ shard, x2[rows] @ shard, 0.3, gather=True, impl=impl)
            loss_shard.backward()
            grad = dist.all_reduce_sum(shard.grad.clone()) / world  # what DDP does
            mean_loss = dist.all_reduce_sum(loss_shard.detach().clone()) / world
            results[f"{impl}/n{n}/grad"] = relative(grad, whole.grad)
            results[f"{impl}/n{n}/loss"] = abs(mean_loss.item() - loss_whole.item()) / loss_whole.item()
    if dist.is_main():
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
