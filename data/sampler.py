"""Batches of indices into a device-resident dataset: a seeded permutation per epoch, the same on every rank."""
from __future__ import annotations

import hashlib
from typing import Iterator

import torch


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple such as ("epoch", seed, epoch): independent streams, no collisions in practice."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seeded_generator(device: torch.device | str, *parts: object) -> torch.Generator:
    """A generator on ``device`` seeded from ``parts`` (e.g. ("augment", seed, step)): random streams keyed by
    the step need no RNG state to resume exactly."""
    return torch.Generator(device=device).manual_seed(derived_seed(*parts))


class EpochSampler:
    """Index batches for one process. Each global batch of ``batch_size`` is split into equal per-rank shards.

    The last incomplete batch of an epoch is dropped, so every step sees a full global batch.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        if batch_size % world_size:
            raise ValueError(f"global batch {batch_size} does not divide by world size {world_size}")
        if batch_size > num_samples:
            raise ValueError(f"batch size {batch_size} exceeds the {num_samples} training images")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, seed
        self.rank, self.local = rank, batch_size // world_size
        self.steps_per_epoch = num_samples // batch_size

    def permutation(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(derived_seed("epoch", self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def batches(self, epoch: int, device: torch.device | str = "cpu", start: int = 0) -> Iterator[torch.Tensor]:
        """This rank's int64 index tensors [batch_size / world_size] for each step of ``epoch`` from step ``start``
        of the epoch on (a run resumed from a mid-epoch checkpoint continues with exactly the batches it missed)."""
        perm = self.permutation(epoch).to(device)
        for step in range(start, self.steps_per_epoch):
            start = step * self.batch_size + self.rank * self.local
            yield perm[start:start + self.local]
