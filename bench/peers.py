"""The peers' real training pipelines, fed to our model, for bench/step.py's baselines.

lightly (lightly >= 1.5, its CIFAR-10 benchmark's SimCLR row, docs/source/getting_started/benchmarks/
cifar10_benchmark.py): ``SimCLRTransform(input_size=32, gaussian_blur=0.0)`` on PIL images in DataLoader workers
(8, the benchmark's ``num_workers``), default collate, two forward passes, ``lightly.loss.NTXentLoss()``.
dkobak (simclr-cifar10.py at 3193950): ``ToTensor`` images through torchvision's per-image transforms
(RandomResizedCrop(32, scale=(0.2, 1)), flip, ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale p=0.2) in 16
workers, two forward passes, his full-matrix ``infoNCE``. Both run as their scripts do: fp32, eager, SGD. Only the
model (ours, the same in every row of a run) differs from their scripts, so the ratios measure pipelines.
"""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PEERS = ("lightly", "dkobak")
WORKERS = {"lightly": 8, "dkobak": 16}


class _PilImages(torch.utils.data.Dataset):
    """HWC uint8 images as PIL images (what a folder dataset or torchvision's CIFAR10 yields), through ``transform``."""

    def __init__(self, images_hwc: np.ndarray, transform: Callable) -> None:
        self.images, self.transform = images_hwc, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), 0


def _dkobak_views():
    import torchvision.transforms as T

    augment = T.Compose([T.RandomResizedCrop(size=32, scale=(0.2, 1)), T.RandomHorizontalFlip(),
                         T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)])
    to_tensor = T.ToTensor()

    def two_views(image):
        x = to_tensor(image)  # his dataset applies ToTensor first; the augmentations then run on tensors
        return [augment(x), augment(x)]
    return two_views


def _dkobak_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """His infoNCE on cat(z1, z2): full cosine matrix, diagonal at -inf, cross-entropy to the other view."""
    x = F.normalize(torch.cat([z1, z2]))
    cos = x @ x.T / temperature
    cos.fill_diagonal_(float("-inf"))
    n = z1.shape[0]
    targets = torch.arange(2 * n, device=cos.device)
    targets[:n] += n
    targets[n:] -= n
    return F.cross_entropy(cos, targets)


def pipeline(peer: str, images_hwc: np.ndarray, batch: int, workers: int | None = None
             ) -> tuple[torch.utils.data.DataLoader, Callable]:
    """(DataLoader of ([view1, view2], label) batches, loss(z1, z2)) of ``peer``; ImportError when its package is
    missing."""
    workers = WORKERS[peer] if workers is None else workers
    if peer == "lightly":
        from lightly.loss import NTXentLoss
        from lightly.transforms import SimCLRTransform

        transform, loss = SimCLRTransform(input_size=32, gaussian_blur=0.0), NTXentLoss()
    else:
        transform, loss = _dkobak_views(), _dkobak_loss
    loader = torch.utils.data.DataLoader(_PilImages(images_hwc, transform), batch_size=batch, shuffle=True,
                                         drop_last=True, num_workers=workers, persistent_workers=workers > 0,
                                         pin_memory=torch.cuda.is_available())
    return loader, loss


def peer_step(encoder: nn.Module, head: nn.Module, device: torch.device, loader: torch.utils.data.DataLoader,
              loss_fn: Callable) -> Callable[[], None]:
    """One training step as the peers run it: next batch -> device -> encoder + head per view -> loss -> backward ->
    SGD (bench/step.py times it on the wall clock)."""
    parameters = list(encoder.parameters()) + list(head.parameters())
    optimizer = torch.optim.SGD(parameters, lr=0.06, momentum=0.9, weight_decay=5e-4)
    batches: Iterator = iter(loader)

    def step() -> None:
        (view1, view2), _ = next(batches)
        view1, view2 = view1.to(device, non_blocking=True), view2.to(device, non_blocking=True)
        optimizer.zero_grad()
        loss = loss_fn(head(encoder(view1)), head(encoder(view2)))
        loss.backward()
        optimizer.step()
    return step
