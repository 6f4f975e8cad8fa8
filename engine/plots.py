"""PNG figures of results (matplotlib, headless)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


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
