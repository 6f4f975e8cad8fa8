"""Optimizers (LARS from timm, SGD, AdamW), parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def effective_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: base_lr x global batch / 256."""
    return base_lr * global_batch / 256


def lr_at(step: int, *, peak_lr: float, warmup_steps: int, total_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 to peak_lr over warmup_steps, then cosine decay to min_lr at total_steps.

    A pure function of the step, so resuming needs no scheduler state.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights of convs and linears (decayed, LARS-adapted), and biases, norm parameters and ViT
    position/class tokens (no decay, no LARS adaptation), as in the SimCLR and BYOL recipes."""
    decay, no_decay = [], []
    skip = set()
    for name, module in model.named_modules():  # timm models list tokens that must not be decayed
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{name}.{n}" if name else n for n in module.no_weight_decay()}
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay, "always_adapt": True},
            {"params": no_decay, "weight_decay": 0.0, "always_adapt": False}]


def create_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float, momentum: float = 0.9,
                     nesterov: bool = False) -> torch.optim.Optimizer:
    """LARS (timm; trust coefficient 1e-3), SGD (momentum, optionally Nesterov) or AdamW, over :func:`param_groups`.

    LARS adapts exactly the decayed group (``always_adapt`` per group), also when weight_decay is 0.
    """
    groups = param_groups(model, weight_decay)
    if name == "lars":
        from timm.optim import Lars  # timm loads only when LARS is used (after engine.tracking.keep_wandb_out)

        return Lars(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=1e-3)
    for g in groups:
        g.pop("always_adapt")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}")
