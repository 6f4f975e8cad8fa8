"""Everything torch.distributed, in one place. Other modules ask this one; none imports torch.distributed.

Without a torchrun environment (WORLD_SIZE unset or 1) every function is the single-process identity.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_from_env(device: torch.device) -> None:
    """Join the process group that torchrun describes (WORLD_SIZE > 1): NCCL on CUDA, gloo on CPU.

    A plain `python` launch (no WORLD_SIZE, or 1) stays a single process and nothing is initialized.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")


def shutdown() -> None:
    """Leave the process group (clean exit under torchrun)."""
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on the process that owns side effects (logs, files, W&B)."""
    return rank() == 0


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x [n, ...] along dim 0 in rank order -> [world * n, ...] (no autograd)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum x over ranks, in place; returns x."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
