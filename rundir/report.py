"""A W&B report for one group of runs (a sweep, a table): curves with mean and spread by a config key, and a runs
table with the headline metrics. Built with the wandb-workspaces Report API.

    python -m rundir.report GROUP [--by train.batch_size] [--project P] [--entity E] [--title T]   # outline only
    python -m rundir.report GROUP --entity E --save                                              # needs a login

Without ``--save`` nothing touches the network: the report is built and its outline printed. Runs written offline
must be uploaded first (``wandb sync <run>/wandb/offline-run-*``); the report queries W&B, not the run directories.
"""
from __future__ import annotations

from argparse import RawDescriptionHelpFormatter
from typing import Optional, Sequence

from core.errors import UserError
from rundir.cli import ArgumentParser, run_cli

# (title, x axis, metric): the curves every SimCLR group is compared on; names as pretrain.py/finetune.py log them.
CURVES = (("NT-Xent loss", "step", "train/loss"), ("kNN top-1 on the validation split (%)", "epoch", "knn/top1"),
          ("Training throughput (views/s)", "step", "train/views_per_s"),
          ("Effective learning rate", "step", "train/lr"))
# Columns of the runs table: final metrics of pretraining and of evaluations (absent ones stay empty).
HEADLINE_METRICS = ("knn/top1", "knn/best_top1", "linear/test_top1", "test/top1", "test/top5", "val/top1")


def build_report(group: str, *, by: str, project: str, entity: str, title: Optional[str] = None):
    """The report for runs whose W&B group is ``group``, grouped by the config key ``by`` (e.g. train.batch_size).

    Returns a ``wandb_workspaces.reports.v2.Report``; building it needs no login, ``.save()`` does.
    """
    import wandb_workspaces.reports.v2 as wr

    runs = wr.Runset(entity=entity, project=project, name=group, filters=f"Group = '{group}'",
                     groupby=[f"config.{by}"],
                     pinned_columns=["run:displayName", f"config:{by}.value", "run:state",
                                     *(f"summary:{m}" for m in HEADLINE_METRICS)])
    curves = [wr.LinePlot(title=name, x=x, y=[metric], groupby_aggfunc="mean", groupby_rangefunc="stddev")
              for name, x, metric in CURVES]
    blocks = [
        wr.H1(title or f"SimCLR: {group}"),
        wr.P(f"Runs of W&B group '{group}' in {entity}/{project}, grouped by {by}: lines are the mean over runs "
             f"with the same {by}, bands one standard deviation (runs differ by seed). kNN top-1 is measured on "
             "the validation split held out of the training images; test numbers come from finetune.py."),
        wr.PanelGrid(runsets=[runs], panels=curves),
        wr.H2("Runs and headline metrics"),
        wr.P("One row per run (expand a group in the table): the final kNN top-1 and its best, the linear probe's "
             "test top-1 from pretrain.py eval.linear_at_end, and evaluation runs' test/val top-1."),
        wr.PanelGrid(runsets=[runs], panels=[wr.RunComparer(diff_only="split")]),
    ]
    return wr.Report(project=project, entity=entity, title=title or f"SimCLR: {group} by {by}",
                     description=f"group {group}, grouped by {by}", blocks=blocks)


def outline(report) -> str:
    """A few lines naming what the report holds (what --save would upload)."""
    lines = [f"report: {report.title!r} for {report.entity}/{report.project}"]
    for block in report.blocks:
        if hasattr(block, "panels"):
            runset = block.runsets[0]
            lines.append(f"  panels over runs where {runset.filters}, grouped by {', '.join(runset.groupby)}:")
            for panel in block.panels:
                what = f"{', '.join(panel.y)} vs {panel.x}" if hasattr(panel, "y") else "run comparer"
                lines.append(f"    - {what}")
        else:
            lines.append(f"  {type(block).__name__}: {getattr(block, 'text', '')}")
    return "\n".join(lines)


def main(argv: Sequence[str]) -> str:
    parser = ArgumentParser(prog="python -m rundir.report", description=__doc__,
                            formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("group", help="W&B group of the runs (wandb.group)")
    parser.add_argument("--by", default="train.batch_size", help="config key to group curves by")
    parser.add_argument("--project", default="simclr-cifar10")
    parser.add_argument("--entity", default=None, help="W&B entity (user or team); required with --save")
    parser.add_argument("--title", default=None)
    parser.add_argument("--save", action="store_true", help="upload the report (needs `wandb login`)")
    args = parser.parse_args(argv)
    if args.save and not args.entity:
        raise UserError("--save needs --entity (the W&B user or team that owns the project)")
    report = build_report(args.group, by=args.by, project=args.project, entity=args.entity or "<entity>",
                          title=args.title)
    print(outline(report), flush=True)
    if args.save:
        try:
            report.save()
        except Exception as err:  # no login, no network, unknown project: one line, not a traceback
            raise UserError(f"could not save the report to W&B: {str(err).splitlines()[0]}") from None
        print(f"saved: {report.url}", flush=True)
    return outline(report)


if __name__ == "__main__":
    run_cli(main)
