"""The cross-process gather that contrastive losses need, with a gradient that reaches every embedding's owner."""
from __future__ import annotations

import torch

from core import dist


class _GatherWithGrad(torch.autograd.Function):
    """Forward: all ranks' rows concatenated. Backward: each rank's loss depends on every rank's rows, so the
    gradient of a row is the sum over ranks of their gradients for it; each rank keeps its own slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return dist.all_gather_cat(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = dist.all_reduce_sum(grad.contiguous().clone())
        start = dist.rank() * ctx.rows
        return grad[start:start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, d] on each of W ranks -> [W * n, d], rank-major, differentiable. Identity in a single process."""
    if dist.world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
