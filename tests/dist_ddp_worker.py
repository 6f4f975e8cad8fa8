"""Run under torchrun with 2 CPU processes (gloo) by tests/test_distributed.py.

A small SimCLR model (ResNet-18 width 4 + head, global batch norm) under DDP with gather=True on each rank's half
of a batch must give the parameter gradients of one process on the whole batch (fp64), for each loss impl; and
three LARS steps on sharded, augmented uint8 batches must end with the weights of one process (fp64: in fp32 the
gradient at initialization is itself only accurate to ~1e-3, so fp32 runs cannot be compared to 1e-5).
"""
import copy
import json
import sys

import torch

from augment import SimCLRAugment
from engine import dist
from engine.optim import create_optimizer
from models import SimCLR, create_encoder, projection_head
from models.global_bn import convert_to_global_bn


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
        worst = 0.0
        for (name, p_single), p_sharded in zip(single.named_parameters(), sharded.parameters()):
            rel = ((p_sharded.grad - p_single.grad).norm() / p_single.grad.norm().clamp(min=1e-30)).item()
            worst = max(worst, rel)
        results[f"{impl}/grad"] = worst
        buffers = {k: (b, dict(sharded.named_buffers())[k]) for k, b in single.named_buffers() if b.is_floating_point()}
        results[f"{impl}/running_stats"] = max(((a - b).abs().max() / a.abs().max().clamp(min=1e-30)).item()
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
    results["train/max_abs_weight_diff"] = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    if dist.is_main():
        with open(out_path, "w") as f:
            json.dump(results, f)
    dist.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
