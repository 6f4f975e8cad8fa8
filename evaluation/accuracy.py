"""Classification scores from class scores or logits: top-k accuracy, confusion matrix, per-class accuracy."""
from __future__ import annotations

from typing import Sequence

import torch


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Percent of rows whose label is among the k highest scores. scores: [N, C], labels: int64 [N].

    Ties go to the lower class index (a stable sort; ``topk`` promises no order among equal scores), as argmax and
    scikit-learn do: majority-vote kNN scores are small integers and tie often."""
    k = min(k, scores.shape[1])
    top = scores.argsort(dim=1, descending=True, stable=True)[:, :k]
    hits = (top == labels[:, None]).any(dim=1)
    return round(100.0 * hits.double().mean().item(), 4)


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 [C, C]: entry [t, p] counts samples of true class t predicted as p. Both inputs int64 [N]."""
    flat = labels.long().cpu() * num_classes + predictions.long().cpu()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_report(scores: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                          prefix: str = "test") -> dict:
    """``{prefix}/top1``, ``{prefix}/top5`` (percent), ``{prefix}/per_class`` ({class: percent}) and
    ``{prefix}/confusion`` (rows = true class, as nested lists) from scores [N, C] and labels [N]."""
    confusion = confusion_matrix(scores.argmax(dim=1), labels, len(classes))
    per_class = 100.0 * confusion.diag().double() / confusion.sum(dim=1).clamp(min=1).double()
    return {
        f"{prefix}/top1": topk_accuracy(scores, labels, 1),
        f"{prefix}/top5": topk_accuracy(scores, labels, 5),
        f"{prefix}/per_class": {name: round(acc, 4) for name, acc in zip(classes, per_class.tolist())},
        f"{prefix}/confusion": confusion.tolist(),
    }
