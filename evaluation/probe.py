"""Linear probe: multinomial logistic regression on frozen encoder features.

One classifier per weight decay of the grid, all trained together as a batched weight [G, d, C] on the same
mini-batches (each classifier's gradient depends on its own weights only, so this equals G separate runs). The
weight decay is chosen on the validation split; the test split is scored once, by the chosen classifier.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from data.sampler import derived_seed, seeded_generator
from evaluation.accuracy import topk_accuracy
from optim.optimizers import lr_at, set_lr

FeatureFn = Callable[[torch.Tensor, int], torch.Tensor]  # (indices [B], step) -> standardized features [B, d]


@dataclass
class LinearProbes:
    """G linear classifiers on standardized features: logits_g = ((x - mean) / std) @ weight[g].T + bias[g]."""

    weight: torch.Tensor  # [G, C, d], nn.Linear's layout per classifier
    bias: torch.Tensor  # [G, C]
    mean: torch.Tensor  # [d]
    std: torch.Tensor  # [d]
    weight_decays: list[float] = field(default_factory=list)

    @torch.no_grad()
    def logits(self, features: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """features [N, d] -> logits float32 [G, N, C]."""
        out = [_batched_logits(self._standardize(features[i:i + chunk]), self.weight, self.bias)
               for i in range(0, features.shape[0], chunk)]
        return torch.cat(out, dim=1)

    def select(self, index: int) -> "LinearProbes":
        return LinearProbes(self.weight[index:index + 1], self.bias[index:index + 1], self.mean, self.std,
                            [self.weight_decays[index]])

    def folded_head(self, index: int = 0) -> torch.nn.Linear:
        """Classifier ``index`` as one nn.Linear on raw features (the standardization folded into it):
        x @ (W / std).T + (b - (W / std) @ mean) equals :meth:`logits` [index]."""
        weight = self.weight[index] / self.std  # [C, d]
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], device=weight.device)
        with torch.no_grad():
            head.weight.copy_(weight)
            head.bias.copy_(self.bias[index] - weight @ self.mean)
        return head

    def _standardize(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


def _batched_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x [N, d], weight [G, C, d], bias [G, C] -> [G, N, C] as one linear layer of G C outputs (x is read once)."""
    groups, classes, dim = weight.shape
    logits = F.linear(x, weight.reshape(groups * classes, dim), bias.reshape(-1))
    return logits.view(-1, groups, classes).transpose(0, 1)


def feature_stats(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-dimension mean and std [d] of features [N, d]; constant dimensions get std 1 (no division by zero)."""
    features = features.float()
    std = features.std(dim=0)
    return features.mean(dim=0), torch.where(std > 1e-6, std, torch.ones_like(std))


def train_probes(features_of: FeatureFn, labels: torch.Tensor, *, num_classes: int, mean: torch.Tensor,
                 std: torch.Tensor, weight_decays: Sequence[float], epochs: int, batch_size: int, lr: float,
                 seed: int) -> LinearProbes:
    """Train one classifier per weight decay with SGD (Nesterov momentum 0.9, cosine lr to 0, no warm-up).

    features_of(idx, step) gives the features of samples ``idx`` already standardized with ``mean`` and ``std``
    (rows of a standardized matrix, or an augmented forward pass), float [B, d]; labels: int64 [N] on the
    features' device. The loss of classifier g is the mean cross-entropy plus wd_g / 2 x ||W_g||^2 (the bias is
    not decayed). The returned probes standardize raw features themselves.
    """
    device, n, dim, groups = labels.device, labels.numel(), mean.numel(), len(weight_decays)
    g = torch.Generator().manual_seed(derived_seed("probe-init", seed))
    # Zero init would make every classifier start identical; a small random start breaks symmetry the usual way.
    # One [G C, d] matrix: a single linear layer computes all classifiers (nn.Linear's layout is also the faster
    # one for the weight gradient on CPUs).
    weight = (torch.randn(groups * num_classes, dim, generator=g) / math.sqrt(dim)).to(device).requires_grad_()
    bias = torch.zeros(groups * num_classes, device=device, requires_grad=True)
    decay = torch.tensor(list(weight_decays), dtype=torch.float32, device=device).repeat_interleave(num_classes)
    optimizer = torch.optim.SGD([weight, bias], lr=lr, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = torch.randperm(n, generator=seeded_generator("cpu", "probe-epoch", seed, epoch)).to(device)
        for i, idx in enumerate(order.split(batch_size)):
            step = epoch * steps_per_epoch + i
            logits = F.linear(features_of(idx, step), weight, bias).view(-1, num_classes)  # [B G, C]
            # Sum over classifiers of each one's mean cross-entropy, plus each one's L2 penalty.
            ce = F.cross_entropy(logits, labels[idx].repeat_interleave(groups), reduction="sum") / len(idx)
            loss = ce + 0.5 * (decay * weight.pow(2).sum(dim=1)).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            set_lr(optimizer, lr_at(step, peak_lr=lr, warmup_steps=0, total_steps=total))
            optimizer.step()
    return LinearProbes(weight.detach().view(groups, num_classes, dim), bias.detach().view(groups, num_classes), mean,
                        std, list(weight_decays))


@dataclass
class ProbeSelection:
    """The classifier chosen on validation and what the choice was based on."""

    probe: LinearProbes  # one classifier
    weight_decay: float
    val_top1: Optional[float]  # of the chosen classifier, trained without the validation images
    val_top1_by_wd: dict[str, float]


def select_on_val(probes: LinearProbes, val_features: Optional[torch.Tensor],
                  val_labels: Optional[torch.Tensor]) -> ProbeSelection:
    """Pick the weight decay with the best validation top-1; ties go to the stronger decay (more regularized).

    Without a validation split there is nothing to choose from: the grid must hold one value.
    """
    if val_features is None or val_features.shape[0] == 0:
        if len(probes.weight_decays) != 1:
            raise ValueError("choosing the weight decay needs a validation split")
        return ProbeSelection(probes, probes.weight_decays[0], None, {})
    logits = probes.logits(val_features)
    scores = [topk_accuracy(logits[i], val_labels) for i in range(logits.shape[0])]
    best = max(range(len(scores)), key=lambda i: (scores[i], probes.weight_decays[i]))
    by_wd = {f"{wd:g}": s for wd, s in zip(probes.weight_decays, scores)}
    return ProbeSelection(probes.select(best), probes.weight_decays[best], scores[best], by_wd)
