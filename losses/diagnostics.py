"""What to watch in a contrastive run besides the loss (Wang & Isola 2020; SimCLR's positive/negative similarity)."""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F


@torch.no_grad()
def embedding_stats(z1: torch.Tensor, z2: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Diagnostics of two views' embeddings [n, d] (n >= 2), as 0-dim tensors (no host sync).

    pos_cos: mean cosine of positive pairs. neg_cos: mean cosine over all other pairs of the 2n views.
    align: mean squared distance of positive pairs on the sphere (lower is better).
    uniform: log mean exp(-2 squared distance) over pairs of view-1 embeddings (lower is more uniform).
    z_std: lightly's ``std_of_l2_normalized`` (the per-dimension standard deviation of the unit embeddings over the
    2n views, averaged over dimensions) times sqrt(d): about 1 when the views spread over the sphere, 0 when they
    have collapsed to one point, whatever d is. It depends on the axes: two antipodal points give 0.83, a healthy
    embedding along a few axes can give 0.25.
    erank: the effective rank (Roy & Vetterli 2007) of the covariance of the 2n unit embeddings, exp of the entropy
    of its normalized eigenvalues: rotation invariant, 1 for views on a line (two antipodal points), at most k - 1
    for k points, 0 for one point, up to d for views spread over the sphere.
    """
    u1, u2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    n = u1.shape[0]
    pos = (u1 * u2).sum(dim=1)
    views = torch.cat([u1, u2])
    total = views.sum(dim=0).square().sum()  # sum of all (2n)^2 cosines, in O(n d)
    neg = (total - 2 * n - 2 * pos.sum()) / (4 * n * n - 4 * n)  # minus self-pairs and positive pairs
    sq_dists = torch.pdist(u1).square()
    return {"pos_cos": pos.mean(), "neg_cos": neg, "align": (u1 - u2).square().sum(dim=1).mean(),
            "uniform": sq_dists.mul(-2).exp().mean().log(), "z_std": views.std(dim=0).mean() * u1.shape[1] ** 0.5,
            "erank": effective_rank(views)}


def effective_rank(u: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalized eigenvalues of the covariance of u [m, d]), in float64 (0-dim tensor); 0 when
    the covariance vanishes (every row the same)."""
    centered = u.double() - u.double().mean(dim=0)
    eigenvalues = torch.linalg.eigvalsh(centered.T @ centered / max(1, u.shape[0] - 1)).clamp_min(0)
    total = eigenvalues.sum()
    p = eigenvalues / total.clamp_min(1e-300)
    entropy = -(p * p.clamp_min(1e-300).log()).sum()
    return torch.where(total > 1e-12, entropy.exp(), torch.zeros_like(total))
