"""Find the runs a table needs, by config: in run directories on disk or in a W&B group.

A run counts for a planned run when its result-deciding config keys equal the plan's (``tables.plan.comparable``);
an evaluation also has to have read the planned pretraining's encoder, which is checked by SHA-256 (the pretraining
summary's ``encoder_sha256`` against the evaluation's ``checkpoint_sha256``), and a distillation the planned
teacher's classifier (the teacher's ``classifier_sha256`` against its ``teacher_sha256``), so names and paths never
decide.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import yaml

from configs.schema import FinetuneConfig, PretrainConfig
from rundir.checkpoint import CHECKPOINT_DIR, ENCODER_FILE
from tables.plan import Plan, PlannedRun, comparable
from tables.spec import PRETRAIN

STATUS_ORDER = ("finished", "collapsed", "diverged", "unfinished")
ENDED_AS_RESULT = ("collapsed", "diverged")  # ended without a usable value, but not a failure: never rerun


@dataclass
class RunRecord:
    """What a finished, diverged or unfinished run left behind, wherever it was found."""

    kind: str  # "pretrain" | "evaluation"
    config: Dict[str, Any]  # comparable(config)
    status: str  # finished | collapsed (a finished pretraining whose embeddings collapsed) | diverged | unfinished
    values: Dict[str, Any] = field(default_factory=dict)  # summary.json (pretrain) or results.json (evaluation)
    where: str = ""  # run directory or W&B run path
    progress: str = ""  # for unfinished runs: how far they got
    checkpoint: str = ""  # evaluation: the config's checkpoint (a path, or "none")
    teacher: str = ""  # distillation: the config's teacher (a fine-tuning run directory)

    @property
    def encoder_sha256(self) -> Optional[str]:
        return self.values.get("encoder_sha256")

    @property
    def checkpoint_sha256(self) -> Optional[str]:
        return self.values.get("checkpoint_sha256")


def scan_run_dirs(root: Path) -> List[RunRecord]:
    """Every run directory under ``root`` (any depth, any name): a folder holding an entrypoint's config.yaml."""
    records = []
    for config_file in sorted(Path(root).rglob("config.yaml")):
        if {"wandb", CHECKPOINT_DIR} & set(config_file.relative_to(root).parts):  # W&B's own copies, not runs
            continue
        record = _read_run_dir(config_file.parent)
        if record is not None:
            records.append(record)
    return records


def _read_run_dir(run_dir: Path) -> Optional[RunRecord]:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(config, dict):
        return None
    kind = "evaluation" if "checkpoint" in config else PRETRAIN
    typed = comparable(config, FinetuneConfig if kind == "evaluation" else PretrainConfig)
    if typed is None:
        return None
    record = RunRecord(kind, typed, "unfinished", where=str(run_dir), checkpoint=str(config.get("checkpoint", "")),
                       teacher=str(config.get("teacher") or ""))
    final = run_dir / ("results.json" if kind == "evaluation" else "summary.json")
    if final.is_file():
        record.values = json.loads(final.read_text())
        record.status = _status(record.values)
    else:
        record.progress = _progress(run_dir / "metrics.jsonl", config)
    return record


def _progress(metrics: Path, config: Dict[str, Any]) -> str:
    """'epoch 3/10' from the last complete line of metrics.jsonl; 'started' if there is none."""
    lines = metrics.read_text().splitlines() if metrics.is_file() else []
    for line in reversed(lines):
        try:
            epoch = json.loads(line)["epoch"]
        except (ValueError, KeyError):
            continue
        total = (config.get("train") or {}).get("epochs")
        return f"epoch {epoch:g}/{total}" if total else f"epoch {epoch:g}"
    return "started"


def wandb_records(api: Any, path: str, group: str) -> List[RunRecord]:
    """The runs of one W&B group (``api`` is a ``wandb.Api()``; ``path`` is ENTITY/PROJECT)."""
    records = []
    for run in api.runs(path, filters={"group": group}):
        config = {k: v for k, v in dict(run.config).items() if not k.startswith("_")}
        kind = PRETRAIN if run.job_type == PRETRAIN else "evaluation"
        typed = comparable(config, PretrainConfig if kind == PRETRAIN else FinetuneConfig)
        if typed is None:
            continue
        summary = {k: v for k, v in dict(run.summary).items() if not k.startswith("_")}
        done = "encoder_sha256" in summary if kind == PRETRAIN else "test/top1" in summary
        status = _status(summary) if done or summary.get("status") == "diverged" else "unfinished"
        records.append(RunRecord(kind, typed, status, summary if status != "unfinished" else {},
                                 where=f"wandb:{path}/{run.id}", progress=f"W&B state {run.state}",
                                 checkpoint=str(config.get("checkpoint", "")),
                                 teacher=str(config.get("teacher") or "")))
    return records


def _status(final: Dict[str, Any]) -> str:
    """finished | diverged | collapsed, from summary.json or results.json: a collapsed run counts for no cell."""
    status = final.get("status", "finished")
    return "collapsed" if status in ("finished", "collapsed") and final.get("collapsed") else status


def describe(record: Optional[RunRecord]) -> str:
    """A run's state in a few words: 'not run', 'unfinished (epoch 3/10)', 'diverged at step 40'."""
    if record is None:
        return "not run"
    if record.status == "diverged":
        return f"diverged at step {record.values.get('step', '?')}"
    if record.status == "collapsed":
        values = record.values
        if "train/erank" in values:
            return f"collapsed (train/erank {values['train/erank']}, train/neg_cos {values.get('train/neg_cos', '?')})"
        return f"collapsed (train/z_std {values.get('train/z_std', '?')})"
    if record.status == "unfinished":
        return f"unfinished ({record.progress})" if record.progress else "unfinished"
    return record.status


def inputs_pending(run: PlannedRun, found: Dict[str, Optional[RunRecord]]) -> Optional[Tuple[str, str]]:
    """For an evaluation whose pretraining or teacher has not finished, which and its state (('pretraining', 'not
    run'), ('teacher', 'unfinished (...)'), ('pretraining', 'diverged at step N')); None when nothing is awaited."""
    for needed, role in ((run.pretraining, "pretraining"), (run.teacher, "teacher")):
        if needed is not None and _finished(needed, found) is None:
            return role, describe(found.get(needed.name))
    return None


def _finished(needed: Optional[PlannedRun], found: Dict[str, Optional[RunRecord]]) -> Optional[RunRecord]:
    """The finished record matched to a planned run another one reads; None if it is not (yet) finished."""
    record = found.get(needed.name) if needed is not None else None
    return record if record is not None and record.status == "finished" else None


def match(plan: Plan, records: Iterable[RunRecord]) -> Dict[str, Optional[RunRecord]]:
    """Planned run name -> the record that speaks for it (None: not run). Pretraining runs are matched first."""
    records = list(records)
    found: Dict[str, Optional[RunRecord]] = {}
    for run in plan.runs:  # in launch order, so a run's pretraining is already matched
        candidates = [r for r in records if r.kind == (PRETRAIN if run.stage == PRETRAIN else "evaluation")
                      and r.config == run.expected and _reads_the_right_encoder(run, r, found)
                      and _learns_from_the_right_teacher(run, r, found)]
        candidates.sort(key=lambda r: (STATUS_ORDER.index(r.status) if r.status in STATUS_ORDER else 3, r.where))
        found[run.name] = candidates[0] if candidates else None
    return found


def _reads_the_right_encoder(run: PlannedRun, record: RunRecord, found: Dict[str, Optional[RunRecord]]) -> bool:
    if run.stage == PRETRAIN:
        return True
    if run.pretraining is None:
        return record.checkpoint.lower() == "none"
    pretraining = _finished(run.pretraining, found)
    return pretraining is not None and _read(record, record.checkpoint_sha256, pretraining.encoder_sha256,
                                             record.checkpoint, Path(pretraining.where), ENCODER_FILE)


def _learns_from_the_right_teacher(run: PlannedRun, record: RunRecord, found: Dict[str, Optional[RunRecord]]) -> bool:
    if run.teacher is None:
        return not record.teacher
    teacher = _finished(run.teacher, found)
    return teacher is not None and _read(record, record.values.get("teacher_sha256"),
                                         teacher.values.get("classifier_sha256"), record.teacher, Path(teacher.where))


def _read(record: RunRecord, recorded_sha: Optional[str], produced_sha: Optional[str], named: str, home: Path,
          *files: str) -> bool:
    """Whether ``record`` read the file another run produced: by the SHA-256 it recorded once finished; before that
    only its config's path (``named``: the run directory ``home`` or one of its ``files``) says what it reads."""
    if record.status == "finished":
        return recorded_sha is not None and recorded_sha == produced_sha
    if not named:
        return False
    named_path = Path(named).expanduser().resolve()  # relative paths: from the working directory, as launched
    return named_path in {home.resolve(), *((home / f).resolve() for f in files)}
