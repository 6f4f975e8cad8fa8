"""Triton kernels for the grouped contrastive loss (losses/contrastive.py): the [V, M] similarity matrix never exists
in memory, forward or backward.

The kernels are those of losses/triton_nt_xent.py with the one-positive-per-anchor index replaced by group ids: a
candidate is a positive of an anchor when their groups are equal (and it is not the anchor itself); decoupled, the
positives also leave the denominator. Forward (:func:`row_statistics`): per anchor, an online log-sum-exp over its
denominator and the positive sums, fused with the similarities. Backward (:func:`gradient_products`): G = coef (P - W)
recomputed block by block (P from the saved log-sum-exp, W the positive weights) and multiplied at once into G C (one
program per block of anchors) and G^T A (one program per block of candidates): no atomics, deterministic.

``TRITON_INTERPRET=1`` runs the same kernels on CPU tensors, which is how the tests check them without a GPU.
"""
from __future__ import annotations

from typing import Optional

import torch

from losses.triton_nt_xent import available, triton

__all__ = ["available", "gradient_products", "row_statistics"]

if triton is not None:
    import triton.language as tl

    @triton.jit
    def _similarities(anchors, candidates, rows, row_ok, cols, col_ok, dim, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        sims = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start_d in range(0, dim, BLOCK_D):
            ds = start_d + tl.arange(0, BLOCK_D)
            d_ok = ds < dim
            a = tl.load(anchors + rows[:, None] * dim + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            c = tl.load(candidates + cols[:, None] * dim + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            sims += tl.dot(a, tl.trans(c), input_precision="ieee")  # no TF32: exact to fp32 rounding
        return sims

    @triton.jit
    def _pair_masks(group, groups, rows, row_ok, cols, col_ok, offset, DECOUPLED: tl.constexpr):
        """(positive, excluded from the denominator) for a block of anchors x candidates; padding is excluded."""
        g_rows = tl.load(group + rows, mask=row_ok, other=-1)
        g_cols = tl.load(groups + cols, mask=col_ok, other=-2)
        valid = row_ok[:, None] & col_ok[None, :]
        own = cols[None, :] == rows[:, None] + offset
        positive = (g_cols[None, :] == g_rows[:, None]) & ~own & valid
        excluded = own | ~valid
        if DECOUPLED:
            excluded = excluded | positive
        return positive, excluded

    @triton.jit
    def _row_statistics_kernel(anchors, candidates, group, groups, lse_out, count_out, pos_out, e_sum_out, e_sim_out,
                               m, total, dim, offset, inv_temperature, inv_sigma, DECOUPLED: tl.constexpr,
                               WEIGHTED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                               BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        count = tl.zeros([BLOCK_M], tl.float32)
        pos_sum = tl.zeros([BLOCK_M], tl.float32)
        e_sum = tl.zeros([BLOCK_M], tl.float32)
        e_sim = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, total, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < total
            sims = _similarities(anchors, candidates, rows, row_ok, cols, col_ok, dim, BLOCK_M, BLOCK_N, BLOCK_D)
            positive, excluded = _pair_masks(group, groups, rows, row_ok, cols, col_ok, offset, DECOUPLED)
            logits = tl.where(excluded, float("-inf"), sims * inv_temperature)
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing scored yet in this row
            running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(logits - safe_max[:, None]),
                                                                                 axis=1)
            running_max = new_max
            pf = positive.to(tl.float32)
            count += tl.sum(pf, axis=1)
            pos_sum += tl.sum(sims * pf, axis=1)
            if WEIGHTED:
                e = tl.exp((sims - 1.0) * inv_sigma) * pf
                e_sum += tl.sum(e, axis=1)
                e_sim += tl.sum(e * sims, axis=1)
        tl.store(lse_out + rows, running_max + tl.log(running_sum), mask=row_ok)
        tl.store(count_out + rows, count, mask=row_ok)
        tl.store(pos_out + rows, pos_sum, mask=row_ok)
        if WEIGHTED:
            tl.store(e_sum_out + rows, e_sum, mask=row_ok)
            tl.store(e_sim_out + rows, e_sim, mask=row_ok)

    @triton.jit
    def _gradient_block(anchors, candidates, group, groups, lse, coef, inv_count, scale, rows, row_ok, cols, col_ok,
                        dim, offset, inv_temperature, inv_sigma, DECOUPLED: tl.constexpr, WEIGHTED: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """G [BLOCK_M, BLOCK_N] = coef_i (P_ij - w_ij [j in P(i)] / |P(i)|) for these anchors and candidates; 0 on
        padding."""
        sims = _similarities(anchors, candidates, rows, row_ok, cols, col_ok, dim, BLOCK_M, BLOCK_N, BLOCK_D)
        positive, excluded = _pair_masks(group, groups, rows, row_ok, cols, col_ok, offset, DECOUPLED)
        row_lse = tl.load(lse + rows, mask=row_ok, other=0.0)
        probs = tl.where(excluded, 0.0, tl.exp(sims * inv_temperature - row_lse[:, None]))
        weights = positive.to(tl.float32)
        if WEIGHTED:
            weights = weights * (2.0 - tl.exp((sims - 1.0) * inv_sigma) / tl.load(scale))
        row_inv_count = tl.load(inv_count + rows, mask=row_ok, other=0.0)
        row_coef = tl.load(coef + rows, mask=row_ok, other=0.0)
        g = (probs - weights * row_inv_count[:, None]) * row_coef[:, None]
        return tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)

    @triton.jit
    def _gradient_product_kernel(anchors, candidates, group, groups, lse, coef, inv_count, scale, out, m, total, dim,
                                 offset, inv_temperature, inv_sigma, DECOUPLED: tl.constexpr, WEIGHTED: tl.constexpr,
                                 PER_CANDIDATE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                                 BLOCK_OUT: tl.constexpr):
        """out[i, d] = sum_j G_ij c_j[d] (per anchor) or, PER_CANDIDATE, out[j, d] = sum_i G_ij a_i[d]."""
        if PER_CANDIDATE:
            own_count, other_count, values_of = total, m, anchors
        else:
            own_count, other_count, values_of = m, total, candidates
        own = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        own_ok = own < own_count
        outs = tl.program_id(1) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
        out_ok = outs < dim
        acc = tl.zeros([BLOCK, BLOCK_OUT], tl.float32)
        for start in range(0, other_count, BLOCK):
            other = start + tl.arange(0, BLOCK)
            other_ok = other < other_count
            if PER_CANDIDATE:
                g = tl.trans(_gradient_block(anchors, candidates, group, groups, lse, coef, inv_count, scale, other,
                                             other_ok, own, own_ok, dim, offset, inv_temperature, inv_sigma,
                                             DECOUPLED, WEIGHTED, BLOCK, BLOCK, BLOCK_D))
            else:
                g = _gradient_block(anchors, candidates, group, groups, lse, coef, inv_count, scale, own, own_ok,
                                    other, other_ok, dim, offset, inv_temperature, inv_sigma, DECOUPLED, WEIGHTED,
                                    BLOCK, BLOCK, BLOCK_D)
            values = tl.load(values_of + other[:, None] * dim + outs[None, :],
                             mask=other_ok[:, None] & out_ok[None, :], other=0.0)
            acc += tl.dot(g, values, input_precision="ieee")
        tl.store(out + own[:, None] * dim + outs[None, :], acc, mask=own_ok[:, None] & out_ok[None, :])


def row_statistics(anchors: torch.Tensor, candidates: torch.Tensor, group: torch.Tensor, groups: torch.Tensor,
                   offset: int, temperature: float, decoupled: bool, sigma: Optional[float]):
    """Per anchor, fp32 [m] each: (log-sum-exp over the denominator, positive count, sum of positive similarities,
    sum_p exp((s - 1) / sigma), sum_p exp((s - 1) / sigma) s); the last two are zeros without ``sigma``. anchors
    [m, d], candidates [M, d] fp32; group [m], groups [M] int64; anchor i is candidate offset + i."""
    anchors, candidates = anchors.contiguous(), candidates.contiguous()
    group, groups = group.contiguous(), groups.contiguous()
    m, dim = anchors.shape
    outs = [torch.zeros(m, device=anchors.device, dtype=torch.float32) for _ in range(5)]
    block_m = 64
    _row_statistics_kernel[(triton.cdiv(m, block_m),)](
        anchors, candidates, group, groups, *outs, m, candidates.shape[0], dim, offset, 1.0 / temperature,
        1.0 / sigma if sigma is not None else 0.0, DECOUPLED=decoupled, WEIGHTED=sigma is not None, BLOCK_M=block_m,
        BLOCK_N=64, BLOCK_D=32)
    return tuple(outs)


def gradient_products(anchors: torch.Tensor, candidates: torch.Tensor, group: torch.Tensor, groups: torch.Tensor,
                      lse: torch.Tensor, coef: torch.Tensor, inv_count: torch.Tensor, offset: int,
                      temperature: float, decoupled: bool, sigma: Optional[float],
                      scale: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(G C [m, d], G^T A [M, d]) with G_ij = coef_i (P_ij - w_ij [j in P(i)] inv_count_i), P_ij = exp(s_ij / T -
    lse_i) on the denominator, w_ij = 1 or 2 - exp((s_ij - 1) / sigma) / scale. G is recomputed in blocks."""
    anchors, candidates = anchors.contiguous(), candidates.contiguous()
    group, groups = group.contiguous(), groups.contiguous()
    lse, coef, inv_count = (t.float().contiguous() for t in (lse, coef, inv_count))
    scale = (scale if scale is not None else torch.ones((), device=anchors.device)).float().reshape(1).contiguous()
    (m, dim), total = anchors.shape, candidates.shape[0]
    block_out = max(16, min(128, triton.next_power_of_2(dim)))
    per_anchor, per_candidate = torch.empty_like(anchors), torch.empty_like(candidates)
    for out, rows, side in ((per_anchor, m, False), (per_candidate, total, True)):
        _gradient_product_kernel[(triton.cdiv(rows, 64), triton.cdiv(dim, block_out))](
            anchors, candidates, group, groups, lse, coef, inv_count, scale, out, m, total, dim, offset,
            1.0 / temperature, 1.0 / sigma if sigma is not None else 0.0, DECOUPLED=decoupled,
            WEIGHTED=sigma is not None, PER_CANDIDATE=side, BLOCK=64, BLOCK_D=32, BLOCK_OUT=block_out)
    return per_anchor, per_candidate
