"""Time and peak memory of a contrastive loss's forward + backward: reference (full matrix) vs fused (blocked).

    python bench/loss.py                                  # NT-Xent on CPU, 2N in {2048, 8192, 16384, 65536}, d = 128
    python bench/loss.py --device cuda
    python bench/loss.py --group-size 10 --views 4096 16384   # losses.contrastive, views in groups of 10 (SupCon)

On CUDA every measurement runs in this one process (peak memory: max_memory_allocated, reset before each, after a
warm-up call that compiles the Triton kernels); on CPU each runs in a fresh subprocess (peak RSS). JSON lines
{"what", "shape", "device", "figure", "unit"}; ratios fused/reference come last for sizes where both ran.
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(impl: str, views: int, dim: int, device: str, repeats: int, group_size: int = 0) -> dict:
    """Run in the child: seconds (median) and peak extra bytes of one forward + backward. group_size 0: NT-Xent on
    two views of views / 2 images; k > 0: losses.contrastive over ``views`` views in groups of k."""
    from losses import contrastive, nt_xent

    g = torch.Generator(device=device).manual_seed(0)
    z1 = torch.randn(views // 2, dim, device=device, generator=g, requires_grad=True)
    z2 = torch.randn(views // 2, dim, device=device, generator=g, requires_grad=True)
    group = torch.arange(views, device=device) // group_size if group_size else None

    def step():
        loss = contrastive(torch.cat([z1, z2]), group, 0.5, impl=impl) if group_size else \
            nt_xent(z1, z2, 0.5, impl=impl)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        step()
        z1.grad = z2.grad = None
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    return {"seconds": statistics.median(times), "peak_bytes": max(peak, 0)}


def measured(impl: str, views: int, args: argparse.Namespace) -> dict:
    """:func:`measure` here (CUDA: one process, no start-up per size) or in a fresh subprocess (CPU: its own peak RSS)."""
    if args.device == "cuda":
        return measure(impl, views, args.dim, args.device, args.repeats, args.group_size)
    out = subprocess.run([sys.executable, __file__, "--child", impl, str(views), args.device, "--dim", str(args.dim),
                          "--repeats", str(args.repeats), "--group-size", str(args.group_size)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--views", type=int, nargs="+", default=[2048, 8192, 16384, 65536], help="2N values")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=0,
                        help="0: NT-Xent (nt_xent); k: losses.contrastive with views in groups of k")
    parser.add_argument("--max-reference-gb", type=float, default=12.0,
                        help="skip the reference where one fp32 similarity matrix alone exceeds this / 4")
    parser.add_argument("--child", nargs=3, metavar=("IMPL", "VIEWS", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        impl, views, device = args.child
        print(json.dumps(measure(impl, int(views), args.dim, device, args.repeats, args.group_size)))
        return
    name = torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    loss = f"contrastive_g{args.group_size}" if args.group_size else "loss"  # "loss/...": NT-Xent, as before
    results = {}
    for views in args.views:
        for impl in ("reference", "fused"):
            if impl == "reference" and 4 * views ** 2 * 4 > args.max_reference_gb * 2 ** 30:
                print(json.dumps({"what": f"{loss}/{impl}", "shape": [views, args.dim], "device": name,
                                  "figure": None, "unit": "skipped: the full matrix does not fit"}))
                continue
            results[impl, views] = r = measured(impl, views, args)
            for key, unit in (("seconds", "s"), ("peak_bytes", "MiB")):
                figure = r[key] / 2 ** 20 if unit == "MiB" else r[key]
                print(json.dumps({"what": f"{loss}/{impl}/{key.split('_')[-1] if unit == 'MiB' else 'time'}",
                                  "shape": [views, args.dim], "device": name, "figure": round(figure, 4),
                                  "unit": unit}), flush=True)
    for views in args.views:
        if ("reference", views) in results and ("fused", views) in results:
            ref, fused = results["reference", views], results["fused", views]
            for key, what in (("seconds", "time"), ("peak_bytes", "memory")):
                print(json.dumps({"what": f"{loss}/fused_over_reference/{what}", "shape": [views, args.dim],
                                  "device": name, "figure": round(fused[key] / max(ref[key], 1), 4)
                                  if key == "peak_bytes" else round(fused[key] / ref[key], 4), "unit": "x"}))


if __name__ == "__main__":
    main()
