"""One contrastive loss for views in groups: SimCLR's NT-Xent with any number of views, SupCon and decoupled NT-Xent.

Every view has a group; the other views of its group are its positives (the same image: SimCLR and multi-crop; the
same class: SupCon). For each anchor i with at least one positive P(i), with cosine similarities s and temperature T,

    loss_i = log sum_{a in A(i)} exp(s_ia / T)  -  1/|P(i)| sum_{p in P(i)} w_ip s_ip / T

where A(i) is every view but i (SupCon's L_out, NT-Xent for two views) or, decoupled (Yeh et al. 2022, DCL), every
view outside i's group; w_ip = 1, or with ``dcl_sigma`` DCLW's von Mises-Fisher weight 2 - exp(s_ip / sigma) /
mean over all positive pairs of exp(s / sigma) (held constant, as in the paper and lightly). The loss is the mean of
loss_i over the anchors that have a positive (and, decoupled, a negative).

Three paths give the same numbers: ``reference`` (the full [V, M] logit matrix), ``fused`` (blocked, memory linear in
V: forward keeps per-anchor sums, backward recomputes each block's softmax) and, inside fused, Triton kernels for fp32
CUDA tensors (``losses/triton_contrastive.py``). With ``gather=True`` the candidates are the views of every process;
the mean's denominator is counted over all processes too, so that DDP's gradient average over N processes equals one
process on the whole batch even when processes hold different numbers of anchors with positives.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from core import dist
from core.names import LOSS_IMPLS
from losses import triton_contrastive
from losses.gather import gather_with_grad

AUTO_FUSED_ELEMENTS = 1 << 22  # as for NT-Xent: beyond ~16 MB of logits, walk the matrix in blocks
BLOCK_ELEMENTS = 1 << 22  # similarity entries held at once by the fused path (16 MB in fp32)


def contrastive(z: torch.Tensor, group: torch.Tensor, temperature: float, *, decoupled: bool = False,
                dcl_sigma: Optional[float] = None, gather: bool = False, impl: str = "auto") -> torch.Tensor:
    """Mean contrastive loss over the local anchors that have a positive. z: [V, d] embeddings of the local views;
    group: int64 [V], views of one group are positives of each other.

    ``decoupled``: positives leave the denominator (DCL). ``dcl_sigma``: DCLW's weighting of the positive term.
    ``gather``: negatives and positives from every process of the group (each process holding V views). Logits in fp32
    (fp64 stays fp64) with autocast off. impl: reference | fused | auto (fused above 4M logits).
    """
    if impl not in LOSS_IMPLS:
        raise ValueError(f"unknown contrastive impl {impl!r}; choose one of {', '.join(LOSS_IMPLS)}")
    if z.dim() != 2 or group.shape != z.shape[:1]:
        raise ValueError(f"z must be [V, d] and group [V]; got {tuple(z.shape)} and {tuple(group.shape)}")
    if dcl_sigma is not None and dcl_sigma <= 0:
        raise ValueError(f"dcl_sigma={dcl_sigma} must be > 0")
    gather = gather and dist.world_size() > 1
    if impl == "auto":
        impl = "fused" if z.shape[0] ** 2 * (dist.world_size() if gather else 1) > AUTO_FUSED_ELEMENTS else "reference"
    with torch.autocast(z.device.type, enabled=False):  # bf16 logits / a small T: see losses/nt_xent.py
        anchors = F.normalize(z.double() if z.dtype == torch.float64 else z.float(), dim=1)
        group = group.long()
        candidates = gather_with_grad(anchors) if gather else None  # None: the anchors themselves
        groups = dist.all_gather_cat(group) if gather else group
        offset = anchors.shape[0] * dist.rank() if gather else 0
        if impl == "reference":
            return _reference(anchors, candidates, group, groups, offset, temperature, decoupled, dcl_sigma, gather)
        return _BlockedContrastive.apply(anchors, candidates, group, groups, offset, temperature, decoupled,
                                         dcl_sigma, gather)


def _masks(group: torch.Tensor, groups: torch.Tensor, rows: torch.Tensor, offset: int, decoupled: bool):
    """(positive, excluded from the denominator) [b, M] for anchors ``rows`` (local indices) of group ``group``."""
    own = torch.arange(groups.shape[0], device=groups.device)[None, :] == (rows + offset)[:, None]
    positive = (groups[None, :] == group[:, None]) & ~own
    return positive, (own | positive) if decoupled else own


def _global_sum(x: torch.Tensor, gather: bool) -> torch.Tensor:
    return dist.all_reduce_sum(x.clone()) if gather else x


def _normalizer(valid: torch.Tensor, gather: bool) -> torch.Tensor:
    """What the sum of local anchor losses is divided by: the anchors with a positive, over all processes divided by
    their number (DDP averages the processes' gradients, which makes it the global mean); at least 1."""
    count = valid.sum().to(torch.float64)
    if gather:
        count = dist.all_reduce_sum(count) / dist.world_size()
    return count.clamp(min=1.0)


def _valid(count: torch.Tensor, total: int, decoupled: bool) -> torch.Tensor:
    """Anchors that have a positive and (decoupled) a negative: the rest have no loss term."""
    return (count > 0) & (total - 1 - count > 0) if decoupled else count > 0


def _mises_fisher_scale(e_sum: torch.Tensor, count: torch.Tensor, gather: bool) -> torch.Tensor:
    """DCLW's normalizer: the mean over all positive pairs (every process's) of exp((s - 1) / sigma). The shift by
    the largest possible similarity, 1, cancels in the weights and keeps exp from overflowing at small sigma."""
    sums = _global_sum(torch.stack([e_sum.sum().double(), count.sum().double()]), gather)
    return (sums[0] / sums[1].clamp(min=1.0)).clamp(min=1e-300)


def _reference(anchors, candidates, group, groups, offset, temperature, decoupled, sigma, gather) -> torch.Tensor:
    """The full [V, M] similarity matrix, written as the formula reads."""
    candidates = anchors if candidates is None else candidates
    sims = anchors @ candidates.T  # [V, M]
    positive, excluded = _masks(group, groups, torch.arange(anchors.shape[0], device=anchors.device), offset,
                                decoupled)
    count = positive.sum(dim=1)
    valid = _valid(count, candidates.shape[0], decoupled)
    logits = (sims / temperature).masked_fill(excluded, float("-inf"))
    lse = torch.logsumexp(logits.masked_fill(~valid[:, None], 0.0), dim=1)  # rows without a term: kept finite
    weights = positive.to(sims.dtype)
    if sigma is not None:
        e = torch.exp((sims.detach() - 1) / sigma) * weights
        weights = weights * (2 - e / _mises_fisher_scale(e.sum(dim=1), count, gather).to(e.dtype))
    positive_term = (weights * sims).sum(dim=1) / temperature / count.clamp(min=1)
    per_anchor = torch.where(valid, lse - positive_term, torch.zeros_like(lse))
    return (per_anchor.sum() / _normalizer(valid, gather)).to(per_anchor.dtype)


class _BlockedContrastive(torch.autograd.Function):
    """The same loss in blocks of anchor rows: forward keeps five numbers per anchor (log-sum-exp, positive count,
    sum of positive similarities and, for DCLW, the two weighted sums), backward recomputes each block."""

    @staticmethod
    def forward(ctx, anchors, candidates, group, groups, offset, temperature, decoupled, sigma, gather):
        ctx.shared = candidates is None
        candidates = anchors if candidates is None else candidates
        if triton_contrastive.available(anchors):
            lse, count, pos_sum, e_sum, e_sim = triton_contrastive.row_statistics(
                anchors, candidates, group, groups, offset, temperature, decoupled, sigma)
        else:
            lse, count, pos_sum, e_sum, e_sim = _blocked_statistics(anchors, candidates, group, groups, offset,
                                                                    temperature, decoupled, sigma)
        valid = _valid(count, candidates.shape[0], decoupled)
        normalizer = _normalizer(valid, gather)
        scale = _mises_fisher_scale(e_sum, count, gather).to(anchors.dtype) if sigma is not None else None
        weighted = pos_sum if sigma is None else 2 * pos_sum - e_sim / scale
        per_anchor = torch.where(valid, lse - weighted / temperature / count.clamp(min=1), torch.zeros_like(lse))
        ctx.save_for_backward(anchors, candidates, group, groups, torch.where(valid, lse, torch.zeros_like(lse)),
                              count, valid)
        ctx.settings = (offset, temperature, decoupled, sigma, scale, normalizer)
        return (per_anchor.sum() / normalizer).to(anchors.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            anchors, candidates, group, groups, lse, count, valid = ctx.saved_tensors
            offset, temperature, decoupled, sigma, scale, normalizer = ctx.settings
            # d loss / d s_ij = coef_i (P_ij - w_ij [j in P(i)] / |P(i)|), coef_i = [valid] grad / (normalizer T)
            coef = valid.to(anchors.dtype) * (grad_out / normalizer).to(anchors.dtype) / temperature
            inv_count = 1.0 / count.clamp(min=1).to(anchors.dtype)
            if triton_contrastive.available(anchors):
                grad_anchors, grad_candidates = triton_contrastive.gradient_products(
                    anchors, candidates, group, groups, lse, coef, inv_count, offset, temperature, decoupled, sigma,
                    scale)
            else:
                grad_anchors, grad_candidates = _blocked_gradients(anchors, candidates, group, groups, lse, coef,
                                                                   inv_count, offset, temperature, decoupled,
                                                                   sigma, scale)
        if ctx.shared:
            return grad_anchors + grad_candidates, None, None, None, None, None, None, None, None
        return grad_anchors, grad_candidates, None, None, None, None, None, None, None


def _row_blocks(anchors: torch.Tensor, candidates: torch.Tensor):
    """(row slice, cosine similarities [b, M]) for consecutive blocks of anchor rows."""
    m, total = anchors.shape[0], candidates.shape[0]
    block = max(1, min(m, BLOCK_ELEMENTS // max(total, 1)))
    for start in range(0, m, block):
        rows = slice(start, min(start + block, m))
        yield rows, anchors[rows] @ candidates.T


def _blocked_statistics(anchors, candidates, group, groups, offset, temperature, decoupled, sigma):
    """Per anchor [V]: log-sum-exp over its denominator, positive count, sum of positive similarities, and for DCLW
    sum_p exp((s - 1) / sigma) and sum_p exp((s - 1) / sigma) s; blocked PyTorch (CPU, fp64, no triton)."""
    m = anchors.shape[0]
    lse, count, pos_sum, e_sum, e_sim = (torch.zeros(m, device=anchors.device, dtype=anchors.dtype) for _ in range(5))
    index = torch.arange(m, device=anchors.device)
    for rows, sims in _row_blocks(anchors, candidates):
        positive, excluded = _masks(group[rows], groups, index[rows], offset, decoupled)
        lse[rows] = torch.logsumexp((sims / temperature).masked_fill_(excluded, float("-inf")), dim=1)
        count[rows] = positive.sum(dim=1).to(anchors.dtype)
        pos_sum[rows] = (sims * positive).sum(dim=1)
        if sigma is not None:
            e = torch.exp((sims - 1) / sigma) * positive
            e_sum[rows], e_sim[rows] = e.sum(dim=1), (e * sims).sum(dim=1)
    return lse, count, pos_sum, e_sum, e_sim


def _blocked_gradients(anchors, candidates, group, groups, lse, coef, inv_count, offset, temperature, decoupled,
                       sigma, scale):
    """(G C, G^T A) with G_ij = coef_i (P_ij - w_ij [j in P(i)] / |P(i)|), G recomputed block by block."""
    grad_anchors, grad_candidates = torch.empty_like(anchors), torch.zeros_like(candidates)
    index = torch.arange(anchors.shape[0], device=anchors.device)
    for rows, sims in _row_blocks(anchors, candidates):
        positive, excluded = _masks(group[rows], groups, index[rows], offset, decoupled)
        probs = (sims / temperature - lse[rows, None]).masked_fill_(excluded, float("-inf")).exp_()
        weights = positive.to(sims.dtype)
        if sigma is not None:
            weights = weights * (2 - torch.exp((sims - 1) / sigma) / scale)
        g = (probs - weights * inv_count[rows, None]) * coef[rows, None]
        grad_anchors[rows] = g @ candidates
        grad_candidates.addmm_(g.T, anchors[rows])
    return grad_anchors, grad_candidates
