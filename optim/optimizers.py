"""Optimizers (LARS, SGD, AdamW), parameter groups and the learning-rate schedule."""
from __future__ import annotations

import math
from functools import partial
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from core.names import OPTIMIZERS
from optim.lars import Lars


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


RESTART_WARMUP_SHARE = 0.1  # a restarted segment warms up for at most this share of its steps


def restarted_lr_at(step: int, *, restart_steps: Sequence[int], total_steps: int, warmup_steps: int,
                    **schedule: Any) -> float:
    """:func:`lr_at` run afresh in each segment between restarts: warm-up and cosine over [restart_i, restart_i+1)
    (the last segment ends at total_steps). A restarted segment warms up for warmup_steps but at most a tenth of its
    own steps, so that it anneals however short it is: an extension by no more than the warm-up would otherwise be
    all warm-up and end at the peak lr. The first segment keeps warmup_steps as configured."""
    start = max((r for r in restart_steps if r <= step), default=0)
    end = min((r for r in restart_steps if r > step), default=total_steps)
    if start > 0:
        warmup_steps = min(warmup_steps, int(RESTART_WARMUP_SHARE * (end - start)))
    return lr_at(step - start, total_steps=end - start, warmup_steps=warmup_steps, **schedule)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr`` times the group's own ``lr_scale`` (default 1)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def param_groups(model: nn.Module, weight_decay: float, *, decay_norm_bias: bool = False,
                 own_groups: Optional[Mapping[str, dict[str, Any]]] = None) -> list[dict[str, Any]]:
    """Weights of convs and linears (decayed, LARS-adapted), and biases, norm parameters and ViT position/class
    tokens (no decay, no LARS adaptation, as in the SimCLR and BYOL recipes; ``decay_norm_bias`` puts them in the
    decayed group instead, as plain ``SGD(model.parameters(), weight_decay=...)`` does in dkobak's and lightly's code).

    own_groups: parameter-name prefix -> options of a group of its own (e.g. ``{"classifier.": {"weight_decay": 0.0,
    "lr_scale": 2.0}}``); those parameters join no other group. Their 1-d parameters (biases) form a twin group that
    LARS never adapts, as solo-learn's LARS excludes biases and norms. Empty groups are left out.
    """
    own_groups = dict(own_groups or {})
    decay, no_decay, own = [], [], {prefix: [] for prefix in own_groups}
    skip = set()
    for name, module in model.named_modules():  # timm models list tokens that must not be decayed
        if hasattr(module, "no_weight_decay"):
            skip |= {f"{name}.{n}" if name else n for n in module.no_weight_decay()}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        prefix = next((prefix for prefix in own_groups if name.startswith(prefix)), None)
        if prefix is not None:
            own[prefix].append(p)
        else:
            (no_decay if (p.ndim <= 1 or name in skip) and not decay_norm_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "always_adapt": True},
              {"params": no_decay, "weight_decay": 0.0, "always_adapt": False}]
    for prefix, params in own.items():
        options = {"weight_decay": 0.0, "always_adapt": False, **own_groups[prefix]}
        groups += [{**options, "params": [p for p in params if p.ndim > 1]},
                   {**options, "always_adapt": False, "params": [p for p in params if p.ndim <= 1]}]
    return [g for g in groups if g["params"]]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """Layer-wise lr decay for a ViT classifier (``model.encoder`` a timm ViT, ``model.head`` a new head): timm's
    groups of the encoder, block i (from 0) of L scaled by layer_decay^(L - 1 - i), the stem by layer_decay^L, through
    each group's ``lr_scale`` (which
    :func:`set_lr` applies), no decay on 1-d parameters and tokens; the head at the full lr, its bias undecayed."""
    from timm.optim import param_groups_layer_decay

    encoder = model.encoder
    if not hasattr(encoder, "group_matcher"):
        raise ValueError(f"layer-wise lr decay needs a ViT encoder, not {type(encoder).__name__}")
    groups = param_groups_layer_decay(encoder, weight_decay, no_weight_decay_list=encoder.no_weight_decay(),
                                      layer_decay=layer_decay)
    head = [p for p in model.head.parameters() if p.requires_grad]
    groups += [{"params": [p for p in head if p.ndim > 1], "weight_decay": weight_decay, "lr_scale": 1.0},
               {"params": [p for p in head if p.ndim <= 1], "weight_decay": 0.0, "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def create_optimizer(name: str, model: nn.Module, *, lr: float, weight_decay: float, momentum: float = 0.9,
                     nesterov: bool = False, decay_norm_bias: bool = False,
                     own_groups: Optional[Mapping[str, dict[str, Any]]] = None, trust_coeff: float = 1e-3,
                     trust_clip: bool = False, layer_decay: float = 1.0) -> torch.optim.Optimizer:
    """LARS (:class:`optim.lars.Lars`: timm's update), SGD (momentum, optionally Nesterov) or AdamW, over
    :func:`param_groups` (or, with ``layer_decay`` < 1, :func:`layer_decay_groups`).

    LARS adapts exactly the groups marked ``always_adapt`` (the decayed one), also when weight_decay is 0, with
    local lr trust_coeff x |w| / |g|, clipped at the global lr when ``trust_clip`` (LARC).
    """
    if layer_decay < 1:
        groups = [{**g, "always_adapt": g["weight_decay"] > 0} for g in
                  layer_decay_groups(model, weight_decay, layer_decay)]
    else:
        groups = param_groups(model, weight_decay, decay_norm_bias=decay_norm_bias, own_groups=own_groups)
    if name == "lars":
        return Lars(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coeff=trust_coeff,
                    trust_clip=trust_clip)
    for g in groups:
        g.pop("always_adapt")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def optimizer_and_schedule(optim, model: nn.Module, *, batch_size: int, epochs: int, steps_per_epoch: int,
                           restarts: Sequence[int] = (), **options: Any) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    """The optimizer an ``OptimConfig`` describes over ``model`` and its lr schedule, a pure function of the step:
    linear warm-up to optim.base_lr x batch_size / 256, then cosine to optim.min_lr_ratio of it. ``options`` go to
    :func:`create_optimizer` (own_groups, trust_coeff, ...). ``restarts`` (epochs) start the schedule again
    (:func:`restarted_lr_at`)."""
    peak = effective_lr(optim.base_lr, batch_size)
    options.setdefault("layer_decay", getattr(optim, "layer_decay", 1.0))  # FinetuneOptimConfig has one
    optimizer = create_optimizer(optim.name, model, lr=peak, weight_decay=optim.weight_decay, momentum=optim.momentum,
                                 nesterov=optim.nesterov, decay_norm_bias=optim.decay_norm_bias, **options)
    schedule = partial(restarted_lr_at, restart_steps=[r * steps_per_epoch for r in restarts], peak_lr=peak,
                       warmup_steps=round(optim.warmup_epochs * steps_per_epoch), total_steps=epochs * steps_per_epoch,
                       min_lr=optim.min_lr_ratio * peak)
    return optimizer, schedule
