"""Projection heads: the MLP between the encoder's features and the contrastive loss."""
from __future__ import annotations

from torch import nn


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2) -> nn.Sequential:
    """MLP [B, in_dim] -> [B, out_dim]: (num_layers - 1) x (Linear, BatchNorm, ReLU), then Linear.

    num_layers 2 is SimCLR v1's head, 3 is SimCLR v2's. Hidden linears have no bias (BatchNorm follows).
    """
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        layers += [nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)
