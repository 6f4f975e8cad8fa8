"""PNG figures of results (matplotlib, headless)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch


def save_confusion_png(confusion: Sequence[Sequence[int]], classes: Sequence[str], path: Path,
                       title: str = "") -> None:
    """Row-normalized confusion matrix (rows = true class) with the percentage in each cell, written atomically."""
    import matplotlib  # imported here: a second of start-up that only result writing needs

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

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
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


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
