"""Exact large batches in micro-batches: every view keeps every other view of the batch as a negative.

Plain gradient accumulation is wrong for a contrastive loss (each micro-batch would see only its own negatives).
Instead, as GradCache (Gao et al. 2021) does for dense retrieval, one step of a batch of B images runs:

1. every chunk of M images through encoder + head without autograd, keeping only the 2B projections;
2. the loss over all the batch's projections (NT-Xent over 2B, or the grouped loss over every view with multi-crop
   or SupCon; gathered across processes under torchrun, fused where it pays) and its gradient with respect to
   them;
3. per chunk, the forward again with autograd and a backward of that chunk's cached projection gradients, which
   accumulates the parameter gradients of the whole batch.

Memory is one chunk's activations plus 2B projections, whatever B is; the price is one extra forward pass. Batch
norm sees each chunk as its own batch (as B/M processes with per-process statistics would). Its running statistics
move once per step, as in a step without chunks: every chunk's pass with autograd starts from the step's statistics,
and the step ends at their mean over the chunks, (1 - momentum) r + momentum * mean_c(chunk statistics), with
num_batches_tracked counting the step once (the pass without autograd keeps them untouched). Updated once per chunk,
8 chunks would have moved them 57% of the way to the batch's statistics in one step at momentum 0.1, and counted 8.
Randomness inside the forward (dropout, drop-path) is replayed: both passes of a chunk start from the same RNG state.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn


@contextlib.contextmanager
def buffers_kept(module: nn.Module) -> Iterator[None]:
    """Whatever the block does to ``module``'s buffers (batch norm's running statistics and counts) is undone."""
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class StepStatistics:
    """Batch norm's running statistics (every buffer a forward may change) moved once for a step of several chunks:
    ``chunk_done()`` after each chunk's forward adds its change and puts the step's starting values back; ``end()``
    sets each buffer to its start plus the mean of the chunks' changes (counters such as num_batches_tracked: every
    chunk moved them alike, so the mean is one chunk's change, as one step's). A single chunk is left as it ran: an
    ordinary step, bit for bit."""

    def __init__(self, module: nn.Module, chunks: int) -> None:
        self.chunks = chunks
        self.buffers = list(module.buffers()) if chunks > 1 else []
        self.start = [b.clone() for b in self.buffers]
        self.change = [torch.zeros_like(b) for b in self.buffers]

    @torch.no_grad()
    def chunk_done(self) -> None:
        for buffer, start, change in zip(self.buffers, self.start, self.change):
            change += buffer - start
            buffer.copy_(start)

    @torch.no_grad()
    def end(self) -> None:
        for buffer, start, change in zip(self.buffers, self.start, self.change):
            if buffer.is_floating_point():  # buffers no forward touched keep their exact values
                buffer.copy_(torch.where(change == 0, start, start + change / self.chunks))
            else:
                buffer.copy_(start + change // self.chunks)


class RngReplay:
    """The device's default RNG state at marked points, to start a second pass from each again."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.states: dict[int, torch.Tensor] = {}

    def get(self) -> torch.Tensor:
        return torch.cuda.get_rng_state(self.device) if self.cuda else torch.get_rng_state()

    def set(self, state: torch.Tensor) -> None:
        if self.cuda:
            torch.cuda.set_rng_state(state, self.device)
        else:
            torch.set_rng_state(state)

    def mark(self, key: int) -> None:
        self.states[key] = self.get()

    def replay(self, key: int) -> None:
        self.set(self.states[key])


def no_sync(model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's no_sync() for every chunk but the last (their gradients accumulate locally and are all-reduced once),
    looked up through a torch.compile wrapper; a no-op outside DDP."""
    ddp = getattr(model, "_orig_mod", model)
    if last or not hasattr(ddp, "no_sync"):
        return contextlib.nullcontext()
    return ddp.no_sync()


def forward_backward_in_chunks(model: nn.Module, simclr: nn.Module, view1: torch.Tensor, view2: torch.Tensor,
                               micro_batch: int, labels: Optional[torch.Tensor] = None,
                               local: Optional[torch.Tensor] = None) -> dict:
    """One step's gradients for views [B, 3, H, W] (and multi-crop's small views [K B, 3, h, w], crop-major) in
    chunks of ``micro_batch`` images, equal to those of the whole batch at once (up to batch norm seeing each chunk
    on its own, see the module docstring).

    model: what runs the forward (the SimCLR module or its DDP / compiled wrapper); simclr: the unwrapped module (its
    buffers and its loss). Returns what SimCLR.forward returns: the loss of the whole batch, detached embeddings z1,
    z2 [B, proj_dim] (z_local [K B, proj_dim]) and, with labels, the online classifier's "online_correct"."""
    batch = view1.shape[0]
    starts = range(0, batch, micro_batch)
    crops = local.shape[0] // batch if local is not None else 0

    def chunk(start: int):  # (view1, view2, small views) of images start .. start + micro_batch
        rows = slice(start, start + micro_batch)
        small = local.unflatten(0, (crops, batch))[:, rows].flatten(0, 1) if crops else None
        return view1[rows], view2[rows], small

    rng = RngReplay(view1.device)
    with torch.no_grad(), buffers_kept(simclr):
        projections = []
        for start in starts:
            rng.mark(start)
            v1, v2, small = chunk(start)
            out = model(v1, v2, project_only=True, local_views=small)
            projections.append((out["z1"], out["z2"], out.get("z_local")))
    after = rng.get()
    z1 = torch.cat([p[0] for p in projections]).requires_grad_()
    z2 = torch.cat([p[1] for p in projections]).requires_grad_()
    cached = [z1, z2]
    if crops:  # each chunk's [K m, p] crop-major -> the batch's [K B, p], crop-major
        cached.append(torch.cat([p[2].unflatten(0, (crops, -1)) for p in projections], dim=1).flatten(0, 1)
                      .requires_grad_())
    loss = simclr.loss(*cached, labels=labels)
    grads = torch.autograd.grad(loss, cached)
    correct = torch.zeros((), dtype=torch.long, device=view1.device)
    statistics = StepStatistics(simclr, len(starts))
    for i, start in enumerate(starts):
        rows = slice(start, start + micro_batch)
        rng.replay(start)
        v1, v2, small = chunk(start)
        with no_sync(model, last=i == len(starts) - 1):
            out = model(v1, v2, None if labels is None else labels[rows], project_only=True, local_views=small)
            outputs, chunk_grads = [out["z1"], out["z2"]], [grads[0][rows], grads[1][rows]]
            if crops:
                outputs.append(out["z_local"])
                chunk_grads.append(grads[2].unflatten(0, (crops, batch))[:, rows].flatten(0, 1))
            if "online_loss" in out:  # a chunk's mean, weighted to make the batch's mean
                outputs.append(out["online_loss"] * (out["z1"].shape[0] / batch))
                chunk_grads.append(torch.ones_like(outputs[-1]))
                correct += out["online_correct"]
            torch.autograd.backward(outputs, chunk_grads)
        statistics.chunk_done()
    statistics.end()
    rng.set(after)  # the RNG continues as after one pass: the same stream whatever the chunk count
    result = {"loss": loss.detach(), "z1": z1.detach(), "z2": z2.detach()}
    if crops:
        result["z_local"] = cached[2].detach()
    if labels is not None and simclr.classifier is not None:
        result["online_correct"] = correct
    return result
