"""Deterministic, class-balanced subsets: the validation split, training caps and (later) label fractions.

Each class's samples are put in one seeded random order. A subset of k per class is a prefix of that order,
so subsets drawn with the same seed are nested and identical across runs and machines.
"""
from __future__ import annotations

from typing import Tuple

import torch

from core.errors import UserError


def class_ranks(labels: torch.Tensor, seed: int) -> torch.Tensor:
    """rank[i]: position of sample i in its class's seeded shuffle. labels: int64 [N] -> int64 [N]."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(labels.numel(), generator=g)
    # Stable sort by label of a random permutation = per-class random order.
    by_class = order[torch.sort(labels[order], stable=True).indices]
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts
    ranks = torch.empty_like(labels)
    ranks[by_class] = torch.arange(labels.numel()) - starts[labels[by_class]]
    return ranks


def balanced_counts(total: int, num_classes: int) -> torch.Tensor:
    """``total`` spread over classes as evenly as possible (the first classes take the remainder)."""
    counts = torch.full((num_classes,), total // num_classes, dtype=torch.int64)
    counts[: total % num_classes] += 1
    return counts


def split_train_val(labels: torch.Tensor, val_size: int, train_limit: int = 0, seed: int = 0
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) of the training and validation samples.

    ``val_size`` samples, class-balanced, are held out; ``train_limit`` > 0 caps the rest, class-balanced too.
    """
    num_classes = int(labels.max()) + 1
    class_sizes = torch.bincount(labels, minlength=num_classes)
    val_counts = balanced_counts(val_size, num_classes)
    if bool((val_counts >= class_sizes).any()):
        raise UserError(f"data.val_size={val_size} leaves no training images in some class "
                        f"(class sizes {class_sizes.tolist()})")
    ranks = class_ranks(labels, seed)
    is_val = ranks < val_counts[labels]
    is_train = ~is_val
    if train_limit > 0:
        is_train &= (ranks - val_counts[labels]) < balanced_counts(train_limit, num_classes)[labels]
    return is_train.nonzero().squeeze(1), is_val.nonzero().squeeze(1)


def balanced_subset(labels: torch.Tensor, count: int, seed: int = 0) -> torch.Tensor:
    """Indices (ascending) of ``count`` samples, class-balanced (a class with too few gives all it has), in the
    seeded per-class order: labels int64 [N] -> int64 [<= count]. For checks that must see every class (an export's
    calibration and test images), where the first ``count`` of an image folder would all be one class."""
    if count >= labels.numel():
        return torch.arange(labels.numel())
    per_class = balanced_counts(count, int(labels.max()) + 1)
    return (class_ranks(labels, seed) < per_class[labels]).nonzero().squeeze(1)


def split_labeled(labels: torch.Tensor, val_size: int, label_fraction: float = 1.0, train_limit: int = 0,
                  seed: int = 0, val_share: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Indices (ascending) of the labeled training subset and of the validation split.

    The subset holds ``round(label_fraction x len(labels))`` images, class-balanced, taken from the training split
    (so 1% of CIFAR-10 is 500 images, 50 per class), capped by what the split holds and by ``train_limit``. Subsets
    for the same ``seed`` are identical across runs and nested: the 1% subset lies inside the 10% one.
    ``val_share`` > 0: the fraction is drawn from all the images instead (``val_size`` unused) and a class-balanced
    share of it is the validation split, so selecting on it uses no label beyond the fraction.
    """
    if not 0 < label_fraction <= 1:
        raise UserError(f"label fraction {label_fraction} is outside (0, 1]")
    limit = 0 if label_fraction == 1 else max(1, round(label_fraction * labels.numel()))
    if train_limit > 0:
        limit = min(limit, train_limit) if limit else train_limit
    if not val_share:
        return split_train_val(labels, val_size, limit, seed)
    labeled, _ = split_train_val(labels, 0, limit, seed)
    num_classes = int(labels.max()) + 1
    if bool((torch.bincount(labels[labeled], minlength=num_classes) < 2).any()):
        raise UserError(f"eval.val_share_of_labels={val_share}: the labeled fraction holds fewer than 2 images of "
                        "some class, none to spare for validation; raise eval.label_fraction")
    per_class = torch.bincount(labels[labeled], minlength=num_classes)
    val_per_class = (per_class.double() * val_share).round().long().clamp(1, None).minimum(per_class - 1)
    ranks = class_ranks(labels[labeled], seed + 1)  # an order of its own, independent of the fraction's
    is_val = ranks < val_per_class[labels[labeled]]
    return labeled[~is_val], labeled[is_val]
