"""The embedding statistics behind pretrain.py's collapse check, measured on finished (or initial) pretraining runs.

For each run directory: its checkpoints/last.pt (or, with --init, the same architecture at initialization), one
batch of two augmented views of its training images (seeded), and losses.diagnostics.embedding_stats on the
projections in train mode, as the run logs them (train/erank, train/neg_cos, train/z_std). JSON lines
{"what": "collapse/<stat>", "run", "shape", "device", "figure"}; the kNN the run ended with beside them.

    python bench/collapse.py runs/*/ [--init] [--batch 256] [--out bench/results/cpu_collapse.jsonl]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import yaml  # noqa: E402

from bench.jsonl import emit  # noqa: E402
from configs.load import from_dict  # noqa: E402
from configs.schema import PretrainConfig  # noqa: E402
from data import seeded_generator  # noqa: E402
from rundir.checkpoint import last_checkpoint, load_file, load_strict  # noqa: E402
from training.pretraining import build_augment, build_model, load_splits  # noqa: E402
from losses.diagnostics import embedding_stats  # noqa: E402


def measure(run_dir: Path, init: bool, batch: int) -> dict:
    """embedding_stats of one seeded batch of the run's training views (0-dim values as floats)."""
    cfg = from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), PretrainConfig)
    device = torch.device("cpu")
    splits, images = load_splits(cfg, device)
    model = build_model(cfg, device, image_size=images.shape[-1])
    if not init:
        load_strict(model, load_file(last_checkpoint(run_dir))["model"], "checkpoint")
    augment = build_augment(cfg, splits, images.shape[-1])
    picked = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:batch]]
    v1, v2 = augment(picked, seeded_generator(device, "augment", 0, 0))
    model.train()
    with torch.no_grad():
        out = model(v1, v2, project_only=True)
    return {k: float(v) for k, v in embedding_stats(out["z1"], out["z2"]).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--init", action="store_true", help="the runs' architectures at initialization")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    for run_dir in args.runs:
        stats = measure(run_dir, args.init, args.batch)
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").is_file() else {}
        for name, value in stats.items():
            emit({"what": f"collapse/{name}", "run": run_dir.name, "init": args.init, "shape": [args.batch, 2],
                  "device": "cpu", "figure": round(value, 4), "knn_top1": summary.get("knn/top1")}, args.out)


if __name__ == "__main__":
    main()
