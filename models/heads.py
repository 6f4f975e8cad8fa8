"""Projection heads: the MLP between the encoder's features and the contrastive loss."""
from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, *, hidden_bn: bool = True,
                    out_bn: bool = False) -> nn.Sequential:
    """MLP [B, in_dim] -> [B, out_dim]: (num_layers - 1) x (Linear, [BatchNorm], ReLU), then Linear, [BatchNorm].

    num_layers 2 is SimCLR v1's head, 3 is SimCLR v2's. ``hidden_bn=False`` gives dkobak's Linear-ReLU-Linear;
    ``out_bn=True`` adds lightly's batch norm on the output. A linear has a bias only where no batch norm follows
    (the norm's shift would cancel it).
    """
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not hidden_bn))
        layers += [nn.BatchNorm1d(hidden_dim)] if hidden_bn else []
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not out_bn))
    layers += [nn.BatchNorm1d(out_dim)] if out_bn else []
    return nn.Sequential(*layers)
