"""Global batch norm: training statistics over the whole batch across processes, as in the SimCLR paper.

On CUDA this is torch's ``SyncBatchNorm``. torch's version refuses CPU tensors, so CPU process groups (gloo: tests,
CPU clusters) get :class:`GlobalBatchNorm`, which combines per-rank means and squared deviations through the
differentiable gather; both equal one process's BatchNorm on the whole batch (tests/test_distributed.py).
"""
from __future__ import annotations

import torch
from torch import nn

from core import dist
from losses.gather import gather_with_grad
from models.bn_convert import replace_batch_norm


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics cover every rank's batch (equal local batch sizes).

    x: [B, C] or [B, C, H, W]; the state dict is BatchNorm1d's / BatchNorm2d's.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2D or 4D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.world_size() > 1):
            return super().forward(x)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 (or fp64) under autocast
        dims = [0] + list(range(2, x.dim()))  # all but the channel dimension
        per_channel = (-1,) + (1,) * (x.dim() - 2)  # broadcast a [C] vector against x's sample shape
        local = xf.numel() // xf.shape[1]
        mean = xf.mean(dim=dims)
        sq_dev = (xf - mean.view(per_channel)).square().sum(dim=dims)
        stats = gather_with_grad(torch.stack([mean, sq_dev])[None])  # [W, 2, C], gradients reach every rank
        total = local * stats.shape[0]
        global_mean = stats[:, 0].mean(dim=0)
        # Chan et al.'s parallel variance: within-rank squared deviations plus the spread of the rank means.
        var = (stats[:, 1].sum(dim=0) + local * (stats[:, 0] - global_mean).square().sum(dim=0)) / total
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                self.running_mean.lerp_(global_mean.to(self.running_mean.dtype), self.momentum)
                unbiased = var * total / max(total - 1, 1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), self.momentum)
        scale = torch.rsqrt(var + self.eps) * self.weight
        y = (xf - global_mean.view(per_channel)) * scale.view(per_channel) + self.bias.view(per_channel)
        return y.to(x.dtype)


def convert_to_global_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm1d/2d in ``module`` -> global batch norm (torch SyncBatchNorm on CUDA, ours elsewhere)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return replace_batch_norm(module, GlobalBatchNorm)
