"""Reproduce a paper table: print its commands, run what is missing, collect results, render it beside the paper.

    python reproduce.py --list
    python reproduce.py TABLE --print [--launcher python|torchrun|sbatch]   # every run's command
    python reproduce.py TABLE --run [--runs-dir runs]                      # missing runs, one after another
    python reproduce.py TABLE --collect                                    # what has run, where, in what state
    python reproduce.py TABLE --render [--out DIR] [--wandb ENTITY/PROJECT] # Markdown to stdout, CSV (+ PNG)
    python reproduce.py TABLE --run --rows ROW [ROW ...]                   # any action, for some rows only

TABLE is a name under configs/tables/ or the path of a spec file. Actions combine (--run --render). Trailing
key=value overrides go to every run whose schema has the key (data.root=..., device=cuda); keys that decide results
change which runs count. Runs are matched to rows by their config, so runs launched by hand count too, wherever
under --runs-dir they live; finished runs are skipped, unfinished pretraining resumes, diverged runs stay diverged.
A table's claims (orderings its source states) get a verdict from the seeds under the rendered table.
"""
from __future__ import annotations

import json
import subprocess
import sys
from argparse import RawDescriptionHelpFormatter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from configs.load import config_keys
from configs.schema import FinetuneConfig, PretrainConfig
from core.errors import UserError
from rundir.cli import ArgumentParser, run_cli
from tables.collect import (ENDED_AS_RESULT, RunRecord, describe, match, inputs_pending, scan_run_dirs,
                            wandb_records)
from tables.plan import LAUNCHERS, Plan, PlannedRun, command, plan_table
from tables.claims import check_claims, claim_text, verdicts_markdown
from tables.render import build_cells, markdown, plot_png, write_csv
from tables.spec import PRETRAIN, available_tables, load_table, select_rows


def main(argv: Sequence[str]) -> Optional[Plan]:
    # ---------------------------------------------------------------- what to do, for which table
    args, extra = parse_args(argv)
    if args.list:
        for name in available_tables():
            print(f"{name}: {load_table(name).title}")
        return None
    spec = select_rows(load_table(args.table), args.rows)
    plan = plan_table(spec, args.seeds or spec.seeds, args.runs_dir, check_extra(extra))

    # ---------------------------------------------------------------- commands
    if args.print:
        print_commands(plan, [args.launcher] if args.launcher else LAUNCHERS, args.nproc_per_node, args.nodes)

    # ---------------------------------------------------------------- run the missing ones
    failed: List[str] = []
    if args.run:
        failed = run_missing(plan, Path(args.runs_dir), args.launcher or "python", args.nproc_per_node)

    # ---------------------------------------------------------------- collect and render
    if args.collect or args.render:
        found = match(plan, collect(plan, args))
        if args.collect:
            print_collected(plan, found, Path(args.out or Path(args.runs_dir) / spec.name))
        if args.render:
            render(plan, found, Path(args.out or Path(args.runs_dir) / spec.name))
    if failed:
        print(f"reproduce: {len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr, flush=True)
        sys.exit(1)
    return plan


def parse_args(argv: Sequence[str]):
    parser = ArgumentParser(prog="python reproduce.py", description=__doc__,
                            formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?", help="a name under configs/tables/ or a spec file")
    parser.add_argument("--list", action="store_true", help="list the tables")
    parser.add_argument("--print", action="store_true", help="print the command of every run")
    parser.add_argument("--run", action="store_true", help="run the missing runs one after another")
    parser.add_argument("--collect", action="store_true", help="list each run's state and where it was found")
    parser.add_argument("--render", action="store_true", help="Markdown to stdout, CSV and PNG to --out")
    parser.add_argument("--runs-dir", default="runs", help="where runs live (runs go to RUNS_DIR/TABLE/)")
    parser.add_argument("--out", default=None, help="where --render/--collect write files (RUNS_DIR/TABLE)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="instead of the spec's seeds")
    parser.add_argument("--rows", nargs="+", default=None, metavar="ROW",
                        help="only these rows (and the claims among them); default: all")
    parser.add_argument("--launcher", choices=LAUNCHERS, default=None,
                        help="--print: only this form (default: all three); --run: python or torchrun")
    parser.add_argument("--nproc-per-node", type=int, default=8, help="processes (GPUs) per node for torchrun/sbatch")
    parser.add_argument("--nodes", type=int, default=1, help="nodes per job in the printed sbatch lines")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", default=None,
                        help="collect from this W&B project (group = the table's name) instead of run directories")
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if not args.list and not args.table:
        parser.error("name a table (or --list)")
    if not args.list and not (args.print or args.run or args.collect or args.render):
        parser.error("say what to do: --print, --run, --collect and/or --render")
    if args.run and args.launcher == "sbatch":
        parser.error("--run launches here (python or torchrun); for SLURM submit the --print --launcher sbatch lines")
    if args.run and args.wandb:
        parser.error("--run decides what is missing from the run directories; use --wandb with --collect/--render")
    return args, extra


def check_extra(extra: List[str]) -> List[str]:
    """Trailing key=value overrides must name a key of pretraining's or evaluation's config."""
    known = set(config_keys(PretrainConfig)) | set(config_keys(FinetuneConfig))
    for item in extra:
        if item.split("=", 1)[0] not in known:
            raise UserError(f"override {item!r} names no config key of pretrain.py or finetune.py")
    return extra


def print_commands(plan: Plan, launchers: Sequence[str], nproc_per_node: int, nodes: int) -> None:
    print(f"# {plan.spec.title}: {len(plan.runs)} runs (seeds {', '.join(map(str, plan.seeds))})")
    for run in plan.runs:
        after = f", after {' and '.join(r.name for r in run.inputs)}" if run.inputs else ""
        print(f"\n# {run.stage} for {', '.join(run.rows)}, seed {run.seed}{after}")
        for launcher in launchers:
            print(command(run, launcher, nproc_per_node, nodes))


def run_missing(plan: Plan, runs_dir: Path, launcher: str, nproc_per_node: int) -> List[str]:
    """Launch every run that has no finished or diverged match, in plan order; returns the names that failed."""
    failed = []
    found = match(plan, scan_run_dirs(runs_dir))
    for run in plan.runs:
        record, pending = found[run.name], inputs_pending(run, found)
        if record is not None and record.status in ("finished", *ENDED_AS_RESULT):
            print(f"reproduce: {run.name}: {describe(record)} ({record.where}), skipped", flush=True)
            continue
        if pending:
            print(f"reproduce: {run.name}: skipped, its {pending[0]} is {pending[1]}", flush=True)
            continue
        run_args, where = resumable(run, record)
        print(f"reproduce: {run.name}: {'resuming' if record else 'starting'} in {where}", flush=True)
        result = subprocess.run(launch_argv(run, run_args, launcher, nproc_per_node))
        found = match(plan, scan_run_dirs(runs_dir))  # again: this run has just written its directory
        if result.returncode != 0 and (found[run.name] is None or found[run.name].status not in ENDED_AS_RESULT):
            failed.append(run.name)
    return failed


def resumable(run: PlannedRun, record: Optional[RunRecord]) -> Tuple[List[str], Path]:
    """The run's arguments and directory. An unfinished pretraining continues in its own directory (run.resume=auto);
    anything else starts in a directory of its own, never one holding another run (an unfinished evaluation, which
    cannot resume, or a run at the planned name whose config no longer matches)."""
    if run.stage == PRETRAIN and record is not None:
        where = Path(record.where)
    else:
        where, attempt = run.path, 2
        while where.exists():
            where, attempt = run.path.with_name(f"{run.name}-try{attempt}"), attempt + 1
    return run.command_args() + [f"run.dir={where.parent}", f"run.name={where.name}"], where


def launch_argv(run: PlannedRun, args: List[str], launcher: str, nproc_per_node: int) -> List[str]:
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
                run.script, *args]
    return [sys.executable, run.script, *args]


def collect(plan: Plan, args) -> List[RunRecord]:
    if not args.wandb:
        return scan_run_dirs(Path(args.runs_dir))
    from rundir.tracking import has_wandb_credentials

    if not has_wandb_credentials():
        raise UserError("--wandb needs a W&B login (`wandb login` or WANDB_API_KEY) and network access")
    import wandb

    try:
        return wandb_records(wandb.Api(), args.wandb, plan.spec.name)
    except Exception as err:  # network, permissions, unknown project: one line, not a traceback
        raise UserError(f"could not read W&B runs of {args.wandb}: {str(err).splitlines()[0]}") from None


def print_collected(plan: Plan, found: Dict[str, Optional[RunRecord]], out: Path) -> None:
    """One line per planned run (state and where it was found), and collected.json with the same and the values."""
    listing = []
    for run in plan.runs:
        record = found[run.name]
        print(f"{run.name}: {describe(record)}" + (f" ({record.where})" if record else ""))
        listing.append({"run": run.name, "stage": run.stage, "seed": run.seed, "rows": run.rows,
                        "status": record.status if record else "not run", "where": record.where if record else None,
                        "values": record.values if record else {}})
    out.mkdir(parents=True, exist_ok=True)
    (out / "collected.json").write_text(json.dumps(listing, indent=1, default=str))


def render(plan: Plan, found: Dict[str, Optional[RunRecord]], out: Path) -> None:
    cells = build_cells(plan, found)
    verdicts = check_claims(plan.spec.claims, cells)
    print(markdown(plan, cells) + verdicts_markdown(verdicts), end="", flush=True)
    name = plan.spec.name
    written = [write_csv(plan, cells, out / f"{name}.csv"), plot_png(plan, cells, out / f"{name}.png")]
    if verdicts:
        written.append(write_verdicts(verdicts, out / f"{name}_claims.json"))
    print(f"\nwritten: {', '.join(str(p) for p in written if p)}", file=sys.stderr, flush=True)


def write_verdicts(verdicts, path: Path) -> Path:
    """The claims' verdicts with their per-seed values, for tools (the Markdown shows the same)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([{"claim": claim_text(v.claim), "better": v.claim.better, "worse": v.claim.worse,
                                 "column": v.claim.column, "worse_column": v.claim.other_column,
                                 "verdict": v.verdict, "p_value": v.p_value, "difference": v.difference,
                                 "better_values": v.better, "worse_values": v.worse, "missing": v.missing,
                                 "statement": v.claim.statement, "where": v.claim.where} for v in verdicts], indent=1))
    return path


if __name__ == "__main__":
    run_cli(main)
