"""Run under torchrun with 2 CPU processes (gloo) by tests/test_distributed.py; writes one JSON of measurements.

1. The gather alone: NT-Xent on each rank's shard with gather=True, gradients averaged by hand as DDP does, equals
   one process on the whole batch (fp64), for both loss implementations, with several fused blocks per rank.
2. DDP: a small SimCLR model (ResNet-18 width 4 + head, global batch norm) on each rank's half of a batch gives the
   parameter gradients and running statistics of one process on the whole batch (fp64), for each loss impl.
3. Three LARS steps on sharded, augmented uint8 batches end with the weights of one process (fp64: in fp32 the
   gradient at initialization is itself only accurate to ~1e-3, so fp32 runs cannot be compared to 1e-5).
5. The grouped contrastive loss (SupCon, DCL, DCLW) with gather=True: random groups of 1 to 8 views spread over both
   ranks, so the ranks hold different numbers of anchors with a positive; DDP's average equals one process (fp64).
4. Micro-batches and the gather compose: a ViT (no layer mixes samples) whose head has no batch norm, each rank's
   half of the batch in chunks of 2 under DDP, gives the gradients of one process on the whole batch at once.
"""
import copy
import importlib
import json
import sys

import torch

from augment import SimCLRAugment
from core import dist
from optim.optimizers import create_optimizer
from losses import contrastive, nt_xent
from models import SimCLR, create_encoder, projection_head
from models.global_bn import convert_to_global_bn

nt_xent_module = importlib.import_module("losses.nt_xent")
contrastive_module = importlib.import_module("losses.contrastive")


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def gather_checks(rank: int, world: int, results: dict) -> None:
    nt_xent_module.BLOCK_ELEMENTS = 40  # force several blocks in the fused path, with rank offsets
    for impl in ("reference", "fused"):
        for n in (12, 10):  # shards of 6 and 5 pairs
            g = torch.Generator().manual_seed(n)
            weight = torch.randn(16, 8, dtype=torch.float64, generator=g)
            x1, x2 = (torch.randn(n, 16, dtype=torch.float64, generator=g) for _ in range(2))
            whole = weight.clone().requires_grad_()
            loss_whole = nt_xent(x1 @ whole, x2 @ whole, 0.3, impl=impl)
            loss_whole.backward()
            shard = weight.clone().requires_grad_()
            rows = slice(rank * n // world, (rank + 1) * n // world)
            loss_shard = nt_xent(x1[rows] @ shard, x2[rows] @ shard, 0.3, gather=True, impl=impl)
            loss_shard.backward()
            grad = dist.all_reduce_mean(shard.grad)  # what DDP does
            mean_loss = dist.all_reduce_mean(loss_shard.detach())
            results[f"gather/{impl}/n{n}/grad"] = relative(grad, whole.grad)
            results[f"gather/{impl}/n{n}/loss"] = abs(mean_loss.item() - loss_whole.item()) / loss_whole.item()


def contrastive_checks(rank: int, world: int, results: dict) -> None:
    contrastive_module.BLOCK_ELEMENTS = 50  # several blocks per rank in the fused path
    g = torch.Generator().manual_seed(5)
    views = 30
    group = torch.repeat_interleave(torch.arange(8), torch.tensor([1, 8, 3, 2, 5, 1, 4, 6]))[torch.randperm(
        views, generator=g)]
    weight = torch.randn(16, 8, dtype=torch.float64, generator=g)
    x = torch.randn(views, 16, dtype=torch.float64, generator=g)
    rows = slice(rank * views // world, (rank + 1) * views // world)
    for impl in ("reference", "fused"):
        for name, kw in (("supcon", {}), ("dcl", {"decoupled": True}), ("dclw", {"decoupled": True, "dcl_sigma": 0.5})):
            whole = weight.clone().requires_grad_()
            loss_whole = contrastive(x @ whole, group, 0.3, impl=impl, **kw)
            loss_whole.backward()
            shard = weight.clone().requires_grad_()
            loss_shard = contrastive(x[rows] @ shard, group[rows], 0.3, gather=True, impl=impl, **kw)
            loss_shard.backward()
            grad, mean_loss = dist.all_reduce_mean(shard.grad), dist.all_reduce_mean(loss_shard.detach())
            results[f"contrastive/{impl}/{name}/grad"] = relative(grad, whole.grad)
            results[f"contrastive/{impl}/{name}/loss"] = abs(mean_loss.item() - loss_whole.item()) / loss_whole.item()


def ddp_checks(rank: int, world: int, device: torch.device, results: dict) -> None:
    for impl in ("reference", "fused"):
        torch.manual_seed(0)
        encoder = create_encoder("resnet18", 4)
        single = SimCLR(encoder, projection_head(encoder.feature_dim, 16, 8), 0.5, loss_impl=impl).double()
        g = torch.Generator().manual_seed(1)
        v1, v2 = (torch.randn(8, 3, 16, 16, dtype=torch.float64, generator=g) for _ in range(2))
        sharded = convert_to_global_bn(copy.deepcopy(single), device)
        sharded.gather = True
        single(v1, v2)["loss"].backward()  # one process, whole batch, plain batch norm, no gather
        rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
        ddp = dist.wrap_ddp(sharded, device)
        ddp(v1[rows], v2[rows])["loss"].backward()
        results[f"ddp/{impl}/grad"] = max(relative(b.grad, a.grad) for a, b in zip(single.parameters(),
                                                                                     sharded.parameters()))
        buffers = {k: (b, dict(sharded.named_buffers())[k]) for k, b in single.named_buffers() if b.is_floating_point()}
        results[f"ddp/{impl}/running_stats"] = max(((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item()
                                               for a, b in buffers.values())
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", 4)
    single = SimCLR(encoder, projection_head(encoder.feature_dim, 16, 8), 0.5).double()
    sharded = convert_to_global_bn(copy.deepcopy(single), device)
    sharded.gather = True
    images = torch.randint(0, 256, (3, 8, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    train_three_steps(single, images, (0, 1), device)
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    train_three_steps(dist.wrap_ddp(sharded, device), images[:, rows], (rank, world), device)
    a, b = single.state_dict(), sharded.state_dict()
    results["ddp/train/max_abs_weight_diff"] = max((a[k] - b[k]).abs().max().item()
                                                   for k in a if a[k].is_floating_point())


def micro_batch_checks(rank: int, world: int, device: torch.device, results: dict) -> None:
    from training.micro_batch import forward_backward_in_chunks

    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny")
    single = SimCLR(encoder, projection_head(encoder.feature_dim, 32, 16, hidden_bn=False), 0.5).double()
    sharded = copy.deepcopy(single)
    sharded.gather = True
    g = torch.Generator().manual_seed(3)
    v1, v2 = (torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=g) for _ in range(2))
    single(v1, v2)["loss"].backward()
    rows = slice(rank * 8 // world, (rank + 1) * 8 // world)
    ddp = dist.wrap_ddp(sharded, device)
    out = forward_backward_in_chunks(ddp, sharded, v1[rows], v2[rows], micro_batch=2)
    results["micro/grad"] = max(relative(b.grad, a.grad) for a, b in zip(single.parameters(), sharded.parameters()))
    results["micro/loss"] = abs(dist.all_reduce_mean(out["loss"]).item() - single(v1, v2)["loss"].item())


def train_three_steps(model, images, shard, device):
    """Three LARS steps on augmented views of uint8 images (this rank's shard of each global batch)."""
    optimizer = create_optimizer("lars", model.module if hasattr(model, "module") else model, lr=0.5,
                                 weight_decay=1e-6)
    augment = SimCLRAugment()
    for step in range(3):
        v1, v2 = augment(images[step], torch.Generator().manual_seed(100 + step), shard=shard)
        optimizer.zero_grad()
        model(v1.double(), v2.double())["loss"].backward()
        optimizer.step()


def main(out_path: str) -> None:
    device = dist.init_from_env(torch.device("cpu"))
    rank, world = dist.rank(), dist.world_size()
    results = {"world_size": world}
    gather_checks(rank, world, results)
    contrastive_checks(rank, world, results)
    ddp_checks(rank, world, device, results)
    micro_batch_checks(rank, world, device, results)
    if dist.is_main():
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
