"""SimCLR as one module: two views in, the loss and what we monitor out."""
from __future__ import annotations

from typing import Dict

import torch
from torch import nn

from losses import nt_xent


class SimCLR(nn.Module):
    """encoder -> projection head -> NT-Xent on the two views' embeddings."""

    def __init__(self, encoder: nn.Module, head: nn.Module, temperature: float, *, loss_impl: str = "auto",
                 gather: bool = False) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head
        self.temperature, self.loss_impl, self.gather = temperature, loss_impl, gather

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> Dict[str, torch.Tensor]:
        """views: [B, 3, H, W] each -> {"loss": scalar, "z1", "z2": detached embeddings [B, proj_dim]}.

        Both views go through the encoder as one batch of 2B, so batch-norm statistics cover both views.
        """
        z1, z2 = self.head(self.encoder(torch.cat([view1, view2]))).chunk(2)
        loss = nt_xent(z1, z2, self.temperature, gather=self.gather, impl=self.loss_impl)
        return {"loss": loss, "z1": z1.detach(), "z2": z2.detach()}
