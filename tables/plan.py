"""From a table spec to the runs it needs: resolved configs, run names, and the commands that launch them.

Every run is resolved through ``configs.load.load_config`` (the loader the entrypoints use), so a printed command is
exactly what the runner launches and what the collector later compares run directories against. Runs are keyed by
their config: rows with the same pretraining overrides share one pretraining run.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from configs.load import config_keys, flatten, from_dict, load_config, to_dict
from configs.schema import NOT_RESULT_KEYS, FinetuneConfig, PretrainConfig
from core.errors import UserError
from tables.spec import PRETRAIN, REPO, Row, TableSpec

LAUNCHERS = ("python", "torchrun", "sbatch")


def comparable(config: Dict[str, Any], schema: type) -> Optional[Dict[str, Any]]:
    """The keys of a run's config that decide its result, typed by ``schema``; None if it does not fit the schema.

    Keys the schema lacks (W&B's extra config, say) are dropped and keys it has but the run lacks take their
    defaults, so runs from an older commit still match when nothing that matters changed.
    """
    known = set(config_keys(schema))
    kept: Dict[str, Any] = {}
    for key, value in flatten(config).items():
        if key in known:
            node = kept
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
    try:
        typed = flatten(to_dict(from_dict(kept, schema)))
    except Exception:  # a config this schema cannot hold is not a match, whatever the reason
        return None
    return {k: v for k, v in typed.items() if not k.startswith(NOT_RESULT_KEYS)}  # checkpoint: by SHA-256


@dataclass
class PlannedRun:
    """One run of a table: a pretraining or an evaluation, for one seed."""

    stage: str  # "pretrain" or the evaluation's name
    seed: int
    args: List[str]  # --config FILE key=value ...: everything that decides the result
    expected: Dict[str, Any]  # comparable(config) of a run that counts as this one
    name: str  # run.name given by the runner
    run_dir: str  # run.dir given by the runner
    group: str  # wandb.group
    pretraining: Optional["PlannedRun"] = None  # the run whose encoder this evaluation reads
    teacher: Optional["PlannedRun"] = None  # eval.mode=distill: the fine-tuning run whose classifier it learns from
    rows: List[str] = field(default_factory=list)  # the rows that read it

    @property
    def script(self) -> str:
        """The entrypoint, as a path from the working directory (plain `pretrain.py` from the repository root)."""
        return os.path.relpath(REPO / ("pretrain.py" if self.stage == PRETRAIN else "finetune.py"))

    @property
    def from_scratch(self) -> bool:
        return self.stage != PRETRAIN and self.pretraining is None

    @property
    def path(self) -> Path:
        return Path(self.run_dir) / self.name

    def command_args(self) -> List[str]:
        """The entrypoint's arguments: the result-deciding ones, then where the run goes."""
        where = [f"run.dir={self.run_dir}", f"run.name={self.name}", f"wandb.group={self.group}"]
        if self.pretraining is not None:
            where.append(f"checkpoint={self.pretraining.path}")
        if self.teacher is not None:
            where.append(f"teacher={self.teacher.path}")
        return self.args + where

    @property
    def inputs(self) -> List["PlannedRun"]:
        """The runs this one reads, which must finish first: its pretraining and its teacher."""
        return [run for run in (self.pretraining, self.teacher) if run is not None]


@dataclass
class Plan:
    spec: TableSpec
    seeds: List[int]
    runs: List[PlannedRun]  # in launch order: each pretraining before its evaluations
    by_cell: Dict[Tuple[str, int, str], PlannedRun]  # (row, seed, stage) -> run


def plan_table(spec: TableSpec, seeds: Sequence[int], runs_dir: str, extra: Sequence[str] = ()) -> Plan:
    """Every run the table needs, deduplicated by config. ``extra`` overrides go to every run whose schema has
    the key. Paths in the runs' arguments are relative to the working directory."""
    runs: Dict[str, PlannedRun] = {}
    by_cell: Dict[Tuple[str, int, str], PlannedRun] = {}
    run_dir = str(Path(runs_dir) / spec.name)
    for row in spec.rows:
        for seed in seeds:
            pre_args = _stage_args(row.recipe or spec.pretrain.recipe, spec.shared, spec.pretrain.overrides,
                                   row.pretrain, seed, _keys_of(PretrainConfig, extra))
            pre_cfg = _resolve(pre_args, PretrainConfig, spec, row)
            pretraining = None
            if not row.from_scratch:
                pretraining = _add(runs, PlannedRun(PRETRAIN, seed, pre_args, comparable(to_dict(pre_cfg),
                                   PretrainConfig), "", run_dir, spec.name), row)
                by_cell[(row.name, seed, PRETRAIN)] = pretraining
            for stage in spec.row_evaluations(row):
                evaluation = spec.evaluations[stage]
                args = _stage_args(evaluation.recipe, spec.shared, evaluation.overrides,
                                   row.evaluations.get(stage, []), seed, _keys_of(FinetuneConfig, extra))
                if row.from_scratch:  # the same encoder, randomly initialized
                    args += ["checkpoint=none", f"model.arch={pre_cfg.model.arch}"]
                    if pre_cfg.model.width is not None:
                        args.append(f"model.width={pre_cfg.model.width}")
                cfg = _resolve(args, FinetuneConfig, spec, row)
                teacher = by_cell[(row.teacher, seed, stage)] if row.teacher else None  # planned: an earlier row
                if (teacher is None) != (cfg.eval.mode != "distill"):
                    raise UserError(f"table {spec.name!r}, row {row.name!r}: evaluation {stage!r} is eval.mode="
                                    f"{cfg.eval.mode}" + (" with a teacher; distillation is eval.mode=distill"
                                                          if teacher else ", which needs `teacher:` (a row)"))
                by_cell[(row.name, seed, stage)] = _add(runs, PlannedRun(
                    stage, seed, args, comparable(to_dict(cfg), FinetuneConfig), "", run_dir, spec.name,
                    pretraining, teacher), row)
    return Plan(spec, list(seeds), list(runs.values()), by_cell)


def _stage_args(recipe: Optional[str], shared: Sequence[str], stage: Sequence[str], row: Sequence[str], seed: int,
                extra: Sequence[str]) -> List[str]:
    """One run's command-line arguments: its recipe file, then overrides from the least to the most specific."""
    config = [f"--config={os.path.relpath(REPO / recipe)}"] if recipe else []
    return config + [*shared, *stage, *row, f"seed={seed}", *extra]


def _keys_of(schema: type, overrides: Sequence[str]) -> List[str]:
    keys = set(config_keys(schema))
    return [o for o in overrides if o.split("=", 1)[0] in keys]


def _resolve(args: List[str], schema: type, spec: TableSpec, row: Row):
    try:
        return load_config(args, schema)
    except UserError as err:
        raise UserError(f"table {spec.name!r}, row {row.name!r}: {err}") from None


def _add(runs: Dict[str, PlannedRun], run: PlannedRun, row: Row) -> PlannedRun:
    """Register ``run`` unless a run with the same identity exists; name it after the first row that needs it."""
    identity = json.dumps({"stage": run.stage, "expected": run.expected,
                           "pretraining": run.pretraining.name if run.pretraining else None,
                           "teacher": run.teacher.name if run.teacher else None}, sort_keys=True)
    key = hashlib.sha1(identity.encode()).hexdigest()[:8]
    if key not in runs:
        suffix = "" if run.stage == PRETRAIN else f"-{run.stage}"
        run.name = f"{row.name}-s{run.seed}{suffix}-{key[:6]}"
        runs[key] = run
    if row.name not in runs[key].rows:
        runs[key].rows.append(row.name)
    return runs[key]


def command(run: PlannedRun, launcher: str, nproc_per_node: int = 8, nodes: int = 1) -> str:
    """The shell command that launches ``run``: plain python, torchrun on one node, or an sbatch submission of
    scripts/slurm.sbatch. sbatch lines keep the job id in a shell variable and evaluations depend on the jobs of
    their pretraining and teacher (afterok), so the sbatch lines of a table, piped to bash, submit it in order."""
    args = shlex.join(run.command_args())
    if launcher == "python":
        return f"python {run.script} {args}"
    if launcher == "torchrun":
        return f"torchrun --nproc-per-node {nproc_per_node} {run.script} {args}"
    script_env = "" if run.stage == PRETRAIN else "SCRIPT=finetune.py "
    after = (" --dependency=afterok:" + ":".join(f"${job_variable(r)}" for r in run.inputs)) if run.inputs else ""
    return (f"{job_variable(run)}=$({script_env}sbatch --parsable --nodes={nodes} --gpus-per-node={nproc_per_node}"
            f"{after} "
            f"scripts/slurm.sbatch {args})")


def job_variable(run: PlannedRun) -> str:
    """The shell variable holding a run's SLURM job id in printed sbatch lines."""
    return "job_" + re.sub(r"\W", "_", run.name)
