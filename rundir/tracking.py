"""Run records: metrics.jsonl (always, the source of truth), summary.json, console lines, and W&B.

This is the only module that imports wandb, and only when ``wandb.mode`` is not ``disabled``. Every metric goes
through :class:`MetricsLog`, which writes metrics.jsonl and forwards the same slash names to W&B.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from core import dist
from core.errors import UserError
from core.files import write_json, write_text_atomic


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class MetricsLog:
    """Appends one JSON object per line: ``{"step", "epoch", "<group>/<name>": value, ...}``; forwards each record
    to a W&B run when one is attached."""

    def __init__(self, path: Path, enabled: bool = True, wandb_run: Optional["WandbRun"] = None) -> None:
        self.path, self.enabled, self.wandb_run = Path(path), enabled, wandb_run

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step``: a resumed run re-does those steps and logs them again."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and _complete(line) and json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def records(self, having: str = "") -> list[Dict[str, Any]]:
        """Every complete record in the file (those holding the key ``having``, when given)."""
        lines = self.path.read_text().splitlines() if self.path.is_file() else []
        return [json.loads(line) for line in lines if having in line and _complete(line)
                and (not having or having in json.loads(line))]

    def log(self, step: int, epoch: float, metrics: Dict[str, Any]) -> Dict[str, Any]:
        record = {"step": step, "epoch": epoch, **{k: _jsonable(v) for k, v in metrics.items()}}
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb_run is not None:
                self.wandb_run.log(record)
        return record


def _complete(line: str) -> bool:
    """A whole record: a line cut by a kill mid-write, or anything but a JSON object (`null`), is dropped."""
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


class WandbRun:
    """One W&B run per job (rank 0), offline-first.

    mode: auto (online when an API key is configured, else offline with a hint on `wandb sync`) | online | offline.
    Files go to ``<run_dir>/wandb/``. ``run_id`` resumes the same W&B run (it is saved in checkpoints).
    """

    def __init__(self, cfg, *, job_type: str, config: Dict[str, Any], run_dir: Path, run_id: Optional[str] = None,
                 extra_config: Optional[Dict[str, Any]] = None) -> None:
        import wandb  # imported here: with wandb.mode=disabled it is never imported at all

        mode = resolve_wandb_mode(cfg.mode) if cfg.mode == "auto" else cfg.mode  # entrypoints decide it early
        (Path(run_dir) / "wandb").mkdir(parents=True, exist_ok=True)
        init = dict(project=cfg.project, entity=cfg.entity, group=cfg.group, name=cfg.name or Path(run_dir).name,
                    tags=list(cfg.tags), notes=cfg.notes, job_type=job_type, dir=str(run_dir),
                    config={**config, **(extra_config or {})}, id=run_id, resume="allow" if run_id else None)
        settings = dict(console="off", x_disable_stats=True, silent=True)
        try:
            self.run = wandb.init(mode=mode, settings=wandb.Settings(init_timeout=INIT_TIMEOUT_S, **settings), **init)
        except Exception as err:  # the server answered the probe, then failed: never lose the run to tracking
            if mode == "online" and cfg.mode == "online":
                raise UserError(f"wandb.mode=online but W&B could not start a run ({type(err).__name__}: {err}); "
                                "use wandb.mode=offline or auto") from None
            if mode == "offline":
                raise
            mode = "offline"
            print(f"wandb: could not start an online run ({type(err).__name__}); logging offline instead",
                  file=sys.stderr, flush=True)
            self.run = wandb.init(mode=mode, settings=wandb.Settings(**settings), **init)
        self.mode = mode
        # Epoch-level metrics are plotted against epochs, step-level ones against steps.
        self.run.define_metric("step")
        self.run.define_metric("epoch")
        self.run.define_metric("train/*", step_metric="step")
        for pattern in ("knn/*", "knn_test/*", "online/*", "val/*", "test/*", "linear/*"):
            self.run.define_metric(pattern, step_metric="epoch")
        self.run.define_metric("knn/top1", step_metric="epoch", summary="max")
        self.run.define_metric("knn/top1", step_metric="epoch", summary="last")

    @property
    def id(self) -> str:
        return self.run.id

    def log(self, record: Dict[str, Any]) -> None:
        self.run.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def summarize(self, values: Dict[str, Any]) -> None:
        """Final metrics into the run summary (lists and dicts included); knn/top1 keeps its max and last."""
        for key, value in values.items():
            if key != "knn/top1":
                self.run.summary[key] = value

    def log_image(self, key: str, image: torch.Tensor, caption: str, step: int = 0, epoch: float = 0) -> None:
        """A uint8 image [H, W, 3] (e.g. :func:`rundir.plots.view_pair_grid`) under ``key``."""
        import wandb

        self.run.log({key: wandb.Image(image.cpu().numpy(), caption=caption), "step": step, "epoch": epoch})

    def log_png(self, key: str, path: Path, caption: str) -> None:
        """A PNG file (e.g. an explanation grid) as W&B media under ``key``."""
        import wandb

        self.run.log({key: wandb.Image(str(path), caption=caption)})

    def log_embeddings(self, key: str, features: torch.Tensor, labels: torch.Tensor, classes: Sequence[str],
                       step: int, epoch: float) -> None:
        """Features [N, d] with their labels [N] as a table (W&B's embedding projector reads the list column)."""
        import wandb

        rows = [[label, classes[label], feature] for label, feature in zip(labels.tolist(), features.tolist())]
        self.run.log({key: wandb.Table(columns=["label", "class", "embedding"], data=rows), "step": step,
                      "epoch": epoch})

    def log_evaluation(self, record: Dict[str, Any], classes: Sequence[str]) -> None:
        """Test confusion matrix (W&B's chart) and a per-class accuracy table, from a results.json record."""
        import wandb

        confusion = record["test/confusion"]
        truth = [t for t, row in enumerate(confusion) for p, count in enumerate(row) for _ in range(count)]
        predicted = [p for row in confusion for p, count in enumerate(row) for _ in range(count)]
        per_class = wandb.Table(columns=["class", "test top-1 %", "test images"],
                                data=[[name, record["test/per_class"][name], sum(confusion[i])]
                                      for i, name in enumerate(classes)])
        self.run.log({"test/confusion_matrix": wandb.plot.confusion_matrix(y_true=truth, preds=predicted,
                                                                           class_names=list(classes)),
                      "test/per_class_accuracy": per_class})

    def log_encoder(self, path: Path, name: str, metadata: Dict[str, Any]) -> None:
        """encoder.pt as a ``model`` artifact, aliases latest and best (the final encoder is the one kept)."""
        import wandb

        artifact = wandb.Artifact(_artifact_name(name), type="model", metadata=metadata)
        artifact.add_file(str(path), name="encoder.pt")
        self.run.log_artifact(artifact, aliases=["latest", "best"])

    def use_encoder(self, path: Path, name: str) -> None:
        """Declare the evaluated checkpoint as this run's input (by file reference), so the lineage
        pretraining -> evaluation shows in W&B. wandb cannot use artifacts offline; then the input is recorded in
        the config only (``input/encoder``; results.json also holds the path and its sha256)."""
        self.run.config.update({"input/encoder": str(Path(path).resolve())}, allow_val_change=True)
        if self.mode != "online":
            return
        import wandb

        artifact = wandb.Artifact(_artifact_name(name), type="model")
        artifact.add_reference(Path(path).resolve().as_uri(), name=Path(path).name)
        self.run.use_artifact(artifact)

    def finish(self) -> None:
        self.run.finish()


def _artifact_name(run_name: str) -> str:
    """W&B artifact names allow letters, digits, '-', '_' and '.'."""
    return "encoder-" + "".join(c if c.isalnum() or c in "-_." else "-" for c in run_name)


def keep_wandb_out(mode: str) -> None:
    """With wandb.mode=disabled, make ``import wandb`` fail for the rest of the process.

    timm imports wandb on its own whenever it is installed (``timm.utils.summary``, in a try/except ImportError);
    a None entry in sys.modules turns that import into the ImportError timm already handles, so a disabled run never
    loads wandb. Entrypoints call this right after reading the config, before timm is first imported.
    """
    if mode == "disabled":
        sys.modules.setdefault("wandb", None)


def decide_wandb_mode(cfg):
    """``cfg`` (the wandb section) with its mode decided (online | offline | disabled) before any data is loaded:
    rank 0 asks the server (:func:`resolve_wandb_mode`), every rank gets the answer, or stops with the same error."""
    if cfg.mode == "disabled":
        return cfg
    decided, problem = None, None
    if dist.is_main():
        try:
            decided = resolve_wandb_mode(cfg.mode)
        except UserError as err:
            problem = str(err)
    decided, problem = dist.broadcast_object((decided, problem))
    if problem:
        raise UserError(problem)
    return dataclasses.replace(cfg, mode=decided)


def start_wandb(cfg, *, job_type: str, config: Dict[str, Any], run_dir: Path, run_id: Optional[str] = None,
                enabled: bool = True, **extra_config) -> Optional[WandbRun]:
    """A :class:`WandbRun` unless ``wandb.mode=disabled`` or this is not rank 0 (then None, wandb not imported)."""
    if cfg.mode == "disabled" or not enabled:
        return None
    return WandbRun(cfg, job_type=job_type, config=config, run_dir=run_dir, run_id=run_id,
                    extra_config=extra_config)


def run_facts(device) -> Dict[str, Any]:
    """What W&B's config gets beside the resolved config: commit, world size, device, torch version."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"git_sha": git_sha(), "world_size": dist.world_size(), "device_name": name,
            "torch_version": torch.__version__}


PROBE_TIMEOUT_S = 5.0  # how long a node may take to show it can reach the W&B server
INIT_TIMEOUT_S = 30.0  # wandb.init's own limit once the server answered (its default is 90 s)


def wandb_server() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def server_answers(url: str, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether an HTTP server answers at ``url`` within ``timeout`` seconds (any status counts as an answer)."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout):
            return True
    except urllib.error.HTTPError:  # it answered, with an error status: the network is there
        return True
    except (OSError, ValueError):  # refused, unreachable, DNS, timeout (socket.timeout is an OSError)
        return False


def resolve_wandb_mode(mode: str) -> str:
    """online | offline for ``wandb.mode`` (auto | online | offline), decided in seconds: compute nodes often have
    no network, and wandb itself would stall for minutes before failing. auto: online when credentials exist and
    the server answers, else offline with one line on how to sync; online without an answer: an error, before any
    training starts."""
    if mode == "offline":
        return "offline"
    if mode == "auto" and not has_wandb_credentials():
        print("wandb: no credentials found (WANDB_API_KEY or ~/.netrc); logging offline, upload later with "
              "`wandb sync <run dir>/wandb/offline-run-*`", file=sys.stderr, flush=True)
        return "offline"
    if server_answers(f"{wandb_server()}/healthz"):
        return "online"
    if mode == "online":
        raise UserError(f"wandb.mode=online but the W&B server {wandb_server()} did not answer within "
                        f"{PROBE_TIMEOUT_S:.0f} s (no network on this node?); use wandb.mode=offline or auto")
    print(f"wandb: the W&B server {wandb_server()} did not answer within {PROBE_TIMEOUT_S:.0f} s; logging offline "
          "(upload later with `wandb sync`)", file=sys.stderr, flush=True)
    return "offline"


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def format_metrics(record: Dict[str, Any]) -> str:
    """One console line: step, epoch and each metric with sensible precision."""
    parts = [f"step {record['step']}", f"epoch {record['epoch']:.2f}"]
    for key, value in record.items():
        if key not in ("step", "epoch"):
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)


def write_results(run_dir: Path, record: Dict[str, Any], classes: Sequence[str]) -> Path:
    """results.json (atomic) and confusion.png beside it; returns the JSON's path."""
    from rundir.plots import save_confusion_png

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
