"""SimCLR as one module: two views in, the loss and what we monitor out."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from core.device import autocast
from losses import nt_xent


class SimCLR(nn.Module):
    """encoder -> projection head -> NT-Xent on the two views' embeddings.

    Both views go through the encoder as one batch of 2B: batch norm sees them together, unless its layers were made
    per-view (``models.view_bn``: what separate forward passes per view compute). ``num_classes`` adds an online
    linear classifier on stop-gradient encoder features: it learns beside pretraining and never sends a gradient
    into the encoder.

    ``compute_dtype`` bf16 (or fp16) autocasts the encoder and head; the loss and the online classifier always run
    in fp32, outside the autocast region. That boundary lives here, not around the call: a ``torch.compile``d step
    traces the loss's backward under the autocast state around the compiled call, which would put the similarity
    gradients in bf16 even with autocast switched off inside the loss.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, temperature: float, *, loss_impl: str = "auto",
                 gather: bool = False, num_classes: Optional[int] = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.encoder, self.head = encoder, head
        self.temperature, self.loss_impl, self.gather = temperature, loss_impl, gather
        self.compute_dtype = compute_dtype
        self.classifier = nn.Linear(encoder.feature_dim, num_classes) if num_classes else None

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, labels: Optional[torch.Tensor] = None,
                project_only: bool = False) -> Dict[str, torch.Tensor]:
        """views: [B, 3, H, W] each; labels: int64 [B] (used by the online classifier only) ->
        {"loss": NT-Xent scalar, "z1", "z2": detached embeddings [B, proj_dim]} plus, with the online classifier and
        labels, "online_loss" (cross-entropy over both views, to be added to the loss) and "online_correct" (count).
        ``project_only``: no loss, and z1, z2 keep their graph (the micro-batched step, engine/micro_batch.py,
        computes the loss over all chunks' projections itself).
        """
        with autocast(view1.device, self.compute_dtype):
            h = self.encoder(torch.cat([view1, view2]))  # [2B, d]
            z1, z2 = self.head(h).chunk(2)
        if project_only:
            out = {"z1": z1, "z2": z2}
        else:
            loss = nt_xent(z1, z2, self.temperature, gather=self.gather, impl=self.loss_impl)
            out = {"loss": loss, "z1": z1.detach(), "z2": z2.detach()}
        if self.classifier is not None and labels is not None:
            # stop-gradient: the encoder learns from NT-Xent alone; fp32 like the classifier's weights
            logits = self.classifier(h.detach().to(self.classifier.weight.dtype))
            targets = labels.repeat(2)
            out["online_loss"] = F.cross_entropy(logits, targets)
            out["online_correct"] = (logits.argmax(dim=1) == targets).sum()
        return out
