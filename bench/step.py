"""Throughput of the whole SimCLR pretraining step, of its stages, and of the common DataLoader pipeline, in one run.

    python bench/step.py                               # CUDA: resnet18/resnet50/vit_tiny x batch 256/512/1024
                                                       #   x fp32/bf16 x compile off/on, baseline at each setting
    python bench/step.py --archs resnet18 --batches 512 --precisions bf16 --compile on
    python bench/step.py --device cpu --quick          # small CPU run: narrow ResNet-18, batch 32, a few steps

"Ours" is ``training.pretraining.train_step``, what pretrain.py runs (uint8 images resident on the device -> batched
augmentation -> encoder + head + NT-Xent -> backward -> optimizer), with the model, optimizer and compilation built
as pretrain.py builds them. Stages are timed on their own: augmentation, forward + backward, the loss alone (forward + backward on the
embeddings), the optimizer step. The baseline is the common public pipeline: torchvision per-image PIL transforms
(two views) in DataLoader workers, pinned host batches copied to the device, then the same model, step and optimizer.
Device time comes from CUDA events after warm-up and compilation (wall clock on CPU).

MFU: the model FLOPs of one training view (forward + backward, counted by ``torch.utils.flop_counter`` on the eager
model, not written by hand) x views/s over the device's peak dense rate for the precision (bf16; TF32 for fp32 on
CUDA, since cuDNN runs fp32 convolutions in TF32): the vendor's data-sheet figure for known GPUs, else the rate of a
large matmul measured in this run (always so on CPU), named in ``peak_source``.

Micro-batches (``--micro-batch M``): the same step in chunks of M images with cached projection gradients
(train.micro_batch), its views/s and peak memory beside the whole batch's: ``step/micro_batch``,
``memory/peak_whole``, ``memory/peak_micro_batch`` and their ratio (peak device memory on CUDA; on CPU the peak
resident memory a fresh process gains while it runs the steps).

Peer baselines (``--peers``, bench/peers.py): lightly's and dkobak's actual pipelines (their transforms, collate,
DataLoader workers and loss) feeding the same model; skipped with the reason when a package is missing.

Prints JSON lines {"what", "shape", "device", "figure", "unit", ...settings}; "step/speedup_vs_dataloader" and
"step/speedup_vs_<peer>" are ours over the baseline, both measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from augment import SimCLRAugment  # noqa: E402
from bench import peers  # noqa: E402
from bench.augment import pil_pipeline  # noqa: E402
from configs.load import load_config  # noqa: E402
from configs.schema import PretrainConfig  # noqa: E402
from optim.optimizers import create_optimizer  # noqa: E402
from losses import nt_xent  # noqa: E402
from training.pretraining import StepContext, build_model, forward_backward, train_step  # noqa: E402

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Dense tensor-core peaks, TFLOP/s, from NVIDIA's data sheets (no sparsity); fp32 = TF32 (cuDNN's default for
# convolutions). Matched against torch.cuda.get_device_name(); "H100 PCIe" before "H100".
PEAK_TFLOPS = (("H100 PCIe", {"bf16": 756.0, "fp32": 378.0}), ("H100", {"bf16": 989.4, "fp32": 494.7}),
               ("H200", {"bf16": 989.4, "fp32": 494.7}), ("A100", {"bf16": 312.0, "fp32": 156.0}))


class Timer:
    """Seconds of device work between start() and stop(): CUDA events on a GPU, the wall clock on a CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.begin.record()
        else:
            self.begin = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.begin.elapsed_time(self.end) / 1000
        return time.perf_counter() - self.begin


def seconds_per_call(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Mean seconds of ``fn`` over ``steps`` back-to-back calls, after ``warmup`` calls (compilation included)."""
    for _ in range(warmup):
        fn()
    timer = Timer(device)
    timer.start()
    for _ in range(steps):
        fn()
    return timer.stop() / steps


class Setup:
    """Model, optimizer and augmentation for one (arch, batch, precision, compile) setting, built as pretrain.py
    builds them; ``images`` are uint8 [N, 3, 32, 32] resident on the device."""

    def __init__(self, args: argparse.Namespace, arch: str, batch: int, precision: str, compile_: bool,
                 images: torch.Tensor, micro_batch: int = 0) -> None:
        overrides = [f"model.arch={arch}", f"train.batch_size={batch}", f"train.precision={precision}"]
        if args.width and arch.startswith("resnet"):
            overrides.append(f"model.width={args.width}")
        self.cfg = load_config(overrides, PretrainConfig)
        self.device, self.dtype, self.batch, self.images = images.device, PRECISIONS[precision], batch, images
        torch.manual_seed(0)
        self.model = build_model(self.cfg, self.device, self.dtype)
        self.optimizer = create_optimizer(self.cfg.optim.name, self.model, lr=0.1,
                                          weight_decay=self.cfg.optim.weight_decay, momentum=self.cfg.optim.momentum)
        self.augment = SimCLRAugment()
        self.step_fn = self.model
        if compile_:
            self.step_fn = torch.compile(self.model)
            self.augment.compile()
        self.ctx = StepContext(self.step_fn, self.optimizer, self.augment, self.device, self.dtype,
                               micro_batch=micro_batch, simclr=self.model)
        self.generator = torch.Generator(device=self.device).manual_seed(0)

    def batch_indices(self) -> torch.Tensor:
        return torch.randint(0, len(self.images), (self.batch,), device=self.device, generator=self.generator)

    def step(self) -> None:
        """pretrain.py's training step on a random batch."""
        train_step(self.ctx, self.images[self.batch_indices()], self.generator, 0.1)

    def views(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.augment(self.images[self.batch_indices()], self.generator)

    def forward_backward(self, view1: torch.Tensor, view2: torch.Tensor) -> None:
        forward_backward(self.ctx, view1, view2)

    def stage_seconds(self, warmup: int, steps: int) -> dict[str, float]:
        """Seconds per step of each stage, timed on its own."""
        view1, view2 = self.views()
        z1, z2 = (torch.randn(self.batch, self.cfg.model.proj_dim, device=self.device, requires_grad=True)
                  for _ in range(2))
        loss_fn = torch.compile(nt_xent) if self.step_fn is not self.model else nt_xent

        def loss_step():
            loss_fn(z1, z2, self.cfg.loss.temperature).backward()

        self.forward_backward(view1, view2)  # gradients exist, so the optimizer stage does real work
        return {"augment": seconds_per_call(self.views, self.device, warmup, steps),
                "forward_backward": seconds_per_call(lambda: self.forward_backward(view1, view2), self.device,
                                                     warmup, steps),
                "loss": seconds_per_call(loss_step, self.device, warmup, steps),
                "optimizer": seconds_per_call(self.optimizer.step, self.device, warmup, steps)}


def peak_memory_bytes(setup: "Setup", steps: int) -> int:
    """Peak memory of ``steps`` training steps of ``setup`` (after one warm-up step): CUDA's peak allocation, or on
    CPU the resident memory the process gains over its size before the steps (the peak reset through
    /proc/self/clear_refs; in a fresh process per setting, :func:`cpu_peak_memory_bytes`, so no allocator cache of
    an earlier setting hides memory)."""
    setup.step()
    if setup.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(setup.device)
        base = torch.cuda.memory_allocated(setup.device)
        for _ in range(steps):
            setup.step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(setup.device) - base
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak resident size (VmHWM) to the current
        f.write("5")
    start = _status_kib("VmRSS")
    for _ in range(steps):
        setup.step()
    return (_status_kib("VmHWM") - start) * 1024


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cpu_peak_memory_bytes(settings: dict, micro_batch: int, steps: int) -> int:
    """:func:`peak_memory_bytes` of one CPU setting, measured in a fresh interpreter (``--memory-child``)."""
    import subprocess

    spec = json.dumps({**settings, "micro_batch": micro_batch, "steps": steps})
    out = subprocess.run([sys.executable, __file__, "--device", "cpu", "--memory-child", spec], capture_output=True,
                         text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def memory_child(args: argparse.Namespace) -> None:
    spec = json.loads(args.memory_child)
    args.width = spec["width"]
    images = torch.randint(0, 256, (2 * spec["batch"], 3, 32, 32), dtype=torch.uint8)
    setup = Setup(args, spec["arch"], spec["batch"], spec["precision"], spec["compile"] == "on", images,
                  micro_batch=spec["micro_batch"])
    print(peak_memory_bytes(setup, spec["steps"]))


def time_micro_batch(args: argparse.Namespace, setup: "Setup", ours: float, shape: list, device_name: str,
                     settings: dict) -> None:
    """The same setting in chunks of --micro-batch images: views/s, and peak memory beside the whole batch's."""
    chunked = Setup(args, setup.cfg.model.arch, setup.batch, settings["precision"], settings["compile"] == "on",
                    setup.images, micro_batch=args.micro_batch)
    seconds = seconds_per_call(chunked.step, setup.device, args.warmup, args.steps)
    emit("step/micro_batch", 2 * setup.batch / seconds, "views/s", shape, device_name, ms=1000 * seconds,
         micro_batch=args.micro_batch, slowdown=round(seconds / ours, 3), **settings)
    steps = max(2, min(args.steps, 5))
    if setup.device.type == "cuda":
        whole, micro = (peak_memory_bytes(s, steps) for s in (setup, chunked))
    else:
        whole, micro = (cpu_peak_memory_bytes(settings, m, steps) for m in (0, args.micro_batch))
    emit("memory/peak_whole", whole / 2 ** 20, "MiB", shape, device_name, **settings)
    emit("memory/peak_micro_batch", micro / 2 ** 20, "MiB", shape, device_name, micro_batch=args.micro_batch,
         **settings)
    emit("memory/micro_batch_over_whole", micro / max(whole, 1), "x", shape, device_name,
         micro_batch=args.micro_batch, **settings)


def flops_per_view(setup: "Setup") -> float:
    """Model FLOPs of one training view: matmuls and convolutions of forward + backward on the eager model, counted
    by torch.utils.flop_counter over one step of 2 x batch views."""
    from torch.utils.flop_counter import FlopCounterMode

    view1, view2 = setup.views()
    eager = StepContext(setup.model, setup.optimizer, setup.augment, setup.device, setup.dtype)
    with FlopCounterMode(display=False) as counter:
        forward_backward(eager, view1, view2)
    setup.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops() / (2 * setup.batch)


def peak_flops(device: torch.device, precision: str, device_name: str) -> tuple[float, str]:
    """(peak FLOP/s, where the figure comes from) for MFU: the data sheet for known GPUs, else a measured matmul."""
    if device.type == "cuda":
        for name, peaks in PEAK_TFLOPS:
            if name in device_name:
                return peaks[precision] * 1e12, f"data sheet ({name}, dense {precision})"
    size = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(size, size, device=device, dtype=PRECISIONS[precision]) for _ in range(2))
    seconds = seconds_per_call(lambda: a @ b, device, warmup=2, steps=5)
    return 2 * size ** 3 / seconds, f"measured {size}x{size} {precision} matmul"


class TwoViewsPerImage(torch.utils.data.Dataset):
    """The baseline's dataset: HWC uint8 images (as torchvision's CIFAR10 holds them), two PIL-pipeline views."""

    def __init__(self, images_hwc: np.ndarray) -> None:
        self.images, self.transform = images_hwc, pil_pipeline()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        from PIL import Image

        image = Image.fromarray(self.images[i])
        return self.transform(image), self.transform(image)


def baseline_seconds(setup: Setup, images_hwc: np.ndarray, workers: int, warmup: int, steps: int) -> float:
    """Seconds per step of the same model, step and optimizer fed by a DataLoader with ``workers`` workers."""
    cuda = setup.device.type == "cuda"
    loader = torch.utils.data.DataLoader(TwoViewsPerImage(images_hwc), batch_size=setup.batch, shuffle=True,
                                         drop_last=True, num_workers=workers, pin_memory=cuda,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None)
    batches: Iterator = iter(loader)

    def step() -> None:
        view1, view2 = (v.to(setup.device, non_blocking=True) for v in next(batches))
        setup.optimizer.zero_grad(set_to_none=True)
        setup.forward_backward(view1, view2)
        setup.optimizer.step()

    return wall_seconds_per_call(step, setup.device, warmup, steps)


def wall_seconds_per_call(fn: Callable[[], object], device: torch.device, warmup: int, steps: int) -> float:
    """Mean wall-clock seconds of ``fn`` after ``warmup`` calls, the device drained before and after: for pipelines
    whose host work (data loading) is the point of the comparison, which device events would not see."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def time_peer(peer: str, setup: "Setup", images_hwc: np.ndarray, args: argparse.Namespace, ours: float, shape: list,
              device_name: str, settings: dict) -> None:
    """One peer's pipeline on this setting's model (fp32, eager, as their scripts run) and our ratio to it."""
    try:
        loader, loss_fn = peers.pipeline(peer, images_hwc, setup.batch, args.peer_workers)
    except ImportError as err:
        emit(f"step/peer_{peer}", None, "views/s", shape, device_name, skipped=f"{err.name or err} not installed",
             **settings)
        return
    encoder, head = setup.model.encoder, setup.model.head
    seconds = wall_seconds_per_call(peers.peer_step(encoder, head, setup.device, loader, loss_fn), setup.device,
                                    args.warmup, args.steps)
    workers = loader.num_workers
    emit(f"step/peer_{peer}", 2 * setup.batch / seconds, "views/s", shape, device_name, ms=1000 * seconds,
         workers=workers, peer_precision="fp32", peer_compile="off", **settings)
    emit(f"step/speedup_vs_{peer}", seconds / ours, "x", shape, device_name, **settings)


def emit(what: str, figure: float | None, unit: str, shape: list, device: str, **settings) -> None:
    print(json.dumps({"what": what, "shape": shape, "device": device,
                      "figure": None if figure is None else round(figure, 3), "unit": unit, **settings}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50", "vit_tiny"])
    parser.add_argument("--batches", nargs="+", type=int, default=[256, 512, 1024])
    parser.add_argument("--precisions", nargs="+", choices=sorted(PRECISIONS), default=["fp32", "bf16"])
    parser.add_argument("--compile", nargs="+", choices=["off", "on"], default=["off", "on"])
    parser.add_argument("--width", type=int, default=None, help="ResNet base width (default: the architecture's)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1),
                        help="baseline DataLoader workers (default: the CPU count, at most 16)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the DataLoader baseline")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage timings")
    parser.add_argument("--peers", nargs="*", choices=peers.PEERS, default=list(peers.PEERS),
                        help="peer pipelines to time (default: both; none: --peers with no names)")
    parser.add_argument("--peer-workers", type=int, default=None,
                        help="DataLoader workers of the peers (default: theirs, lightly 8, dkobak 16)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="also time each setting in chunks of this many images, with peak memory (0: off)")
    parser.add_argument("--quick", action="store_true",
                        help="small run: resnet18 width 8, batch 32, fp32, eager, 2 + 5 steps, 2 workers (peers: 0)")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args)
        return
    if args.quick:
        args.archs, args.batches, args.precisions, args.compile = ["resnet18"], [32], ["fp32"], ["off"]
        args.width, args.warmup, args.steps, args.workers = args.width or 8, 2, 5, min(args.workers, 2)
        args.peer_workers = 0 if args.peer_workers is None else args.peer_workers  # no worker start-up
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"cpu x{torch.get_num_threads()} threads"
    # Random pixels cost the augmentations what photos cost; enough images that the baseline never re-reads one.
    count = (args.warmup + args.steps + 2) * max(args.batches)
    images_hwc = np.random.default_rng(0).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    images = torch.from_numpy(images_hwc).permute(0, 3, 1, 2).contiguous().to(device)
    for arch in args.archs:
        for batch in args.batches:
            for precision in args.precisions:
                for compile_ in args.compile:
                    shape = [batch, 3, 32, 32]
                    settings = {"arch": arch, "batch": batch, "precision": precision, "compile": compile_,
                                "width": args.width if arch.startswith("resnet") else None}
                    setup = Setup(args, arch, batch, precision, compile_ == "on", images)
                    ours = seconds_per_call(setup.step, device, args.warmup, args.steps)
                    emit("step/ours", 2 * batch / ours, "views/s", shape, device_name, ms=1000 * ours, **settings)
                    if args.micro_batch:
                        time_micro_batch(args, setup, ours, shape, device_name, settings)
                    flops = flops_per_view(setup)
                    peak, source = peak_flops(device, precision, device_name)
                    emit("step/model_gflop_per_view", flops / 1e9, "GFLOP", shape, device_name, **settings)
                    emit("step/mfu", 100 * flops * 2 * batch / ours / peak, "%", shape, device_name,
                         peak_tflops=float(f"{peak / 1e12:.4g}"), peak_source=source, **settings)
                    if not args.no_stages:
                        for stage, seconds in setup.stage_seconds(args.warmup, args.steps).items():
                            emit(f"stage/{stage}", 2 * batch / seconds, "views/s", shape, device_name,
                                 ms=1000 * seconds, **settings)
                    if not args.no_baseline:
                        base = baseline_seconds(setup, images_hwc, args.workers, args.warmup, args.steps)
                        emit("step/dataloader_baseline", 2 * batch / base, "views/s", shape, device_name,
                             ms=1000 * base, workers=args.workers, **settings)
                        emit("step/speedup_vs_dataloader", base / ours, "x", shape, device_name, **settings)
                    for peer in args.peers:
                        time_peer(peer, setup, images_hwc, args, ours, shape, device_name, settings)
                    del setup
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
