"""Throughput of the batched SimCLR augmentation against torchvision's per-image PIL pipeline, in one run.

    python bench/augment.py                       # CPU, one thread, batch 512
    python bench/augment.py --device cuda         # batched pipeline on the GPU (baseline stays PIL on CPU)

Prints JSON lines {"what", "shape", "device", "figure", "unit"}; the last line is the speed-up ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from augment import CIFAR10_MEAN, CIFAR10_STD, SimCLRAugment  # noqa: E402


def pil_pipeline():
    """The common public SimCLR CIFAR pipeline: per image, on the CPU, through PIL."""
    import torchvision.transforms as T

    return T.Compose([T.RandomResizedCrop(32, scale=(0.08, 1.0)), T.RandomHorizontalFlip(),
                      T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8), T.RandomGrayscale(p=0.2),
                      T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])


def views_per_s_pil(images: np.ndarray, repeats: int) -> float:
    from PIL import Image

    transform, pil = pil_pipeline(), [Image.fromarray(a) for a in images]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for img in pil:  # two views per image, as in training
            transform(img), transform(img)
        times.append(time.perf_counter() - start)
    return 2 * len(pil) / statistics.median(times)


def views_per_s_batched(images: torch.Tensor, repeats: int) -> float:
    augment, device = SimCLRAugment(), images.device
    g = torch.Generator(device=device).manual_seed(0)
    for _ in range(3):  # warm-up: allocator, kernels
        augment(images, g)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        augment(images, g)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * images.shape[0] / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for both pipelines (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    shape = [args.batch, 3, 32, 32]
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(args.device)
    device_name = torch.cuda.get_device_name() if tensor.device.type == "cuda" else f"cpu x{args.threads} thread"
    pil = views_per_s_pil(images, args.repeats)
    batched = views_per_s_batched(tensor, args.repeats)
    rows = [("augment/pil_per_image", f"cpu x{args.threads} thread", pil, "views/s"),
            ("augment/batched", device_name, batched, "views/s"),
            ("augment/speedup_vs_pil", device_name, batched / pil, "x")]
    for what, device, figure, unit in rows:
        print(json.dumps({"what": what, "shape": shape, "device": device, "figure": round(figure, 2), "unit": unit}))


if __name__ == "__main__":
    main()
