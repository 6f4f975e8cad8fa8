"""PNG figures of results (matplotlib, headless)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch


def save_confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path,
                       title: str = "") -> None:
    """Row-normalized confusion matrix (rows = true class) with the percentage in each cell, written atomically."""
    import numpy as np

    plt = _pyplot()

    counts = np.asarray(confusion, dtype=np.float64)
    rates = 100 * counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.0 + 0.6 * len(classes)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=100)
    ticks = range(len(classes))
    ax.set_xticks(ticks, classes, rotation=45, ha="right")
    ax.set_yticks(ticks, classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    for (i, j), rate in np.ndenumerate(rates):
        ax.text(j, i, f"{rate:.0f}", ha="center", va="center", fontsize=7, color="white" if rate > 50 else "black")
    fig.colorbar(image, ax=ax, label="% of true class")
    save_figure(fig, path)


def save_figure(fig, path: Path, dpi: int = 120) -> None:
    """A matplotlib figure as a PNG, written atomically (rename into place), then closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)


def _pyplot():
    import matplotlib  # imported here: a second of start-up that only result writing needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_training_curves(records: Sequence[dict], path: Path, title: str = "") -> None:
    """curves.png of a pretraining run from its metrics.jsonl records: the loss, kNN top-1 (validation; test and the
    online classifier too when logged) and the learning rate against epochs, and kNN top-1 against seconds."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))

    def series(key, x="epoch"):
        points = [(r[x], r[key]) for r in records if isinstance(r.get(key), (int, float)) and x in r]
        return [p[0] for p in points], [p[1] for p in points]

    panels = [(axes[0, 0], ["train/loss"], "epoch", "NT-Xent loss"),
              (axes[0, 1], ["knn/top1", "knn_test/top1", "online/val_top1"], "epoch", "top-1 (%)"),
              (axes[1, 0], ["train/lr"], "epoch", "learning rate"),
              (axes[1, 1], ["knn/top1"], "time/elapsed_s", "kNN top-1 (%)")]
    for ax, keys, x, label in panels:
        for key in keys:
            xs, ys = series(key, x)
            if xs:
                ax.plot(xs, ys, marker="o" if key != "train/loss" and key != "train/lr" else None, markersize=3,
                        label=key)
        ax.set_xlabel("seconds of training" if x == "time/elapsed_s" else "epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(keys) > 1 and ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    save_figure(fig, path)


def save_embedding_map(features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str], path: Path,
                       title: str = "", seed: int = 0) -> None:
    """embedding.png: a t-SNE map (scikit-learn) of features [N, d], one colour per class (labels [N])."""
    from sklearn.manifold import TSNE

    plt = _pyplot()
    x = torch.nn.functional.normalize(features.float().cpu(), dim=1).numpy()  # cosine geometry, as kNN sees it
    perplexity = max(2.0, min(30.0, (len(x) - 1) / 3))
    points = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)
    fig, ax = plt.subplots(figsize=(7, 6))
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    y = labels.cpu().numpy()
    for c, name in enumerate(classes):
        ax.scatter(points[y == c, 0], points[y == c, 1], s=6, color=cmap(c % cmap.N), label=name)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best", ncol=2 if len(classes) > 10 else 1)
    if title:
        ax.set_title(title)
    save_figure(fig, path)


def view_pair_grid(view1: torch.Tensor, view2: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                   pairs: int = 16, pairs_per_row: int = 4) -> torch.Tensor:
    """The first ``pairs`` augmented pairs, each pair side by side, as one uint8 image [H', W', 3] (HWC).

    view1, view2: normalized float views [B, 3, H, W] (any device). Normalization is undone with ``mean``/``std``
    and pixels are rounded to 0..255, so the grid shows what the encoder was given; 2-pixel white borders.
    """
    from torchvision.utils import make_grid

    n = min(pairs, view1.shape[0])
    m, s = (torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1) for v in (mean, std))
    interleaved = torch.stack([view1[:n].float().cpu(), view2[:n].float().cpu()], dim=1).flatten(0, 1)  # a1 b1 a2..
    grid = make_grid((interleaved * s + m).clamp(0, 1), nrow=2 * pairs_per_row, padding=2, pad_value=1.0)
    return grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).contiguous()
