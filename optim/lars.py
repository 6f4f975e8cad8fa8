"""LARS (You et al., 2017) with LARC clipping as an option: SGD with momentum whose update of each adapted tensor is
scaled by trust_coeff x |w| / (|g| + weight_decay x |w|).

The same multi-tensor update as timm's ``timm.optim.Lars`` (tests/test_optim.py checks them equal step by step),
written out because importing timm (and with it torchvision) adds 2.7 s to ``import torch`` on a 2-core CPU, paid
by every torchrun worker and evaluation; without timm and torchvision a tiny pretraining run takes 8.1 s, not 10.0.
Parameter-group options and state (``momentum_buffer``) are named as timm's, so checkpoints move between the two.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

import torch


class Lars(torch.optim.Optimizer):
    """LARS over ``params`` (tensors or groups). A group is adapted when its weight_decay is non-zero or its
    ``always_adapt`` is set; trust_clip caps the local lr at the global one (LARC). Tensors whose weight or gradient
    norm is 0 are not scaled."""

    def __init__(self, params: Iterable[Any], lr: float = 1.0, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, trust_coeff: float = 1e-3, eps: float = 1e-8,
                 trust_clip: bool = False, always_adapt: bool = False, foreach: Optional[bool] = None) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"LARS needs lr, momentum and weight_decay >= 0, not {lr}, {momentum}, {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        trust_coeff=trust_coeff, eps=eps, trust_clip=trust_clip, always_adapt=always_adapt,
                        foreach=foreach)  # foreach: kept for timm's state dicts; the update is always multi-tensor
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(group, params)
        return loss

    def _update(self, group: dict, params: list[torch.Tensor]) -> None:
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        if weight_decay != 0 or group["always_adapt"]:
            w_norms, g_norms = torch._foreach_norm(params), torch._foreach_norm(grads)
            ratios = self._trust_ratios(w_norms, g_norms, group)
            grads = torch._foreach_add(grads, params, alpha=weight_decay)  # a copy: p.grad stays as it was
            torch._foreach_mul_(grads, ratios)
        if momentum != 0:
            buffers = [self.state[p].get("momentum_buffer") for p in params]
            old = [i for i, b in enumerate(buffers) if b is not None]
            if old:
                old_buffers = [buffers[i] for i in old]
                torch._foreach_mul_(old_buffers, momentum)
                torch._foreach_add_(old_buffers, [grads[i] for i in old], alpha=1 - group["dampening"])
            for i, (p, b) in enumerate(zip(params, buffers)):
                if b is None:
                    buffers[i] = self.state[p]["momentum_buffer"] = grads[i].clone().detach()
            grads = torch._foreach_add(grads, buffers, alpha=momentum) if group["nesterov"] else buffers
        torch._foreach_add_(params, grads, alpha=-lr)

    @staticmethod
    def _trust_ratios(w_norms: list[torch.Tensor], g_norms: list[torch.Tensor], group: dict) -> list[torch.Tensor]:
        """Per tensor trust_coeff |w| / (|g| + wd |w| + eps), 1 where |w| or |g| is 0, with trust_clip min(ratio / lr,
        1); 0-d tensors, computed stacked (a few kernels per device and dtype, not a few per tensor)."""
        ratios: list[Optional[torch.Tensor]] = [None] * len(w_norms)
        by_kind: dict = {}
        for i, w in enumerate(w_norms):
            by_kind.setdefault((w.device, w.dtype), []).append(i)
        for index in by_kind.values():
            w, g = torch.stack([w_norms[i] for i in index]), torch.stack([g_norms[i] for i in index])
            ratio = group["trust_coeff"] * w / (g + w * group["weight_decay"] + group["eps"])
            ratio = torch.where(w > 0, torch.where(g > 0, ratio, 1.0), 1.0)
            if group["trust_clip"]:
                ratio = torch.clamp(ratio / group["lr"], max=1.0)
            for i, r in zip(index, ratio.unbind(0)):
                ratios[i] = r
        return ratios
