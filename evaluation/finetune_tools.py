"""The fine-tuning toolkit around the step: MixUp/CutMix, label smoothing, gradient clipping and an EMA of the weights
(``configs.schema.FinetuneTrainConfig``), each off by default. Libraries do the work, this is the glue:
torchvision.transforms.v2 mixes, F.cross_entropy smooths (also soft targets), clip_grad_norm_ clips,
torch.optim.swa_utils averages. Layer-wise lr decay for ViTs is in optim.optimizers (timm groups the layers).

Every random choice of a step (mix or not, MixUp or CutMix, lambda, the box) is drawn from a stream seeded by
(seed, step, rank), so a resumed run mixes exactly as an uninterrupted one.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from data.sampler import derived_seed


class BatchMixer:
    """MixUp and/or CutMix of a device batch: images [B, 3, H, W] float, labels [B] int64 -> the mixed images and
    soft targets [B, C] (rows sum to 1), or the batch unchanged with its labels when this step is not mixed."""

    def __init__(self, num_classes: int, *, mixup_alpha: float, cutmix_alpha: float, mix_prob: float = 1.0,
                 switch_prob: float = 0.5, seed: int = 0) -> None:
        from torchvision.transforms import v2  # only when mixing is asked for

        self.mixup = v2.MixUp(alpha=mixup_alpha, num_classes=num_classes) if mixup_alpha > 0 else None
        self.cutmix = v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes) if cutmix_alpha > 0 else None
        self.mix_prob, self.switch_prob, self.seed = mix_prob, switch_prob, seed

    @property
    def enabled(self) -> bool:
        return self.mixup is not None or self.cutmix is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, step: int,
                 rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.enabled:
            return images, labels
        # torchvision draws from the global CPU generator: fork it, seeded by the step, so resuming is exact and the
        # caller's random state is untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derived_seed("finetune-mix", self.seed, step, rank))
            if torch.rand(()).item() >= self.mix_prob:
                return images, labels
            use_cutmix = self.mixup is None or (self.cutmix is not None and torch.rand(()).item() < self.switch_prob)
            return (self.cutmix if use_cutmix else self.mixup)(images, labels)


def classification_loss(logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean cross-entropy of logits [B, C] against labels [B] or soft targets [B, C], with label smoothing (for soft
    targets: the smoothed target is (1 - e) target + e / C, which is what F.cross_entropy does)."""
    if logits.dtype in (torch.float16, torch.bfloat16):  # autocast output: the softmax in fp32
        logits = logits.float()
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """The global L2 norm of the gradients before clipping (a device scalar: no host sync); clipped to ``max_norm``
    when it is > 0."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
    return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)


def weight_average(model: nn.Module, decay: float) -> Optional[AveragedModel]:
    """An exponential moving average of ``model``'s weights and buffers (batch-norm statistics), or None when
    ``decay`` is 0. ``update_parameters(model)`` after each step: the first call copies, then
    ema <- decay x ema + (1 - decay) x weights."""
    if decay <= 0:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
