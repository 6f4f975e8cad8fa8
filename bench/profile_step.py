"""Where the time of one compiled training step goes: a torch.profiler trace of pretrain.py's step, summarized.

    python bench/profile_step.py --out profile.txt                      # CUDA: ResNet-18, batch 512, bf16, compiled
    python bench/profile_step.py --device cpu --quick --out profile.txt  # CPU plumbing check

Prints JSON lines: ``profile/step_ms`` (wall clock per profiled step), ``profile/kernels_per_step``,
``profile/gpu_busy`` (% of the profiled span in which some kernel ran: the rest are launch gaps and host work),
``profile/top_kernel`` (the five kernels with the most device time, their share) and ``profile/next_lever``, a
reading of those figures (large gaps: CUDA graphs / fewer small kernels; a large optimizer share: a fused or compiled
optimizer step; otherwise the convolutions themselves). ``--out`` gets the profiler's table, top 30 by device time.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.step import Setup, emit  # noqa: E402

GAP_LEVER_BUSY = 85.0  # % busy below which launch gaps are the first thing to remove
OPTIMIZER_LEVER_SHARE = 10.0  # % of kernel time in optimizer kernels above which the optimizer step is next


def kernel_intervals(trace: Path) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every device kernel in a Chrome trace written by torch.profiler."""
    events = json.loads(trace.read_text()).get("traceEvents", [])
    return [(e["ts"], e["ts"] + e["dur"], e.get("name", "")) for e in events
            if e.get("cat") == "kernel" and "dur" in e]


def busy_fraction(intervals: list[tuple[float, float, str]]) -> float:
    """% of the span from the first kernel's start to the last one's end during which some kernel ran."""
    merged_busy, current_end = 0.0, None
    span_start, span_end = min(i[0] for i in intervals), max(i[1] for i in intervals)
    for start, end, _ in sorted(intervals):
        if current_end is None or start > current_end:
            merged_busy += end - start
            current_end = end
        elif end > current_end:
            merged_busy += end - current_end
            current_end = end
    return 100.0 * merged_busy / max(span_end - span_start, 1e-9)


def next_lever(busy: float, optimizer_share: float) -> str:
    if busy < GAP_LEVER_BUSY:
        return (f"launch gaps: the GPU idles {100 - busy:.0f}% of the step; CUDA graphs (torch.compile "
                "mode='reduce-overhead') or fewer, larger kernels")
    if optimizer_share > OPTIMIZER_LEVER_SHARE:
        return f"the optimizer step ({optimizer_share:.0f}% of kernel time): a fused or compiled optimizer step"
    return "the model's own kernels (convolutions): the step is compute-bound; larger batches or a leaner model"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--compile", default="on", choices=["on", "off"])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps")
    parser.add_argument("--quick", action="store_true", help="CPU check: width 8, batch 32, fp32, eager, 2 + 2 steps")
    parser.add_argument("--out", type=Path, default=None, help="write the profiler's table here")
    args = parser.parse_args()
    args.width, args.workers = None, 0
    if args.quick:
        args.width, args.batch, args.precision, args.compile, args.warmup, args.steps = 8, 32, "fp32", "off", 2, 2
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    images = torch.randint(0, 256, (8 * args.batch, 3, 32, 32), dtype=torch.uint8, device=device)
    setup = Setup(args, args.arch, args.batch, args.precision, args.compile == "on", images)
    for _ in range(args.warmup):
        setup.step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    shape, settings = [args.batch, 3, 32, 32], {"arch": args.arch, "precision": args.precision, "compile": args.compile}
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            setup.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds = (time.perf_counter() - start) / args.steps
    emit("profile/step_ms", 1000 * seconds, "ms", shape, name, **settings)
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=30, max_name_column_width=80)
    if args.out:
        args.out.write_text(f"{name}, {settings}, batch {args.batch}, {args.steps} steps\n{table}\n")
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        intervals = kernel_intervals(trace)
    if not intervals:
        emit("profile/gpu_busy", None, "%", shape, name, skipped="no device kernels in the trace (CPU run)",
             **settings)
        return
    total = sum(end - begin for begin, end, _ in intervals)
    per_kernel: dict[str, float] = {}
    for begin, end, kernel in intervals:
        per_kernel[kernel] = per_kernel.get(kernel, 0.0) + end - begin
    optimizer = sum(t for k, t in per_kernel.items() if "foreach" in k or "multi_tensor" in k or "sgd" in k.lower())
    busy = busy_fraction(intervals)
    emit("profile/kernels_per_step", len(intervals) / args.steps, "kernels", shape, name, **settings)
    emit("profile/gpu_busy", busy, "%", shape, name, kernel_ms_per_step=total / 1000 / args.steps, **settings)
    for kernel, t in sorted(per_kernel.items(), key=lambda kv: -kv[1])[:5]:
        emit("profile/top_kernel", 100 * t / total, "% of kernel time", shape, name, kernel=kernel[:120], **settings)
    emit("profile/next_lever", None, "", shape, name, reading=next_lever(busy, 100 * optimizer / total),
         optimizer_share=round(100 * optimizer / total, 2), **settings)


if __name__ == "__main__":
    main()
