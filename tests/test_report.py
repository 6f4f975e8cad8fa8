"""The W&B report builder: constructed offline (saving needs a login), against the metric names the runs log."""
import json
import os
import subprocess
import sys

from rundir.report import HEADLINE_METRICS, build_report
from tests.conftest import REPO, run_entry, tiny_run_args


def test_report_for_a_group_plots_mean_and_spread_by_a_config_key(tmp_path):
    report = build_report("sweep-b", by="train.batch_size", project="simclr-tests", entity="team")
    assert (report.entity, report.project) == ("team", "simclr-tests")
    grids = [b for b in report.blocks if hasattr(b, "panels")]
    runsets = [rs for grid in grids for rs in grid.runsets]
    assert all(rs.filters == "Group = 'sweep-b'" and rs.groupby == ["config.train.batch_size"] for rs in runsets)
    assert {f"summary:{m}" for m in HEADLINE_METRICS} | {"config:train.batch_size.value"} <= set(
        runsets[0].pinned_columns)  # the runs table
    curves = [p for p in grids[0].panels if hasattr(p, "y")]
    assert all(p.groupby_aggfunc == "mean" and p.groupby_rangefunc == "stddev" for p in curves)
    plotted = {(p.x, p.y[0]) for p in curves}
    assert {("step", "train/loss"), ("epoch", "knn/top1")} <= plotted

    # Every plotted metric and axis is a name that pretrain.py really logs (metrics.jsonl mirrors W&B).
    assert run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1")).returncode == 0
    logged = set().union(*(json.loads(line) for line in (tmp_path / "tiny" / "metrics.jsonl").read_text().splitlines()))
    assert {name for pair in plotted for name in pair} <= logged


def test_report_cli_prints_an_outline_offline_and_fails_cleanly_without_a_login(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "none"))
    dry = subprocess.run([sys.executable, "-m", "rundir.report", "sweep-b", "--by", "optim.base_lr"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "knn/top1 vs epoch" in dry.stdout and "grouped by config.optim.base_lr" in dry.stdout
    save = subprocess.run([sys.executable, "-m", "rundir.report", "sweep-b", "--entity", "team", "--save"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert save.returncode == 2 and save.stderr.strip().splitlines()[-1].startswith("error: could not save")
    assert "Traceback" not in save.stderr
