"""SimCLR as one module: two (or more) views in, the loss and what we monitor out."""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from core import dist
from core.device import autocast
from core.names import LOSSES
from losses import contrastive, nt_xent


class SimCLR(nn.Module):
    """encoder -> projection head -> a contrastive loss over the views' embeddings.

    Both global views go through the encoder as one batch of 2B: batch norm sees them together, unless its layers
    were made per-view (``models.view_bn``: what separate forward passes per view compute). Multi-crop's small views
    (``local_views``, K per image) go through as one more batch, of their own size. ``num_classes`` adds an online
    linear classifier on stop-gradient encoder features of the global views: it learns beside pretraining and never
    sends a gradient into the encoder.

    ``loss_name``: ntxent (SimCLR; with small views every view of an image is a positive of every other), supcon (the
    views of every image of the same class are positives: needs the labels), dcl (decoupled: positives leave the
    denominator) or dclw (dcl with the von Mises-Fisher weights, ``dcl_sigma``). Two views with ntxent run
    ``losses.nt_xent``; everything else ``losses.contrastive``, of which it is the two-view case.

    ``compute_dtype`` bf16 (or fp16) autocasts the encoder and head; the loss and the online classifier always run
    in fp32, outside the autocast region. That boundary lives here, not around the call: a ``torch.compile``d step
    traces the loss's backward under the autocast state around the compiled call, which would put the similarity
    gradients in bf16 even with autocast switched off inside the loss.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, temperature: float, *, loss_impl: str = "auto",
                 gather: bool = False, num_classes: Optional[int] = None,
                 compute_dtype: torch.dtype = torch.float32, loss_name: str = "ntxent",
                 dcl_sigma: float = 0.5) -> None:
        super().__init__()
        if loss_name not in LOSSES:
            raise ValueError(f"unknown loss {loss_name!r}; choose one of {', '.join(LOSSES)}")
        self.encoder, self.head = encoder, head
        self.temperature, self.loss_impl, self.gather = temperature, loss_impl, gather
        self.loss_name, self.dcl_sigma = loss_name, dcl_sigma
        self.compute_dtype = compute_dtype
        self.classifier = nn.Linear(encoder.feature_dim, num_classes) if num_classes else None

    def forward(self, view1: torch.Tensor, view2: torch.Tensor, labels: Optional[torch.Tensor] = None,
                project_only: bool = False, local_views: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """views: [B, 3, H, W] each; labels: int64 [B] (the online classifier's and SupCon's); local_views: [K B, 3,
        h, w], crop k of every image in turn -> {"loss": scalar, "z1", "z2": detached embeddings [B, proj_dim]} plus
        "z_local" [K B, proj_dim] with small views, and with the online classifier and labels "online_loss"
        (cross-entropy over both global views, to be added to the loss) and "online_correct" (count).
        ``project_only``: no loss, and the embeddings keep their graph (the micro-batched step, training/micro_batch.py,
        computes the loss over all chunks' projections itself with :meth:`loss`).
        """
        with autocast(view1.device, self.compute_dtype):
            h = self.encoder(torch.cat([view1, view2]))  # [2B, d]
            z1, z2 = self.head(h).chunk(2)
            z_local = self.head(self.encoder(local_views)) if local_views is not None else None
        if project_only:
            out = {"z1": z1, "z2": z2}
        else:
            loss = self.loss(z1, z2, z_local, labels)
            out = {"loss": loss, "z1": z1.detach(), "z2": z2.detach()}
            z_local = z_local.detach() if z_local is not None else None
        if z_local is not None:
            out["z_local"] = z_local
        if self.classifier is not None and labels is not None:
            # stop-gradient: the encoder learns from the contrastive loss alone; fp32 like the classifier's weights
            logits = self.classifier(h.detach().to(self.classifier.weight.dtype))
            targets = labels.repeat(2)
            out["online_loss"] = F.cross_entropy(logits, targets)
            out["online_correct"] = (logits.argmax(dim=1) == targets).sum()
        return out

    def loss(self, z1: torch.Tensor, z2: torch.Tensor, z_local: Optional[torch.Tensor] = None,
             labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The configured loss over the embeddings of B images: z1, z2 [B, p], z_local [K B, p] (crop-major)."""
        if self.loss_name == "ntxent" and z_local is None:
            return nt_xent(z1, z2, self.temperature, gather=self.gather, impl=self.loss_impl)
        views = [z1, z2] if z_local is None else [z1, z2, z_local]
        z = torch.cat(views)
        return contrastive(z, self.groups(z1.shape[0], z.shape[0] // z1.shape[0], labels, z.device), self.temperature,
                           decoupled=self.loss_name in ("dcl", "dclw"),
                           dcl_sigma=self.dcl_sigma if self.loss_name == "dclw" else None, gather=self.gather,
                           impl=self.loss_impl)

    def groups(self, images: int, views: int, labels: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
        """int64 [views x images]: each view's group, crop-major like the embeddings. SupCon: the image's class;
        otherwise the image's index in the global batch (unique across processes under the gather)."""
        if self.loss_name == "supcon":
            if labels is None:
                raise ValueError("loss supcon needs the images' labels")
            return labels.long().repeat(views)
        first = images * dist.rank() if self.gather else 0
        return torch.arange(first, first + images, device=device).repeat(views)
