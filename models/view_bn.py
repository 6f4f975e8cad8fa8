"""Per-view batch statistics in one forward pass: what dkobak's and lightly's separate forwards compute, at joint speed.

Peers call ``model(view1)`` then ``model(view2)``: each view batch is normalized with its own batch-norm statistics,
and the running statistics are updated twice per step. Batch norm is the only layer of a ResNet that mixes samples,
so one forward pass of ``cat([view1, view2])`` whose batch norms normalize each half on its own computes the same
outputs, gradients and running statistics (tests/test_models.py), with convolutions twice as large.
"""
from __future__ import annotations

import torch
from torch import nn

from models.bn_convert import replace_batch_norm


class PerViewBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm over [2B, C] or [2B, C, H, W] whose training statistics are those of each half (each view) alone.

    Statistics are computed in fp32 (fp64 stays fp64) as one expression over a [2, B, C, ...] view of the input:
    no split and concatenation of the batch. The running statistics take the first view's statistics, then the
    second's, as two forward passes would (``momentum=None``: the cumulative average, as batch norm keeps it). The
    state dict is BatchNorm1d's / BatchNorm2d's.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4) or x.shape[0] % 2:
            raise ValueError(f"expected a 2D or 4D input with an even batch (two views), got shape {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        self._check_input_dim(x)
        views = x.to(torch.promote_types(x.dtype, torch.float32)).unflatten(0, (2, -1))  # [2, B, C, ...]
        dims = [1] + list(range(3, views.dim()))  # per view and channel
        var, mean = torch.var_mean(views, dim=dims, correction=0, keepdim=True)  # [2, 1, C, 1, 1]
        shape = (1, 1, -1) + (1,) * (views.dim() - 3)
        scale = torch.rsqrt(var + self.eps)
        y = (views - mean) * (scale * self.weight.view(shape) if self.affine else scale)
        y = y + self.bias.view(shape) if self.affine else y
        if self.track_running_stats:
            with torch.no_grad():
                count = views[0].numel() // views.shape[2]  # values per channel in one view
                for v in range(2):
                    self.num_batches_tracked.add_(1)
                    # momentum None: the cumulative average, weight 1 / batches seen (a tensor: no host sync)
                    weight = self.momentum if self.momentum is not None else 1.0 / self.num_batches_tracked
                    self.running_mean.lerp_(mean[v].flatten().to(self.running_mean.dtype), weight)
                    unbiased = var[v].flatten() * count / max(count - 1, 1)
                    self.running_var.lerp_(unbiased.to(self.running_var.dtype), weight)
        return y.flatten(0, 1).to(x.dtype)


def per_view_batch_norm(module: nn.Module) -> nn.Module:
    """Every BatchNorm1d/2d in ``module`` -> :class:`PerViewBatchNorm` (state-dict keys unchanged)."""
    return replace_batch_norm(module, PerViewBatchNorm)
