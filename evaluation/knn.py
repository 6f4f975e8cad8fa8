"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018), used to monitor pretraining."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from augment.ops import normalize
from core import dist
from core.device import autocast


@torch.no_grad()
def extract_features(encoder: nn.Module, images: torch.Tensor, *, mean, std, batch_size: int = 1024,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Outputs of ``encoder`` (features, or a classifier's logits) for uint8 images [N, 3, H, W] on its device,
    in eval mode -> float32 [N, d]. The module's training mode is restored afterwards."""
    was_training = encoder.training
    encoder.eval()
    out = []
    if not len(images):  # an empty split (data.val_size=0): [0, d], d from one forward on a blank image
        images = torch.zeros((1, *images.shape[1:]), dtype=images.dtype, device=images.device)
        batch_size, keep = 1, 0
    else:
        keep = images.shape[0]
    for start in range(0, images.shape[0], batch_size):
        x = normalize(images[start:start + batch_size].float().div_(255), mean, std)
        x = x.double() if dtype == torch.float64 else x
        with autocast(x.device, dtype):
            out.append(encoder(x).float())
    encoder.train(was_training)
    return torch.cat(out)[:keep]


def extract_features_sharded(encoder: nn.Module, images: torch.Tensor, **kw) -> torch.Tensor:
    """:func:`extract_features` with the images split over the processes of a torchrun job and the features
    gathered back (every rank gets all [N, d], in order); the same as :func:`extract_features` in one process."""
    world = dist.world_size()
    if world == 1:
        return extract_features(encoder, images, **kw)
    n = images.shape[0]
    per_rank = -(-n // world)
    # all_gather needs equal shapes: the last rank's share is padded by repeating the final image, dropped after.
    own = torch.arange(dist.rank() * per_rank, (dist.rank() + 1) * per_rank, device=images.device).clamp_(max=n - 1)
    return dist.all_gather_cat(extract_features(encoder, images[own], **kw))[:n]


VOTES = ("weighted", "majority")


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, *, num_classes: int,
                k: int = 200, temperature: float = 0.1, vote: str = "weighted", chunk: int = 1024) -> torch.Tensor:
    """Class scores [Q, C] from each query's k most cosine-similar bank rows.

    vote: "weighted" (Wu et al. 2018; lightly's and solo-learn's monitor): each neighbour adds exp(similarity / T)
    to its class; "majority": each adds 1 (scikit-learn's ``KNeighborsClassifier(k, metric="cosine")``, dkobak's
    protocol; ties go to the lowest class index, as there). bank: [M, d], bank_labels: int64 [M], queries: [Q, d].
    """
    if vote not in VOTES:
        raise ValueError(f"unknown kNN vote {vote!r}; choose one of {', '.join(VOTES)}")
    bank = F.normalize(bank.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, queries.shape[0], chunk):  # bounds memory at chunk x M similarities
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sims, idx = (q @ bank.T).topk(k, dim=1)
        weights = (sims / temperature).exp() if vote == "weighted" else torch.ones_like(sims)
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        scores.append(votes.scatter_add_(1, bank_labels[idx], weights))
    return torch.cat(scores)


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             **kw) -> float:
    """Top-1 accuracy in percent of :func:`knn_predict` on labeled queries."""
    pred = knn_predict(bank, bank_labels, queries, **kw).argmax(dim=1)
    return round(100.0 * (pred == query_labels).double().mean().item(), 4)
