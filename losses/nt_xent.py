"""NT-Xent (normalized temperature-scaled cross-entropy), the SimCLR loss."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from core import dist
from core.names import LOSS_IMPLS
from losses import triton_nt_xent
from losses.gather import gather_with_grad

IMPLS = LOSS_IMPLS


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = False,
            impl: str = "auto") -> torch.Tensor:
    """Mean NT-Xent over the local anchors. z1, z2: [n, d] embeddings of two views of the same n images.

    Each of the 2n local views is an anchor; its positive is the other view of its image; its negatives are all
    other views: the local 2n - 2, or with ``gather=True`` the views of every process (2 n W - 2). Logits,
    log-sum-exp and gradients are computed in fp32 for fp32/bf16/fp16 inputs (fp64 stays fp64), also inside an
    autocast region, which is switched off here. With ``gather=True`` under DDP,
    N processes on shards of a batch produce the same parameter gradients as one process on the whole batch.
    impl: "reference" (full matrix), "fused" (blocked, O(n d) memory) or "auto" (fused above 4M logits).
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown NT-Xent impl {impl!r}; choose one of {', '.join(IMPLS)}")
    if impl == "auto":  # the full matrix is fastest while small; beyond ~16 MB of logits, walk it in blocks
        impl = "fused" if (2 * z1.shape[0]) ** 2 * (dist.world_size() if gather else 1) > AUTO_FUSED_ELEMENTS \
            else "reference"
    loss = nt_xent_fused if impl == "fused" else nt_xent_reference
    # Autocast would run the similarity matmul in bf16 whatever the inputs' dtype: 8 bits of mantissa in logits
    # divided by a small temperature (at T = 0.05 the fused loss came out 16x too large). The loss is a sliver of
    # the step's FLOPs, so it runs in fp32 with autocast off.
    with torch.autocast(z1.device.type, enabled=False):
        return loss(z1, z2, temperature, gather=gather)


AUTO_FUSED_ELEMENTS = 1 << 22
BLOCK_ELEMENTS = 1 << 22  # similarity entries held at once by the fused loss (16 MB in fp32)


def _unit_rows(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """[2n, d] unit rows in at least fp32 (fp64 stays fp64): rows 0..n-1 view 1, n..2n-1 view 2."""
    z = torch.cat([z1, z2])
    return F.normalize(z.double() if z.dtype == torch.float64 else z.float(), dim=1)


def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = False
                      ) -> torch.Tensor:
    """Textbook implementation: the full [2n, 2nW] similarity matrix. Memory O(n^2 W)."""
    n = z1.shape[0]
    anchors = _unit_rows(z1, z2)  # [2n, d]
    candidates = gather_with_grad(anchors) if gather else anchors  # [2nW, d], this rank's block at `offset`
    offset = 2 * n * dist.rank() if gather else 0
    logits = anchors @ candidates.T / temperature  # [2n, 2nW]
    rows = torch.arange(2 * n, device=logits.device)
    columns = torch.arange(logits.shape[1], device=logits.device)
    # An anchor is not its own negative. A comparison, not `mask[rows, cols] = True`: assigning a Python scalar
    # through advanced indexing copies it from the host, a GPU sync.
    logits = logits.masked_fill(columns[None, :] == (rows + offset)[:, None], float("-inf"))
    positives = offset + (rows + n) % (2 * n)  # the other view of the same image, in this rank's block
    return F.cross_entropy(logits, positives)


def nt_xent_fused(z1: torch.Tensor, z2: torch.Tensor, temperature: float, *, gather: bool = False) -> torch.Tensor:
    """Same value and gradients as :func:`nt_xent_reference`, in O(n d + block x 2nW) memory.

    The similarity matrix is walked in blocks: forward keeps each anchor's log-sum-exp, backward recomputes each
    block's softmax from it. For fp32 CUDA inputs when triton imports, forward is one Triton kernel (similarity +
    online log-sum-exp) and backward two (P C per anchor, P^T A per candidate; ``losses/triton_nt_xent.py``);
    otherwise both are blocked PyTorch. No Python loop per row.
    """
    n = z1.shape[0]
    anchors = _unit_rows(z1, z2)
    candidates = gather_with_grad(anchors) if gather else None  # None: the anchors themselves (one input, so
    offset = 2 * n * dist.rank() if gather else 0                 # torch.compile can trace the function)
    return _BlockedNTXent.apply(anchors, candidates, offset, temperature)


class _BlockedNTXent(torch.autograd.Function):
    """Mean over anchors a_i [m, d] of logsumexp_{j != self} (a_i . c_j / T) - a_i . c_pos(i) / T."""

    @staticmethod
    def forward(ctx, anchors: torch.Tensor, candidates: Optional[torch.Tensor], offset: int, temperature: float
                ) -> torch.Tensor:
        ctx.shared = candidates is None
        candidates = anchors if candidates is None else candidates
        m = anchors.shape[0]
        positives = offset + (torch.arange(m, device=anchors.device) + m // 2) % m
        if triton_nt_xent.available(anchors):  # fp32 on CUDA: one fused kernel, no logit blocks in memory
            lse = triton_nt_xent.row_logsumexp(anchors, candidates, offset, temperature)
        else:
            lse = torch.empty(m, device=anchors.device, dtype=anchors.dtype)
            for rows, logits in _logit_blocks(anchors, candidates, offset, temperature):
                lse[rows] = torch.logsumexp(logits, dim=1)
        positive_logits = (anchors * candidates[positives]).sum(dim=1) / temperature
        ctx.save_for_backward(anchors, candidates, lse, positives)
        ctx.offset, ctx.temperature = offset, temperature
        return (lse - positive_logits).mean()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        with torch.autocast(grad_out.device.type, enabled=False):  # a backward() called inside autocast: still fp32
            return _BlockedNTXent._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out: torch.Tensor):
        anchors, candidates, lse, positives = ctx.saved_tensors
        scale = grad_out / (anchors.shape[0] * ctx.temperature)  # d mean / d logits, times d logits / d similarity
        if triton_nt_xent.available(anchors):  # two Triton kernels: P C and P^T A, P recomputed from lse
            per_anchor, per_candidate = triton_nt_xent.softmax_products(anchors, candidates, lse, ctx.offset,
                                                                        ctx.temperature)
            grad_anchors = (per_anchor - candidates[positives]) * scale  # (P - Y) C
            grad_candidates = per_candidate.index_add_(0, positives, anchors, alpha=-1.0) * scale  # (P - Y)^T A
        else:
            grad_anchors, grad_candidates = _blocked_gradients(anchors, candidates, lse, positives, ctx.offset,
                                                               ctx.temperature, scale)
        if ctx.shared:  # anchors were also the candidates: both roles' gradients reach the same rows
            return grad_anchors + grad_candidates, None, None, None
        return grad_anchors, grad_candidates, None, None


def _blocked_gradients(anchors: torch.Tensor, candidates: torch.Tensor, lse: torch.Tensor, positives: torch.Tensor,
                       offset: int, temperature: float, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients (P - Y) C x scale and (P - Y)^T A x scale in blocked PyTorch (CPU, fp64, no triton)."""
    grad_anchors, grad_candidates = torch.empty_like(anchors), torch.zeros_like(candidates)
    for rows, logits in _logit_blocks(anchors, candidates, offset, temperature):
        probs = logits.sub_(lse[rows, None]).exp_()  # softmax over candidates; the masked self entry is 0
        probs[torch.arange(probs.shape[0], device=probs.device), positives[rows]] -= 1.0
        probs.mul_(scale)
        grad_anchors[rows] = probs @ candidates
        grad_candidates.addmm_(probs.T, anchors[rows])
    return grad_anchors, grad_candidates


def _logit_blocks(anchors: torch.Tensor, candidates: torch.Tensor, offset: int, temperature: float):
    """(row slice, logits [b, M] with each anchor's own column at -inf) for consecutive row blocks of anchors."""
    m, total = anchors.shape[0], candidates.shape[0]
    block = max(1, min(m, BLOCK_ELEMENTS // total))
    for start in range(0, m, block):
        rows = slice(start, min(start + block, m))
        logits = anchors[rows] @ candidates.T
        logits.div_(temperature)
        own = start + offset  # each anchor's own column: the diagonal of this block's square at column `own`
        logits[:, own:own + logits.shape[0]].diagonal().fill_(float("-inf"))
        yield rows, logits
