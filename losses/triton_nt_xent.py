"""Triton kernel for NT-Xent's forward pass: similarities and an online log-sum-exp, fused, one pass over the
candidates per block of anchors; the [2n, 2nW] similarity matrix never exists in memory.

Used by ``losses.nt_xent(impl="fused")`` for fp32 CUDA tensors when triton imports; the backward pass recomputes
similarities block by block (``losses.nt_xent``). ``TRITON_INTERPRET=1`` runs the same kernel on CPU tensors,
which is how the tests check it on machines without a GPU.
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
