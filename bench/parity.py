"""Parity harness: does pretrain.py learn what a classic, peer-style SimCLR pipeline learns from the same recipe?

    python bench/parity.py --device cpu --quick          # narrow ResNet-18, 10,000 images, 3 seeds (~22 min, 2 cores)
    python bench/parity.py --device cuda --epochs 100 --train-images 45000 --width 64 --batch 512 --seeds 0 1 2
    python bench/parity.py --device cpu --quick --swap augment     # the classic pipeline with our augmentation
    python bench/parity.py --device cpu --quick --pipelines ours chunks --micro-batch 32   # micro-batches' cost

Both pipelines train the same encoder (``models.create_encoder``) with the same recipe (default: dkobak's,
``configs/pretrain/kobak_resnet18.yaml``, scaled down by the flags) on the same images (the training split of the
shared CIFAR-10 archive, class-balanced subset), with the same seeds:

- ours: ``pretrain.main`` itself (device-resident uint8 data, batched augmentation, our head, loss and optimizer);
- classic: written here from scratch the way dkobak's and lightly's scripts do it: per-image torchvision transforms on
  PIL images in DataLoader workers, a Sequential head, a textbook InfoNCE, ``torch.optim.SGD`` with a cosine
  ``LambdaLR`` stepped per step, a plain loop.

Both encoders are then scored by the same kNN on the held-out validation images (bank: the training images; weighted
k=200, T=0.1 as the figure; dkobak's k=10 majority vote beside it). ``--swap`` replaces one classic component with
ours (augment, loss, head, optimizer), to find which component differs when the two disagree. The ``chunks``
pipeline is ours with ``train.micro_batch=--micro-batch``: batch norm per chunk, so the two views of an image share
statistics their negatives in other chunks do not; ``--pipelines ours chunks`` measures what that costs.

Prints JSON lines: ``parity/knn_init`` (the untrained encoder), ``parity/knn_<pipeline>`` for each pipeline (``seed``,
``figure`` in %, settings), then ``parity/summary``: means, sample standard deviations, the difference of the first
two pipelines and ``within_spread`` = |difference| <= 2 x the pooled seed-to-seed standard deviation.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from augment import NORMALIZATIONS, SimCLRAugment  # noqa: E402
from bench.jsonl import emit  # noqa: E402
from configs.load import load_config  # noqa: E402
from configs.schema import PretrainConfig  # noqa: E402
from data import load_source, split_train_val  # noqa: E402
from rundir.checkpoint import read_encoder  # noqa: E402
from evaluation.knn import extract_features, knn_top1  # noqa: E402
from optim.optimizers import create_optimizer, lr_at, set_lr  # noqa: E402
from losses import nt_xent  # noqa: E402
from models import create_encoder, projection_head  # noqa: E402

ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
SWAPS = ("augment", "loss", "head", "optimizer")
# --quick: what 2 CPU cores do in under 30 minutes for 3 seeds x 2 pipelines (narrow ResNet-18, 10,000 images).
QUICK = dict(width=8, train_images=10000, val_images=2000, epochs=8, batch=128, base_lr=0.25)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help=f"the CPU setting: {QUICK} (explicit flags win)")
    p.add_argument("--recipe", default=str(REPO / "configs/pretrain/kobak_resnet18.yaml"))
    p.add_argument("--data", default=str(ARCHIVE), help="image-folder archive or directory (data.name=folder)")
    p.add_argument("--cache-dir", default="~/.cache/simclr/decoded")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--train-images", type=int, default=45000, help="class-balanced subset of the training split")
    p.add_argument("--val-images", type=int, default=5000, help="held out of train: the kNN queries")
    p.add_argument("--width", type=int, default=64, help="ResNet base width (64 = standard)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--base-lr", type=float, default=None, help="optim.base_lr (default: the recipe's)")
    p.add_argument("--precision", default=None, help="train.precision for both (default: the recipe's)")
    p.add_argument("--workers", type=int, default=None, help="classic DataLoader workers (default: CPU count, <= 16)")
    p.add_argument("--swap", choices=SWAPS, action="append", default=[], help="use our component in the classic run")
    p.add_argument("--pipelines", nargs="+", choices=("ours", "classic", "chunks"), default=["ours", "classic"])
    p.add_argument("--micro-batch", type=int, default=32, help="train.micro_batch of the chunks pipeline")
    p.add_argument("--out", default=None, help="also append the JSON lines to this file")
    if "--quick" in (sys.argv[1:] if argv is None else argv):  # new defaults; flags given explicitly still win
        p.set_defaults(**QUICK)
    return p.parse_args(argv)


def recipe_config(args: argparse.Namespace, seed: int, run_dir: Path) -> tuple[PretrainConfig, list[str]]:
    """The recipe scaled by the flags, and the pretrain.py command line that runs exactly it (the classic pipeline
    reads the same config)."""
    overrides = [f"seed={seed}", f"device={args.device}", "data.name=folder", f"data.root={args.data}",
                 f"data.cache_dir={args.cache_dir}", f"data.train_limit={args.train_images}",
                 f"data.val_size={args.val_images}", f"model.width={args.width}", f"train.epochs={args.epochs}",
                 f"train.batch_size={args.batch}", "train.log_every=1000000", "eval.knn_every=0",
                 "wandb.mode=disabled", f"run.dir={run_dir}", f"run.name=ours-s{seed}", "run.ckpt_every=1000000"]
    overrides += [f"optim.base_lr={args.base_lr}"] if args.base_lr is not None else []
    overrides += [f"train.precision={args.precision}"] if args.precision else []
    return load_config(["--config", args.recipe, *overrides]), ["--config", args.recipe, *overrides]


# ---------------------------------------------------------------------------------------------- ours: pretrain.py


def train_ours(argv: list[str], run_dir: Path, name: Optional[str] = None) -> nn.Module:
    """pretrain.main with the recipe's command line; its console output goes to stderr (stdout is JSON lines)."""
    import pretrain

    with contextlib.redirect_stdout(sys.stderr):
        pretrain.main([*argv, f"run.dir={run_dir}"])
    source = read_encoder(str(run_dir / name if name else next(run_dir.iterdir())))
    encoder = create_encoder(source.arch, source.width)
    encoder.load_state_dict(source.state)
    return encoder


# ---------------------------------------------------------------------------------------------- classic pipeline


class TwoViews(torch.utils.data.Dataset):
    """uint8 images [N, 3, H, W] as PIL images, each returned as two independently transformed views."""

    def __init__(self, images: torch.Tensor, transform) -> None:
        self.images, self.transform = images.permute(0, 2, 3, 1).contiguous().numpy(), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.images[i])
        return self.transform(image), self.transform(image)


class Indices(torch.utils.data.Dataset):
    """Image indices only, for the ``--swap augment`` variant (our batched augmentation runs on the batch)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def torchvision_views(cfg: PretrainConfig):
    """The SimCLR CIFAR transform as the peers write it (torchvision v1 transforms on PIL images)."""
    import torchvision.transforms as T

    if cfg.aug.blur_prob or cfg.aug.solarize_prob or not cfg.aug.crop:
        raise SystemExit("error: the classic pipeline implements the CIFAR recipes only (crop on, no blur, no "
                         "solarization)")
    s = cfg.aug.strength
    steps = [T.RandomResizedCrop(32, scale=(cfg.aug.min_scale, 1.0)), T.RandomHorizontalFlip(),
             T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=cfg.aug.jitter_prob),
             T.RandomGrayscale(p=cfg.aug.gray_prob), T.ToTensor()]
    if cfg.aug.normalize != "none":
        steps.append(T.Normalize(*NORMALIZATIONS[cfg.aug.normalize]))
    return T.Compose(steps)


def textbook_head(cfg: PretrainConfig, in_dim: int) -> nn.Sequential:
    layers, dim = [], in_dim
    hidden = cfg.model.proj_hidden_dim or in_dim
    for _ in range(cfg.model.proj_layers - 1):
        layers += [nn.Linear(dim, hidden, bias=not cfg.model.proj_bn)]
        layers += [nn.BatchNorm1d(hidden), nn.ReLU()] if cfg.model.proj_bn else [nn.ReLU()]
        dim = hidden
    layers += [nn.Linear(dim, cfg.model.proj_dim, bias=not cfg.model.proj_out_bn)]
    layers += [nn.BatchNorm1d(cfg.model.proj_dim)] if cfg.model.proj_out_bn else []
    return nn.Sequential(*layers)


def textbook_info_nce(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """z: [2n, d], rows i and i + n are the two views of image i (dkobak's infoNCE)."""
    x = F.normalize(z.float(), dim=1)
    logits = x @ x.T / temperature
    logits.fill_diagonal_(float("-inf"))
    n = z.shape[0] // 2
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)


def classic_model(cfg: PretrainConfig, swap: list[str]) -> nn.Sequential:
    """Our encoder (the thing both pipelines train) and a head: built here, or ours with ``--swap head``."""
    encoder = create_encoder(cfg.model.arch, cfg.model.width)
    if "head" in swap:
        head = projection_head(encoder.feature_dim, cfg.model.proj_hidden_dim or encoder.feature_dim,
                               cfg.model.proj_dim, cfg.model.proj_layers, hidden_bn=cfg.model.proj_bn,
                               out_bn=cfg.model.proj_out_bn)
    else:
        head = textbook_head(cfg, encoder.feature_dim)
    return nn.Sequential(encoder, head)


def classic_loader(cfg: PretrainConfig, images: torch.Tensor, args: argparse.Namespace, seed: int):
    """Shuffled, last batch dropped (as pretrain.py does): pairs of PIL-transformed views in worker processes, or
    image indices only for ``--swap augment``."""
    if "augment" in args.swap:
        return torch.utils.data.DataLoader(Indices(len(images)), batch_size=cfg.train.batch_size, shuffle=True,
                                           drop_last=True, generator=torch.Generator().manual_seed(seed))
    workers = args.workers if args.workers is not None else min(16, torch.multiprocessing.cpu_count())
    return torch.utils.data.DataLoader(TwoViews(images, torchvision_views(cfg)), batch_size=cfg.train.batch_size,
                                       shuffle=True, drop_last=True, num_workers=workers,
                                       persistent_workers=workers > 0, pin_memory=args.device.startswith("cuda"),
                                       generator=torch.Generator().manual_seed(seed))


def classic_optimizer(cfg: PretrainConfig, model: nn.Module, steps_per_epoch: int, swap: list[str]):
    """(optimizer, advance): ``advance(step)`` sets the lr for that step. Classic: torch SGD over one or two groups
    and a cosine LambdaLR; ``--swap optimizer``: ours (optim.optimizers) with lr_at."""
    if cfg.optim.name != "sgd":
        raise SystemExit("error: the classic pipeline implements SGD recipes only")
    peak = cfg.optim.base_lr * cfg.train.batch_size / 256
    total, warmup = cfg.train.epochs * steps_per_epoch, round(cfg.optim.warmup_epochs * steps_per_epoch)
    if "optimizer" in swap:
        optimizer = create_optimizer(cfg.optim.name, model, lr=peak, weight_decay=cfg.optim.weight_decay,
                                     momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov,
                                     decay_norm_bias=cfg.optim.decay_norm_bias)
        schedule = partial(lr_at, peak_lr=peak, warmup_steps=warmup, total_steps=total)
        return optimizer, lambda step: set_lr(optimizer, schedule(step))
    params = list(model.parameters())
    if cfg.optim.decay_norm_bias:  # SGD(model.parameters(), weight_decay=...), as dkobak and lightly write it
        groups = [{"params": params}]
    else:
        groups = [{"params": [p for p in params if p.ndim > 1]},
                  {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]
    optimizer = torch.optim.SGD(groups, lr=peak, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay,
                                nesterov=cfg.optim.nesterov)

    def cosine(t: int) -> float:  # factor of the peak lr at step t
        if t < warmup:
            return (t + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (t - warmup) / max(1, total - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)  # sets the lr of step 0 now
    return optimizer, lambda step: scheduler.step() if step else None


def train_classic(cfg: PretrainConfig, images: torch.Tensor, args: argparse.Namespace, seed: int) -> nn.Module:
    """A plain loop over a DataLoader of per-image torchvision views; ``args.swap`` puts our components in place."""
    device = torch.device(args.device)
    torch.manual_seed(seed)
    model = classic_model(cfg, args.swap).to(device)
    loader = classic_loader(cfg, images, args, seed)
    optimizer, advance = classic_optimizer(cfg, model, len(loader), args.swap)
    mean, std = NORMALIZATIONS[cfg.aug.normalize]
    ours = SimCLRAugment(cfg.aug.strength, cfg.aug.min_scale, cfg.aug.jitter_prob, cfg.aug.gray_prob, mean=mean,
                         std=std)
    device_images = images.to(device) if "augment" in args.swap else None
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.train.precision == "bf16" \
        else contextlib.nullcontext()
    model.train()
    step = 0
    for _ in range(cfg.train.epochs):
        for batch in loader:
            if device_images is not None:
                view1, view2 = ours(device_images[batch.to(device)])
            else:
                view1, view2 = (v.to(device, non_blocking=True) for v in batch)
            with autocast:
                if cfg.model.forward_views == "separate":  # the peers' way: one forward pass per view
                    z = torch.cat([model(view1), model(view2)])
                else:
                    z = model(torch.cat([view1, view2]))
            loss = nt_xent(*z.chunk(2), cfg.loss.temperature) if "loss" in args.swap \
                else textbook_info_nce(z, cfg.loss.temperature)
            optimizer.zero_grad()
            loss.backward()
            advance(step)
            optimizer.step()
            step += 1
        if not math.isfinite(loss.item()):
            raise SystemExit(f"error: the classic pipeline's loss became {loss.item()}")
    return model[0]


# ---------------------------------------------------------------------------------------------- scoring


def score(encoder: nn.Module, cfg: PretrainConfig, splits: dict, device: torch.device) -> dict:
    """kNN top-1 (%) of the validation images against the training images, both ways of voting."""
    mean, std = NORMALIZATIONS[cfg.aug.normalize]
    encoder = encoder.to(device)
    bank = extract_features(encoder, splits["train_images"].to(device), mean=mean, std=std)
    queries = extract_features(encoder, splits["val_images"].to(device), mean=mean, std=std)
    vote = dict(bank=bank, bank_labels=splits["train_labels"].to(device), queries=queries,
                query_labels=splits["val_labels"].to(device), num_classes=10)
    return {"figure": knn_top1(**vote, k=200, temperature=0.1),
            "knn10_majority": knn_top1(**vote, k=10, vote="majority")}


def summary(rows: list[dict], pipelines: tuple[str, ...] = ("ours", "classic")) -> dict:
    """Means, sample standard deviations and whether the difference of the first two pipelines lies within the
    seed-to-seed spread."""
    values = {name: [r["figure"] for r in rows if r["what"] == f"parity/knn_{name}"] for name in pipelines}
    out = {"what": "parity/summary"}
    for name, figures in values.items():
        if figures:
            out[f"{name}_mean"] = round(statistics.fmean(figures), 3)
            out[f"{name}_std"] = round(statistics.stdev(figures), 3) if len(figures) > 1 else None
    if len(pipelines) > 1 and all(len(values[name]) > 1 for name in pipelines[:2]):
        a, b = (values[name] for name in pipelines[:2])
        pooled = math.sqrt((statistics.variance(a) * (len(a) - 1) + statistics.variance(b) * (len(b) - 1))
                           / (len(a) + len(b) - 2))
        difference = statistics.fmean(a) - statistics.fmean(b)
        out.update({"difference": round(difference, 3), "pooled_std": round(pooled, 3),
                    "within_spread": abs(difference) <= 2 * pooled,
                    "criterion": f"|mean {pipelines[0]} - mean {pipelines[1]}| <= 2 x pooled seed std"})
    return out


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    device = torch.device(args.device)
    rows = []
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        cfg, _ = recipe_config(args, args.seeds[0], Path(tmp))
        data = load_source("folder", args.data, cache_dir=args.cache_dir)
        train_idx, val_idx = split_train_val(data.train_labels, cfg.data.val_size, cfg.data.train_limit,
                                             cfg.data.split_seed)
        splits = {"train_images": data.train_images[train_idx], "train_labels": data.train_labels[train_idx],
                  "val_images": data.train_images[val_idx], "val_labels": data.train_labels[val_idx]}
        settings = {"recipe": Path(args.recipe).name, "epochs": args.epochs, "train_images": len(train_idx),
                    "val_images": len(val_idx), "width": args.width, "batch": args.batch,
                    "base_lr": cfg.optim.base_lr, "precision": cfg.train.precision, "swap": args.swap,
                    "device": str(device), "shape": [args.batch, 3, 32, 32]}
        for seed in args.seeds:
            cfg, argv_ours = recipe_config(args, seed, Path(tmp) / f"s{seed}")
            torch.manual_seed(seed)
            init = score(create_encoder(cfg.model.arch, cfg.model.width), cfg, splits, device)
            rows.append({"what": "parity/knn_init", "seed": seed, **init, **settings})
            emit(rows[-1], args.out)
            for pipeline in args.pipelines:
                tick = time.perf_counter()
                if pipeline == "ours":
                    encoder = train_ours(argv_ours, Path(tmp) / f"s{seed}")
                elif pipeline == "chunks":
                    chunked = [*argv_ours, f"train.micro_batch={args.micro_batch}", f"run.name=chunks-s{seed}"]
                    encoder = train_ours(chunked, Path(tmp) / f"c{seed}", f"chunks-s{seed}")
                else:
                    encoder = train_classic(cfg, splits["train_images"], args, seed)
                seconds = round(time.perf_counter() - tick, 1)
                rows.append({"what": f"parity/knn_{pipeline}", "seed": seed, **score(encoder, cfg, splits, device),
                             "seconds": seconds, **settings})
                emit(rows[-1], args.out)
    emit(summary(rows, tuple(args.pipelines)), args.out)
    return rows


if __name__ == "__main__":
    main()
