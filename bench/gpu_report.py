"""The GPU report: one command, one time budget, every result written the moment it exists.

    bench/gpu_report.sh OUTDIR [--budget-s 530] [--stages NAME ...]    # on the GPU machine (what .sh runs)
    PYTHON=.venv/bin/python bench/gpu_report.sh OUTDIR --tiny           # CPU plumbing check (tests/test_bench.py)

Before anything runs it prints its plan (each stage's estimate, where it starts, whether it fits the budget); a
stage whose estimate no longer fits what is left is skipped, and says so. Stages, default ones in this order of value:

  tests         ``pytest -m gpu``: per-view batch norm compiled, the Triton kernels natively, no host sync in a step
  data_cost     airbench94 on the JPEG copy's pixels (bench/data_cost.py) beside its published 94.01%; runs in the
                background beside ``tests`` (neither reports a speed), and decodes the archive for the stages after it
  kobak-e100    dkobak's 100-epoch recipe, bf16, compiled, kNN on a 2,000-image validation split every 10 epochs
                (the curve), then his protocol (k=10 cosine majority, test queries, all 50,000 training images as the
                bank) beside his 83.2; its median ``train/views_per_s`` after epoch 1 is pretrain.py's own speed
  loss          NT-Xent reference vs fused at 2N = 2,048 / 8,192 / 16,384: time and peak memory, one process
  step          bench/step.py at batch 512, bf16, compiled: views/s, MFU, per-stage times, the DataLoader baseline,
                lightly's and dkobak's real pipelines, with ratios
Later runs (``--stages``): ``lightly-e200`` (lightly's recipe; its protocol, the maximum over epochs of a k=200
weighted kNN on test, flagged as chosen on test, and ours, the final encoder, beside it), ``speedrun`` (the speedrun
recipe, its kNN-vs-seconds curve, then dkobak's protocol), ``profile`` (bench/profile_step.py: top kernels, launch
gaps, the next speed lever), ``micro_batch`` (ResNet-18 at batch 4,096 and ResNet-50 at 2,048 in chunks: peak memory
and views/s beside the whole batch).

OUTDIR gets at most 8 files, none in subfolders: ``report.jsonl`` (every JSON line of every stage, tagged with it,
plus the plan and each stage's start and end), ``log.txt`` (all output), ``<stage>_metrics.jsonl`` for each
pretraining (copied every few seconds while it runs) and ``profile.txt``. Lines are appended whole and flushed at
once, so a stage stopped by the budget, or the whole command killed by its time limit, leaves every finished line.
Children get PYTHONUNBUFFERED=1 from here; run directories and the decoded-image cache stay outside OUTDIR.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"
MAX_FILES = 8  # what the device tool sends back from OUTDIR


class Report:
    """OUTDIR's report.jsonl and log.txt, the budget's clock, and the commands run against it."""

    def __init__(self, out: Path, budget_s: float, tiny: bool) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.tiny, self.end = out, tiny, time.monotonic() + budget_s
        self.lock = threading.Lock()
        self.fd = os.open(out / "report.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.log = open(out / "log.txt", "a", buffering=1)
        self.children: list[subprocess.Popen] = []

    def left(self) -> float:
        return self.end - time.monotonic()

    def line(self, row: dict) -> None:
        """One JSON line, appended with a single write (whole or not at all) and echoed on stdout."""
        text = json.dumps(row) + "\n"
        with self.lock:
            os.write(self.fd, text.encode())
            print(text, end="", flush=True)

    def start(self, stage: str, cmd: list[str], parse_json: bool = True) -> "Child":
        """Start ``cmd`` from the repository root; its output goes to log.txt line by line, and its JSON lines to
        report.jsonl tagged with ``stage`` (when ``parse_json``)."""
        with self.lock:
            self.log.write(f"\n[{stage}] $ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.children.append(proc)
        child = Child(proc, time.monotonic())
        child.reader = threading.Thread(target=self._relay, args=(stage, child, parse_json), daemon=True)
        child.reader.start()
        return child

    def _relay(self, stage: str, child: "Child", parse_json: bool) -> None:
        for text in child.proc.stdout:
            child.tail.append(text.rstrip("\n"))
            with self.lock:
                self.log.write(f"[{stage}] {text}")
            if parse_json and text.startswith("{"):
                try:
                    row = json.loads(text)
                except json.JSONDecodeError:
                    continue
                self.line({"stage": stage, **row})

    def run(self, stage: str, cmd: list[str], limit_s: float, parse_json: bool = True,
            every: Optional[Callable[[], None]] = None) -> Optional[int]:
        """Run ``cmd`` for at most ``limit_s`` seconds (then SIGTERM: a pretraining checkpoints and stops; SIGKILL 30 s
        later), calling ``every()`` every few seconds meanwhile; the exit status, or None when it ran out of time."""
        child = self.start(stage, cmd, parse_json)
        code = child.wait(limit_s, every)
        if every is not None:
            every()
        return code

    def stop_children(self) -> None:
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()


@dataclass
class Child:
    proc: subprocess.Popen
    started: float
    reader: Optional[threading.Thread] = None
    tail: collections.deque = field(default_factory=lambda: collections.deque(maxlen=20))  # its last lines

    def wait(self, limit_s: float, every: Optional[Callable[[], None]] = None) -> Optional[int]:
        deadline = self.started + max(limit_s, 1.0)
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5 if self.proc.poll() is None else 0)
            if every is not None:
                every()
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.reader.join(10)
        return code


@dataclass
class Stage:
    name: str
    estimate_s: float  # seconds on one H200, from what an H100 measured (--tiny: on 2 CPU cores)
    cap_s: float  # never longer than this, whatever is left of the budget
    run: Callable[["Report", "Stage", argparse.Namespace], None]
    background: bool = False  # started at once beside the next stage (it reports no speed)


# ----------------------------------------------------------------------------------------------- pretrainings
@dataclass
class Evaluation:
    name: str
    overrides: list[str]
    published: Optional[float]
    protocol: str


@dataclass
class Pretraining:
    recipe: str
    overrides: list[str]
    evaluations: list[Evaluation] = field(default_factory=list)
    test_monitor: Optional[Evaluation] = None  # a summary.json figure chosen on the test split (flagged as such)


KNN10 = ["eval.mode=knn", "eval.knn_k=10", "eval.knn_vote=majority", "data.val_size=0"]
KOBAK_PROTOCOL = "dkobak: kNN k=10 cosine majority, test queries, all 50,000 training images as the bank"
PRETRAININGS = {
    "kobak-e100": Pretraining(
        "configs/pretrain/kobak_resnet18.yaml",
        ["train.epochs=100", "optim.base_lr=0.06", "data.val_size=2000", "eval.knn_every=10", "eval.knn_k=10",
         "eval.knn_vote=majority", "train.log_every=20"],
        [Evaluation("knn10", KNN10, 83.2, KOBAK_PROTOCOL + " (his 100-epoch row, 3 seeds +-0.2; we pretrain on "
                    "48,000 images, 2,000 held out for the curve)")]),
    "lightly-e200": Pretraining(
        "configs/pretrain/lightly_resnet18.yaml", ["train.log_every=20"],
        [Evaluation("knn200", ["eval.mode=knn", "eval.knn_k=200", "eval.knn_temperature=0.1", "data.val_size=0"],
                    None, "ours: kNN k=200 weighted of the final encoder, test queries, 50,000-image bank")],
        test_monitor=Evaluation("knn200_max", [], 84.8, "lightly: kNN k=200 weighted on test, maximum over epochs "
                                "(chosen on the test split: optimistic)")),
    "speedrun": Pretraining(
        "configs/pretrain/speedrun_resnet18.yaml", ["train.log_every=20"],
        [Evaluation("knn10", KNN10, None, KOBAK_PROTOCOL + "; goal 90% within 10 minutes")]),
}
TINY_PRETRAIN = ["data.name=synthetic", "device=cpu", "model.width=4", "data.train_limit=600", "train.batch_size=100",
                 "train.epochs=2", "train.precision=fp32", "train.compile=false", "eval.knn_every=1",
                 "data.val_size=100", "train.log_every=2"]
TINY_EVAL = ["data.name=synthetic", "device=cpu", "data.train_limit=600"]


def data_overrides(args: argparse.Namespace, pretraining: bool) -> list[str]:
    if args.tiny:
        return TINY_PRETRAIN if pretraining else TINY_EVAL
    compute = ["train.precision=bf16", "train.compile=true"] if pretraining else []
    return ["data.name=folder", f"data.root={args.data}", f"data.cache_dir={args.cache_dir}", "device=cuda", *compute]


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    for text in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError:  # a line being written as we read
            pass
    return rows


class MetricsWatch:
    """Copies a run's metrics.jsonl into OUTDIR as it grows and reports each new kNN value as a curve point."""

    def __init__(self, report: Report, stage: str, run_dir: Path) -> None:
        self.report, self.stage, self.source = report, stage, run_dir / "metrics.jsonl"
        self.target, self.size, self.seen = report.out / f"{stage}_metrics.jsonl", -1, 0

    def __call__(self) -> None:
        if not self.source.is_file() or self.source.stat().st_size == self.size:
            return
        self.size = self.source.stat().st_size
        partial = self.target.with_name(self.target.name + ".part")
        shutil.copyfile(self.source, partial)
        os.replace(partial, self.target)  # whole, always: a kill never leaves half a copy
        records = read_jsonl(self.target)
        for record in records[self.seen:]:
            knn = {k: v for k, v in record.items() if k.startswith(("knn", "online/val"))}
            if knn:
                self.report.line({"stage": self.stage, "what": f"{self.stage}/curve", "epoch": record.get("epoch"),
                                  "seconds": record.get("time/elapsed_s"), **knn})
        self.seen = len(records)


def pretrain_and_evaluate(report: Report, stage: Stage, args: argparse.Namespace) -> None:
    spec = PRETRAININGS[stage.name]
    run_dir = Path(args.runs_dir) / stage.name
    common = ["wandb.mode=disabled", f"run.dir={args.runs_dir}"]
    cmd = [sys.executable, "pretrain.py", "--config", spec.recipe, *spec.overrides, *data_overrides(args, True),
           *common, f"run.name={stage.name}"]
    reserve = 0 if args.tiny else 40 * len(spec.evaluations)  # seconds kept for the evaluations
    limit = min(stage.cap_s - reserve, report.left() - reserve)
    code = report.run(stage.name, cmd, limit, parse_json=False, every=MetricsWatch(report, stage.name, run_dir))
    records = read_jsonl(run_dir / "metrics.jsonl")
    speeds = [r["train/views_per_s"] for r in records if "train/views_per_s" in r and r.get("epoch", 0) > 1]
    summary = read_json(run_dir / "summary.json")
    report.line({"stage": stage.name, "what": f"{stage.name}/pretrain", "status": summary.get(
        "status", {None: "out of time", 0: "finished"}.get(code, f"failed (exit {code})")),
        "figure": round(statistics.median(speeds), 1) if speeds else None,
        "unit": "views/s, median of train/views_per_s after epoch 1 (pretrain.py's own speed)",
        "seconds": max((r.get("time/elapsed_s", 0) for r in records), default=None),
        "epochs_done": max((r.get("epoch", 0) for r in records), default=0),
        **{k: v for k, v in summary.items() if k.startswith(("knn", "online"))}, **facts(args)})
    if summary.get("status") != "finished":
        return
    if spec.test_monitor is not None:
        report.line(result_row(stage.name, spec.test_monitor, summary.get("knn_test/max_top1"), args))
    for evaluation in spec.evaluations:
        name = f"{stage.name}-{evaluation.name}"
        cmd = [sys.executable, "finetune.py", *evaluation.overrides, f"checkpoint={run_dir}",
               *data_overrides(args, False), *common, f"run.name={name}"]
        code = report.run(stage.name, cmd, report.left() if not args.tiny else 300, parse_json=False)
        results = read_json(Path(args.runs_dir) / name / "results.json")
        report.line(result_row(stage.name, evaluation, results.get("test/top1") if code == 0 else None, args))


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def result_row(stage: str, evaluation: Evaluation, value: Optional[float], args: argparse.Namespace) -> dict:
    difference = round(value - evaluation.published, 2) if None not in (value, evaluation.published) else None
    return {"stage": stage, "what": f"{stage}/{evaluation.name}", "figure": value, "unit": "% top-1",
            "published": evaluation.published, "difference": difference, "protocol": evaluation.protocol,
            **facts(args)}


def facts(args: argparse.Namespace) -> dict:
    return {"device": args.device_name, "precision": "fp32" if args.tiny else "bf16", "compile": not args.tiny,
            "data": "synthetic" if args.tiny else Path(args.data).name}


# ----------------------------------------------------------------------------------------------- the other stages
def run_tests(report: Report, stage: Stage, args: argparse.Namespace) -> None:
    files = ["tests/test_loss.py"] if args.tiny else []  # --tiny: the gpu tests of one file (skipped without CUDA)
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "-rs", *files]
    child = report.start(stage.name, cmd, parse_json=False)
    code = child.wait(min(stage.cap_s, report.left()))
    report.line({"stage": stage.name, "what": "tests/gpu", "figure": code, "unit": "exit status (None: out of time)",
                 "summary": child.tail[-1] if child.tail else "", "skipped": [t for t in child.tail if "SKIP" in t],
                 **facts(args)})


def run_data_cost(report: Report, stage: Stage, args: argparse.Namespace) -> None:
    cmd = [sys.executable, "bench/data_cost.py", "--runs", str(args.airbench_runs), "--data", args.data,
           "--cache-dir", args.cache_dir] + (["--device", "cpu"] if args.tiny else [])
    args.background = stage.name, report.start(stage.name, cmd)  # waited for after the next stage


def run_loss(report: Report, stage: Stage, args: argparse.Namespace) -> None:
    device, views = ("cpu", ["256"]) if args.tiny else ("cuda", ["2048", "8192", "16384"])
    cmd = [sys.executable, "bench/loss.py", "--device", device, "--views", *views,
           "--repeats", "1" if args.tiny else "10"]
    report.run(stage.name, cmd, min(stage.cap_s, report.left()))


def run_step(report: Report, stage: Stage, args: argparse.Namespace) -> None:
    if args.tiny:
        cmd = [sys.executable, "bench/step.py", "--device", "cpu", "--quick", "--steps", "2", "--warmup", "1"]
    else:
        cmd = [sys.executable, "bench/step.py", "--device", "cuda", "--archs", "resnet18", "--batches", "512",
               "--precisions", "bf16", "--compile", "on", "--warmup", "15", "--steps", "60"]
    report.run(stage.name, cmd, min(stage.cap_s, report.left()))


def run_micro_batch(report: Report, stage: Stage, args: argparse.Namespace) -> None:
    """Batches larger than memory on one GPU: ResNet-18 at batch 4,096 and ResNet-50 at 2,048, in chunks, with peak
    memory and views/s beside the whole batch (bench/step.py --micro-batch)."""
    runs = [("resnet18", "32", "16")] if args.tiny else [("resnet18", "4096", "512"), ("resnet50", "2048", "256")]
    for arch, batch, micro in runs:
        device = ["--device", "cpu", "--width", "8", "--precisions", "fp32", "--compile", "off", "--warmup", "1",
                  "--steps", "2"] if args.tiny else ["--device", "cuda", "--precisions", "bf16", "--compile", "on",
                                                     "--warmup", "5", "--steps", "10"]
        cmd = [sys.executable, "bench/step.py", "--archs", arch, "--batches", batch, "--micro-batch", micro,
               "--no-baseline", "--no-stages", "--peers", *device]
        report.run(stage.name, cmd, min(stage.cap_s, report.left()))


def run_profile(report: Report, stage: Stage, args: argparse.Namespace) -> None:
    cmd = [sys.executable, "bench/profile_step.py", "--out", str(report.out / "profile.txt")]
    cmd += ["--device", "cpu", "--quick"] if args.tiny else ["--device", "cuda"]
    report.run(stage.name, cmd, min(stage.cap_s, report.left()))


# (name, H200 estimate s, cap s, run, background); --tiny estimates are for 2 CPU cores. A background stage runs
# beside the stage after it and is waited for before the one after that.
STAGES = [
    Stage("data_cost", 70, 150, run_data_cost, background=True),
    Stage("tests", 100, 150, run_tests),
    Stage("kobak-e100", 270, 330, pretrain_and_evaluate),
    Stage("loss", 30, 60, run_loss),
    Stage("step", 110, 170, run_step),
    Stage("lightly-e200", 420, 560, pretrain_and_evaluate),
    Stage("speedrun", 420, 540, pretrain_and_evaluate),
    Stage("profile", 60, 100, run_profile),
    Stage("micro_batch", 150, 240, run_micro_batch),
]
TINY_ESTIMATES = {"tests": 8, "data_cost": 20, "kobak-e100": 40, "loss": 8, "step": 60, "lightly-e200": 40,
                  "speedrun": 40, "profile": 15, "micro_batch": 30}
DEFAULT_STAGES = ["data_cost", "tests", "kobak-e100", "loss", "step"]


def plan(stages: list[Stage], budget_s: float) -> list[dict]:
    """Each stage's planned start (s) and whether its estimate fits the budget, as main() will run them: one after
    another, a background stage beside the next one and waited for after it."""
    rows, clock, background_end = [], 0.0, None
    for stage in stages:
        fits = clock + stage.estimate_s <= budget_s
        rows.append({"what": "report/plan", "stage": stage.name, "estimate_s": stage.estimate_s,
                     "starts_at_s": round(clock), "fits": fits, "background": stage.background})
        if stage.background:
            background_end = clock + stage.estimate_s if fits else None
            continue
        clock += stage.estimate_s if fits else 0.0
        if background_end is not None:
            clock, background_end = max(clock, background_end), None
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output directory (at most 8 files, written as results come)")
    p.add_argument("--budget-s", type=float, default=530.0, help="wall-clock seconds for everything")
    p.add_argument("--stages", nargs="+", default=DEFAULT_STAGES, choices=[s.name for s in STAGES])
    p.add_argument("--data", default=str(ARCHIVE), help="the CIFAR-10 archive")
    p.add_argument("--cache-dir", default="/tmp/simclr-decoded", help="decoded images, shared by the stages")
    p.add_argument("--runs-dir", default=None, help="run directories (default: a new temporary directory)")
    p.add_argument("--airbench-runs", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="CPU-sized stages: checks the plumbing only")
    args = p.parse_args(argv)
    report = Report(args.out, args.budget_s, args.tiny)
    args.runs_dir = args.runs_dir or tempfile.mkdtemp(prefix="gpu-report-runs-")
    args.device_name, args.background = device_name(args.tiny), None
    stages = [Stage(s.name, TINY_ESTIMATES[s.name] if args.tiny else s.estimate_s, s.cap_s, s.run, s.background)
              for s in STAGES if s.name in args.stages]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally below stops the children
    try:
        for row in plan(stages, args.budget_s):
            report.line({**row, "budget_s": args.budget_s, "device": args.device_name})
        for stage in stages:
            if report.left() < stage.estimate_s:
                report.line({"what": "report/skipped", "stage": stage.name, "reason": f"needs ~{stage.estimate_s:.0f} "
                             f"s, {max(report.left(), 0):.0f} s of the budget left"})
            else:
                report.line({"what": "report/stage_start", "stage": stage.name, "budget_left_s": round(report.left())})
                stage.run(report, stage, args)
                if stage.background:
                    continue
                report.line({"what": "report/stage_end", "stage": stage.name, "budget_left_s": round(report.left())})
            if args.background is not None:
                wait_for_background(report, args)
        if args.background is not None:
            wait_for_background(report, args)
    finally:
        report.stop_children()
    files = sorted(path.name for path in args.out.iterdir())
    report.line({"what": "report/files", "figure": len(files), "files": files, "limit": MAX_FILES})
    return 0 if len(files) <= MAX_FILES else 1


def wait_for_background(report: Report, args: argparse.Namespace) -> None:
    """The background stage, given the rest of its cap; the stages after it read the cache it decoded."""
    (name, child), args.background = args.background, None
    cap = next(s.cap_s for s in STAGES if s.name == name)
    code = child.wait(max(1.0, min(cap - (time.monotonic() - child.started), report.left())))
    report.line({"what": "report/stage_end", "stage": name, "status": code, "budget_left_s": round(report.left())})


def device_name(tiny: bool) -> str:
    if tiny:
        return "cpu"
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (no CUDA device found)"


if __name__ == "__main__":
    sys.exit(main())
