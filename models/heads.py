"""Projection heads: the MLP between the encoder's features and the contrastive loss, and features read from inside
one (SimCLR Sec. 4.2 compares h, the encoder's output, with g(h), the head's; SimCLRv2 fine-tunes from a layer in
between)."""
from __future__ import annotations

from typing import List

import torch
from torch import nn


def projection_head(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, *, hidden_bn: bool = True,
                    out_bn: bool = False) -> nn.Sequential:
    """MLP [B, in_dim] -> [B, out_dim]: (num_layers - 1) x (Linear, [BatchNorm], ReLU), then Linear, [BatchNorm].

    num_layers 2 is SimCLR v1's head, 3 is SimCLR v2's, 1 a linear projection and 0 no head at all (the loss compares
    the encoder's features h themselves; out_dim is then in_dim). ``hidden_bn=False`` gives dkobak's
    Linear-ReLU-Linear; ``out_bn=True`` adds lightly's batch norm on the output. A linear has a bias only where no
    batch norm follows (the norm's shift would cancel it).
    """
    layers, dim = [], in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not hidden_bn))
        layers += [nn.BatchNorm1d(hidden_dim)] if hidden_bn else []
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    if num_layers > 0:
        layers.append(nn.Linear(dim, out_dim, bias=not out_bn))
        layers += [nn.BatchNorm1d(out_dim)] if out_bn else []
    return nn.Sequential(*layers)


def head_depth(head: nn.Sequential) -> int:
    """How many layers (linear maps, with the batch norm and ReLU after each) ``head`` has."""
    return sum(isinstance(m, nn.Linear) for m in head)


def head_prefix(head: nn.Sequential, layers: int) -> nn.Sequential:
    """The first ``layers`` layers of a projection head, each with the batch norm and ReLU that follow its linear map
    (the same modules, not copies): head_prefix(head, head_depth(head)) computes g(h)."""
    if not 0 <= layers <= head_depth(head):
        raise ValueError(f"the head has {head_depth(head)} layer(s); layer {layers} does not exist")
    starts: List[int] = [i for i, m in enumerate(head) if isinstance(m, nn.Linear)] + [len(head)]
    return nn.Sequential(*list(head)[:starts[layers]])


class HeadFeatures(nn.Module):
    """An encoder followed by the first layers of its projection head: images [B, 3, H, W] -> [B, feature_dim].

    Evaluations take it where they take an encoder (it has ``.feature_dim``), so kNN and the linear probe read
    ``headK`` features (eval.features) with the code that reads the encoder's. Its state dict holds ``encoder.*``
    and ``layers.*`` (the head's own indices).
    """

    def __init__(self, encoder: nn.Module, layers: nn.Sequential) -> None:
        super().__init__()
        self.encoder, self.layers = encoder, layers
        linears = [m for m in layers if isinstance(m, nn.Linear)]
        self.feature_dim = linears[-1].out_features if linears else encoder.feature_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.encoder(x))
