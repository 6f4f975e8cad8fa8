"""NT-Xent (normalized temperature-scaled cross-entropy), the SimCLR loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from engine import dist
from losses.gather import gather_with_grad

IMPLS = ("auto", "reference", "fused")


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = False,
            impl: str = "auto") -> torch.Tensor:
    """Mean NT-Xent over the local anchors. z1, z2: [n, d] embeddings of two views of the same n images.

    Each of the 2n local views is an anchor; its positive is the other view of its image; its negatives are all
    other views: the local 2n - 2, or with ``gather=True`` the views of every process (2 n W - 2). Logits and
    log-sum-exp are computed in fp32 for fp32/bf16/fp16 inputs (fp64 stays fp64). With ``gather=True`` under DDP, N processes on
    shards of a batch produce the same parameter gradients as one process on the whole batch.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown NT-Xent impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "fused":
        raise NotImplementedError("the memory-efficient fused NT-Xent is not implemented yet; use impl='reference'")
    return nt_xent_reference(z1, z2, temperature, gather=gather)


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = False
                      ) -> torch.Tensor:
    """Textbook implementation: the full [2n, 2nW] similarity matrix. Memory O(n^2 W)."""
    n = z1.shape[0]
    z = torch.cat([z1, z2])
    z = z.double() if z.dtype == torch.float64 else z.float()  # at least fp32, whatever autocast produced
    anchors = F.normalize(z, dim=1)  # [2n, d]: rows 0..n-1 view 1, n..2n-1 view 2
    candidates = gather_with_grad(anchors) if gather else anchors  # [2nW, d], this rank's block at `offset`
    offset = 2 * n * dist.rank() if gather else 0
    logits = anchors @ candidates.T / temperature  # [2n, 2nW]
    rows = torch.arange(2 * n, device=logits.device)
    self_mask = torch.zeros_like(logits, dtype=torch.bool)
    self_mask[rows, rows + offset] = True  # an anchor is not its own negative
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = offset + (rows + n) % (2 * n)  # the other view of the same image, in this rank's block
    return F.cross_entropy(logits, positives)
