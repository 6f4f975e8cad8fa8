"""The speed check for one GPU in about 5 minutes: the `gpu` tests, the ResNet-18 step with MFU and the peers' real
pipelines, the fused NT-Xent against the reference, and pretrain.py's own views/s.

    python bench/gpu_speed.py OUTDIR [--data ARCHIVE]       # what bench/gpu_speed.sh runs on the GPU machine
    python bench/gpu_speed.py OUTDIR --tiny                 # CPU plumbing check (tests/test_bench.py)

Stages (each with its own time limit, so a slow one cannot take the others' time; what ran is always written):
1. ``tests``: ``pytest -m gpu`` (Triton kernels natively, no host sync in the step, compiled per-view BN ...).
2. ``step``: bench/step.py, ResNet-18 bf16 compiled at batch 256 / 512 / 1024 (views/s, GFLOP per view, MFU), the
   DataLoader baseline and lightly's and dkobak's pipelines at batch 512.
3. ``loss``: bench/loss.py at 2N = 2,048 / 8,192 / 16,384: fused vs reference time and peak memory.
4. ``pretrain``: pretrain.py with the speedrun recipe (ResNet-18, batch 512, bf16, compiled) for a few epochs on the
   CIFAR-10 archive: the median train/views_per_s after the first epoch (what a run really gets).
Writes OUTDIR/speed.jsonl (every JSON line of every stage, tagged with its stage) and OUTDIR/<stage>.log.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"


def stages(args: argparse.Namespace, runs: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in seconds) of each stage; --tiny shrinks every one to a CPU-sized check."""
    py = sys.executable
    if args.tiny:
        return [
            ("tests", [py, "-m", "pytest", "-q", "-m", "gpu", "tests/test_loss.py", "-p", "no:cacheprovider"], 120),
            ("step", [py, "bench/step.py", "--device", "cpu", "--quick", "--steps", "2", "--warmup", "1"], 300),
            ("loss", [py, "bench/loss.py", "--device", "cpu", "--views", "256", "--repeats", "1"], 120),
            ("pretrain", [py, "pretrain.py", "data.name=synthetic", "device=cpu", "model.width=4",
                          "data.train_limit=600", "data.val_size=100", "train.batch_size=100", "train.epochs=2",
                          "train.log_every=2", "eval.knn_every=0", "wandb.mode=disabled", f"run.dir={runs}",
                          "run.name=speed"], 180),
        ]
    step = [py, "bench/step.py", "--device", "cuda", "--archs", "resnet18", "--precisions", "bf16", "--compile", "on",
            "--no-stages", "--warmup", "15", "--steps", "60"]
    data = ["data.name=folder", f"data.root={args.data}"] if args.data else ["data.name=synthetic"]
    return [
        ("tests", [py, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider"], 150),
        ("step", [*step, "--batches", "256", "1024", "--no-baseline", "--peers"], 120),
        ("step", [*step, "--batches", "512"], 150),
        ("loss", [py, "bench/loss.py", "--device", "cuda", "--views", "2048", "8192", "16384"], 60),
        ("pretrain", [py, "pretrain.py", "--config", "configs/pretrain/speedrun_resnet18.yaml", *data,
                      "train.epochs=10", "train.log_every=20", "eval.knn_every=0", "wandb.mode=disabled",
                      f"run.dir={runs}", "run.name=speed"], 150),
    ]


def run_stage(name: str, command: list[str], limit: int, out: Path) -> tuple[int, str]:
    """Run one stage with its time limit; its output goes to OUTDIR/<name>.log (appended); returns (status, stdout)."""
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit)
        status, stdout, stderr = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as timeout:
        partial = timeout.stdout or b""  # bytes even with text=True (subprocess's timeout path)
        status, stdout = 124, partial.decode() if isinstance(partial, bytes) else partial
        stderr = f"stopped after its {limit} s limit"
    with open(out / f"{name}.log", "a") as log:
        log.write(f"$ {' '.join(command)}\n{stdout}\n{stderr}\nstatus {status} in {time.perf_counter() - start:.0f} s\n")
    return status, stdout


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def pretrain_views_per_s(runs: Path, batch: int) -> list[dict]:
    """The median train/views_per_s of the speed run after its first epoch (compilation and warm-up excluded)."""
    path = runs / "speed" / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    rates = [r["train/views_per_s"] for r in records if "train/views_per_s" in r and r.get("epoch", 0) > 1]
    if not rates:
        return [{"what": "pretrain/views_per_s", "figure": None, "unit": "views/s", "skipped": "no steps after epoch 1"}]
    return [{"what": "pretrain/views_per_s", "figure": round(statistics.median(rates), 1), "unit": "views/s",
             "samples": len(rates), "shape": [batch, 3, 32, 32]}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", type=Path)
    parser.add_argument("--data", default=str(ARCHIVE) if ARCHIVE.is_file() else "",
                        help="CIFAR-10 archive for the pretrain stage (default: ../shared's; none: synthetic)")
    parser.add_argument("--tiny", action="store_true", help="CPU-sized settings: checks the plumbing only")
    args = parser.parse_args()
    args.outdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as runs, open(args.outdir / "speed.jsonl", "a") as out:
        for name, command, limit in stages(args, Path(runs)):
            status, stdout = run_stage(name, command, limit, args.outdir)
            rows = json_lines(stdout) if name in ("step", "loss") else []
            if name == "tests":
                rows = [{"what": "tests/gpu", "figure": status, "unit": "exit status",
                         "summary": (stdout.strip().splitlines() or [""])[-1]}]
            if name == "pretrain":
                rows = pretrain_views_per_s(Path(runs), 100 if args.tiny else 512)
            for row in rows:
                out.write(json.dumps({"stage": name, "status": status, **row}) + "\n")
            out.flush()
            print(f"{name}: status {status}, {len(rows)} lines", flush=True)


if __name__ == "__main__":
    main()
