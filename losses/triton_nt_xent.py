"""Triton kernels for NT-Xent: the [2n, 2nW] similarity matrix never exists in memory, forward or backward.

Forward (:func:`row_logsumexp`): similarities and an online log-sum-exp, fused, one pass over the candidates per
block of anchors. Backward (:func:`softmax_products`), as FlashAttention does it: the softmax P_ij = exp(a_i . c_j / T
- lse_i) is recomputed block by block from the saved log-sum-exp, and multiplied at once into P C (per anchor, one
program per block of anchor rows) and P^T A (per candidate, one program per block of candidate rows), so neither
kernel writes to memory another program writes (no atomics; the result does not depend on scheduling).

Used by ``losses.nt_xent(impl="fused")`` for fp32 CUDA tensors when triton imports. ``TRITON_INTERPRET=1`` runs the
same kernels on CPU tensors, which is how the tests check them on machines without a GPU.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the blocked PyTorch path serves
    triton = None


def available(x: torch.Tensor) -> bool:
    """Whether the kernel can score these rows: triton importable, fp32, on CUDA (or in interpreter mode)."""
    import os

    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return triton is not None and x.dtype == torch.float32 and (x.is_cuda or interpreted)


if triton is not None:
    @triton.jit
    def _row_logsumexp_kernel(anchors, candidates, out, m, total, dim, offset, inv_temperature,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
        running_sum = tl.zeros([BLOCK_M], tl.float32)
        for start_n in range(0, total, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            col_ok = cols < total
            sims = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
            for start_d in range(0, dim, BLOCK_D):
                ds = start_d + tl.arange(0, BLOCK_D)
                d_ok = ds < dim
                a = tl.load(anchors + rows[:, None] * dim + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                            other=0.0)
                c = tl.load(candidates + cols[:, None] * dim + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                            other=0.0)
                sims += tl.dot(a, tl.trans(c), input_precision="ieee")  # no TF32: exact to fp32 rounding
            logits = sims * inv_temperature
            excluded = (cols[None, :] == rows[:, None] + offset) | (cols[None, :] >= total)  # self, padding
            logits = tl.where(excluded, float("-inf"), logits)
            new_max = tl.maximum(running_max, tl.max(logits, axis=1))
            safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with nothing scored yet
            running_sum = running_sum * tl.exp(running_max - safe_max) + tl.sum(tl.exp(logits - safe_max[:, None]),
                                                                                 axis=1)
            running_max = new_max
        tl.store(out + rows, running_max + tl.log(running_sum), mask=row_ok)


if triton is not None:
    @triton.jit
    def _softmax_block(anchors, candidates, lse, rows, row_ok, cols, col_ok, dim, offset, inv_temperature,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """P [BLOCK_M, BLOCK_N] = exp(a_i . c_j / T - lse_i) for these anchor rows and candidate columns; 0 on an
        anchor's own column and on padding rows and columns."""
        sims = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for start_d in range(0, dim, BLOCK_D):
            ds = start_d + tl.arange(0, BLOCK_D)
            d_ok = ds < dim
            a = tl.load(anchors + rows[:, None] * dim + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            c = tl.load(candidates + cols[:, None] * dim + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            sims += tl.dot(a, tl.trans(c), input_precision="ieee")  # no TF32: exact to fp32 rounding
        row_lse = tl.load(lse + rows, mask=row_ok, other=0.0)
        probs = tl.exp(sims * inv_temperature - row_lse[:, None])
        excluded = (cols[None, :] == rows[:, None] + offset) | ~row_ok[:, None] | ~col_ok[None, :]
        return tl.where(excluded, 0.0, probs)

    @triton.jit
    def _softmax_product_kernel(anchors, candidates, lse, out, m, total, dim, offset, inv_temperature,
                                PER_CANDIDATE: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                                BLOCK_OUT: tl.constexpr):
        """For a block of this side's rows and a block of output dimensions d: out[i, d] = sum_j P_ij c_j[d] (per
        anchor), or with PER_CANDIDATE out[j, d] = sum_i P_ij a_i[d] (the transpose: per candidate)."""
        if PER_CANDIDATE:  # resolved when the kernel is compiled: two specializations, no runtime branch
            own_count, other_count, values_of = total, m, anchors  # values_of: what P multiplies
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
            if PER_CANDIDATE:  # P's rows are the others (anchors), its columns our candidates: use P^T
                probs = tl.trans(_softmax_block(anchors, candidates, lse, other, other_ok, own, own_ok, dim, offset,
                                                inv_temperature, BLOCK, BLOCK, BLOCK_D))
            else:
                probs = _softmax_block(anchors, candidates, lse, own, own_ok, other, other_ok, dim, offset,
                                       inv_temperature, BLOCK, BLOCK, BLOCK_D)
            values = tl.load(values_of + other[:, None] * dim + outs[None, :],
                             mask=other_ok[:, None] & out_ok[None, :], other=0.0)
            acc += tl.dot(probs, values, input_precision="ieee")
        tl.store(out + own[:, None] * dim + outs[None, :], acc, mask=own_ok[:, None] & out_ok[None, :])


def softmax_products(anchors: torch.Tensor, candidates: torch.Tensor, lse: torch.Tensor, offset: int,
                     temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(P C [m, d], P^T A [M, d]) with P_ij = exp(anchors[i] . candidates[j] / T - lse[i]) for j != offset + i (0 on
    each anchor's own column): the two products NT-Xent's gradient is made of. anchors [m, d], candidates [M, d],
    lse [m], all fp32 and on one device; P is recomputed in blocks, never stored."""
    anchors, candidates, lse = anchors.contiguous(), candidates.contiguous(), lse.contiguous()
    (m, dim), total = anchors.shape, candidates.shape[0]
    block_out = max(16, min(128, triton.next_power_of_2(dim)))  # output columns per program (registers)
    out_blocks = triton.cdiv(dim, block_out)
    per_anchor, per_candidate = torch.empty_like(anchors), torch.empty_like(candidates)
    for out, rows, per_candidate_side in ((per_anchor, m, False), (per_candidate, total, True)):
        _softmax_product_kernel[(triton.cdiv(rows, 64), out_blocks)](
            anchors, candidates, lse, out, m, total, dim, offset, 1.0 / temperature, PER_CANDIDATE=per_candidate_side,
            BLOCK=64, BLOCK_D=32, BLOCK_OUT=block_out)
    return per_anchor, per_candidate


def row_logsumexp(anchors: torch.Tensor, candidates: torch.Tensor, offset: int, temperature: float
                  ) -> torch.Tensor:
    """logsumexp over j != offset + i of anchors[i] . candidates[j] / T, fp32 [m]. anchors [m, d], candidates
    [M, d], both fp32 and contiguous; anchor i's own column is offset + i."""
    anchors, candidates = anchors.contiguous(), candidates.contiguous()
    m, dim = anchors.shape
    out = torch.empty(m, device=anchors.device, dtype=torch.float32)
    block_m = 64
    _row_logsumexp_kernel[(triton.cdiv(m, block_m),)](anchors, candidates, out, m, candidates.shape[0], dim, offset,
                                                      1.0 / temperature, BLOCK_M=block_m, BLOCK_N=64, BLOCK_D=32)
    return out
