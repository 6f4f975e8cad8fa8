"""Run records: metrics.jsonl (always, the source of truth), summary.json, console lines.

W&B integration is its own piece of work; until it lands, runs record locally only.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Sequence


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file through a temporary file and a rename: readers never see half of it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLog:
    """Appends one JSON object per line: ``{"step", "epoch", "<group>/<name>": value, ...}``."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run re-does those steps and logs them again."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _complete(line) and json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, epoch: float, metrics: Dict[str, Any]) -> Dict[str, Any]:
        record = {"step": step, "epoch": epoch, **{k: _jsonable(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return record


def _complete(line: str) -> bool:
    try:  # a line cut by a kill mid-write is dropped
        json.loads(line)
        return True
    except json.JSONDecodeError:
        return False


def wandb_note(mode: str) -> None:
    """Say once that W&B is not wired yet when it was asked for explicitly."""
    if mode in ("online", "offline"):
        print(f"wandb: mode={mode} requested, but W&B tracking is not wired yet; metrics go to metrics.jsonl",
              file=sys.stderr)


def format_metrics(record: Dict[str, Any]) -> str:
    """One console line: step, epoch and each metric with sensible precision."""
    parts = [f"step {record['step']}", f"epoch {record['epoch']:.2f}"]
    for key, value in record.items():
        if key not in ("step", "epoch"):
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def write_results(run_dir: Path, record: Dict[str, Any], classes: Sequence[str]) -> Path:
    """results.json (atomic) and confusion.png beside it; returns the JSON's path."""
    from engine.plots import save_confusion_png

    path = Path(run_dir) / "results.json"
    write_json(path, record)
    title = f"{record.get('mode', '')} test top-1 {record['test/top1']:.2f}%"
    save_confusion_png(record["test/confusion"], classes, path.with_name("confusion.png"), title=title)
    return path


@lru_cache(maxsize=None)  # the commit cannot change during a run; no git subprocess per record
def git_sha() -> str:
    """The repository's HEAD commit, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parents[1]).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
