"""reproduce.py: table specs, printed commands, the runner, matching runs by config, rendering beside the paper."""
import csv
import json
import os
import shlex
import shutil
import statistics
import subprocess
from pathlib import Path

import pytest
import yaml

import reproduce as reproduce_entry
from configs.load import load_config
from configs.schema import FinetuneConfig, PretrainConfig
from tables.collect import match, scan_run_dirs, wandb_records
from tables.plan import plan_table
from tables.render import build_cells
from tables.spec import available_tables, load_table
from tests.conftest import REPO, assert_user_error, assert_user_error_here, run_entry

SMOKE_RUNS = 10  # 2 rows x 2 seeds x (pretraining + linear probe) + 1 row x 2 seeds of a linear probe from scratch


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory) -> Path:
    """The smoke table, run once by `reproduce.py smoke --run` (a minute on 2 cores); tests copy it to change it."""
    runs = tmp_path_factory.mktemp("smoke_runs")
    result = run_entry("reproduce.py", "smoke", "--run", "--runs-dir", str(runs))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count(": starting in ") == SMOKE_RUNS
    return runs


def copy_of(runs: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs, tmp_path / "runs"))


def read_csv(path: Path) -> dict:
    with open(path) as f:
        return {(r["row"], r["column"]): r for r in csv.DictReader(f)}


def smoke_variant(path: Path, **changes) -> Path:
    """Write a spec file at ``path``: the smoke table with top-level keys replaced (other rows: without its claims)."""
    spec = yaml.safe_load((REPO / "configs" / "tables" / "smoke.yaml").read_text())
    if "rows" in changes:
        spec.pop("claims")
    path.write_text(yaml.safe_dump({**spec, **changes}))
    return path


def own_numbers(runs: Path) -> dict:
    """(row, column) -> {seed: value} read straight from the runs' summary.json / results.json, rows recognized by
    their config (temperature, or a random-init checkpoint), independently of reproduce's matching."""
    found = {}
    for config_file in runs.rglob("config.yaml"):
        config, run = yaml.safe_load(config_file.read_text()), config_file.parent
        if "checkpoint" not in config:  # pretraining: kNN on the validation split
            key = (f"t{config['loss']['temperature']}", "knn_val")
            value = json.loads((run / "summary.json").read_text())["knn/top1"]
        else:
            if config["checkpoint"] == "none":
                row = "scratch"
            else:
                pre = yaml.safe_load((Path(config["checkpoint"]) / "config.yaml").read_text())
                row = f"t{pre['loss']['temperature']}"
            key, value = (row, "linear"), json.loads((run / "results.json").read_text())["test/top1"]
        found.setdefault(key, {})[config["seed"]] = value
    return found


def test_smoke_table_renders_the_runs_own_numbers(smoke_runs, tmp_path):
    result = run_entry("reproduce.py", "smoke", "--render", "--runs-dir", str(smoke_runs), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    rendered = read_csv(tmp_path / "smoke.csv")
    expected = own_numbers(smoke_runs)
    assert set(rendered) == set(expected) == {("t0.2", "knn_val"), ("t0.2", "linear"), ("t0.5", "knn_val"),
                                              ("t0.5", "linear"), ("scratch", "linear")}
    for key, by_seed in expected.items():
        line = rendered[key]
        assert sorted(by_seed) == [0, 1] and line["n_finished"] == "2" and line["missing"] == ""
        assert {int(s): float(v) for s, v in (p.split(":") for p in line["values"].split())} == by_seed
        mean, std = statistics.fmean(by_seed.values()), statistics.stdev(by_seed.values())
        assert float(line["mean"]) == mean and float(line["std"]) == std
        assert f"{mean:.2f} ± {std:.2f} (2 seeds)" in result.stdout  # the Markdown shows the same numbers
    assert (tmp_path / "smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout.startswith("### Smoke") and "| row | setting | column | ours | published |" in result.stdout
    # the claims: each verdict is the one the rule gives on the rendered per-seed values
    from tables.claims import judge

    claims = json.loads((tmp_path / "smoke_claims.json").read_text())
    assert [c["claim"] for c in claims] == ["t0.5 > scratch on linear", "t0.5/linear > t0.5/knn_val"]
    for claim in claims:
        better, worse = ([v for _, v in sorted(expected[(claim[row], claim[column])].items())]
                         for row, column in (("better", "column"), ("worse", "worse_column")))
        assert (claim["better_values"], claim["worse_values"]) == (better, worse) and not claim["missing"]
        assert (claim["verdict"], claim["p_value"]) == judge(better, worse)
        assert f"| {claim['claim']} |" in result.stdout and f"**{claim['verdict']}**" in result.stdout


def test_rows_restrict_every_action(smoke_runs, tmp_path, capsys):
    """--rows: only those rows' runs are printed, run (here: found finished and skipped) and rendered, with the claims
    among them; an unknown row is one error line."""
    reproduce_entry.main(["smoke", "--print", "--launcher", "python", "--rows", "t0.5"])
    printed = capsys.readouterr().out
    assert printed.count("\npython ") == 4 and "t0.2" not in printed and "scratch" not in printed
    reproduce_entry.main(["smoke", "--run", "--render", "--rows", "scratch", "t0.5", "--runs-dir", str(smoke_runs),
                          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert out.count("skipped") == 6 and "starting" not in out and "| t0.2 |" not in out
    assert "| t0.5 > scratch on linear |" in out
    assert_user_error_here(capsys, reproduce_entry.main, ["smoke", "--print", "--rows", "t9"], "has no row 't9'")


def test_run_again_skips_finished_runs(smoke_runs):
    before = sorted(p.name for p in (smoke_runs / "smoke").iterdir())
    result = run_entry("reproduce.py", "smoke", "--run", "--runs-dir", str(smoke_runs))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("skipped") == SMOKE_RUNS and "starting" not in result.stdout
    assert sorted(p.name for p in (smoke_runs / "smoke").iterdir()) == before


def test_runs_are_matched_by_config_not_by_name(smoke_runs, tmp_path):
    runs = copy_of(smoke_runs, tmp_path)
    # Move a pretraining run and its evaluation elsewhere under other names: still found (the evaluation is tied
    # to its encoder by SHA-256, so the stale checkpoint path in its config does not matter).
    pretrain = next(p for p in (runs / "smoke").iterdir() if p.name.startswith("t0.5-s0-") and "linear" not in p.name)
    linear = next(p for p in (runs / "smoke").iterdir() if p.name.startswith("t0.5-s0-linear"))
    (runs / "by_hand").mkdir()
    pretrain.rename(runs / "by_hand" / "my-pretraining")
    linear.rename(runs / "by_hand" / "my-probe")
    # A run at a planned name whose config says otherwise (another temperature) does not count.
    other = next(p for p in (runs / "smoke").iterdir() if p.name.startswith("t0.2-s1-") and "linear" not in p.name)
    config = other / "config.yaml"
    config.write_text(config.read_text().replace("temperature: 0.2", "temperature: 0.3"))
    result = run_entry("reproduce.py", "smoke", "--collect", "--render", "--runs-dir", str(runs), "--out",
                       str(tmp_path))
    assert result.returncode == 0, result.stderr
    rendered = read_csv(tmp_path / "smoke.csv")
    assert rendered[("t0.5", "linear")]["n_finished"] == "2"
    assert str(runs / "by_hand" / "my-probe") in rendered[("t0.5", "linear")]["runs"]
    assert rendered[("t0.2", "knn_val")]["missing"] == "1:not run"
    assert rendered[("t0.2", "linear")]["missing"] == "1:pretraining not run"
    assert "seed 1: not run" in result.stdout
    listing = json.loads((tmp_path / "collected.json").read_text())
    assert sum(item["status"] == "finished" for item in listing) == SMOKE_RUNS - 2


def test_unfinished_pretraining_shows_and_resumes(smoke_runs, tmp_path):
    runs = copy_of(smoke_runs, tmp_path)
    pretrain = next(p for p in (runs / "smoke").iterdir() if p.name.startswith("t0.2-s1-") and "linear" not in p.name)
    (pretrain / "summary.json").unlink()  # as if killed after its last checkpoint, before finishing
    (pretrain / "encoder.pt").unlink()
    lines = (pretrain / "metrics.jsonl").read_text().splitlines()
    (pretrain / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    result = run_entry("reproduce.py", "smoke", "--render", "--runs-dir", str(runs), "--out", str(tmp_path))
    epoch = json.loads(lines[2])["epoch"]
    assert f"seed 1: unfinished (epoch {epoch:g}/2)" in result.stdout
    assert f"seed 1: pretraining unfinished (epoch {epoch:g}/2)" in result.stdout
    knn = read_csv(tmp_path / "smoke.csv")[("t0.2", "knn_val")]
    assert knn["n_finished"] == "1" and float(knn["mean"]) == own_numbers(smoke_runs)[("t0.2", "knn_val")][0]
    rerun = run_entry("reproduce.py", "smoke", "--run", "--runs-dir", str(runs))
    assert rerun.returncode == 0, rerun.stderr
    assert f"resuming in {pretrain}" in rerun.stdout and "resume: from epoch 2" in rerun.stdout
    assert json.loads((pretrain / "summary.json").read_text())["status"] == "finished"


def test_diverged_rows_show_as_diverged(tmp_path):
    path = smoke_variant(tmp_path / "diverging.yaml", name="diverging", seeds=[0], plot=None,
                         rows=[{"name": "huge-lr", "pretrain": ["optim.name=sgd", "optim.base_lr=1e30"]}])
    result = run_entry("reproduce.py", str(path), "--run", "--render", "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr  # a divergence is a result, not a failure of the runner
    assert "error: loss became" in result.stderr and "skipped, its pretraining is diverged at step" in result.stdout
    rendered = read_csv(tmp_path / "runs" / "diverging" / "diverging.csv")
    assert rendered[("huge-lr", "knn_val")]["missing"].startswith("0:diverged at step")
    assert rendered[("huge-lr", "linear")]["missing"].startswith("0:pretraining diverged at step")
    assert "| huge-lr | `optim.name=sgd`, `optim.base_lr=1e30` | kNN top-1, val split (%) | diverged at step" \
        in result.stdout


def test_run_with_torchrun(tmp_path):
    """--launcher torchrun: each run is `python -m torch.distributed.run --standalone` with 2 processes (gloo)."""
    path = smoke_variant(tmp_path / "two_procs.yaml", name="two_procs", seeds=[0], plot=None,
                         rows=[{"name": "t0.5", "pretrain": ["loss.temperature=0.5"]}])
    result = run_entry("reproduce.py", str(path), "--run", "--render", "--launcher", "torchrun", "--nproc-per-node",
                       "2", "--runs-dir", str(tmp_path / "runs"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("2 process(es)") == 2  # the pretraining and the probe each ran as 2 processes
    rendered = read_csv(tmp_path / "runs" / "two_procs" / "two_procs.csv")
    assert rendered[("t0.5", "knn_val")]["n_finished"] == rendered[("t0.5", "linear")]["n_finished"] == "1"


def parse_printed(line: str):
    """A printed command -> (schema, config) through the config loader, whatever its launcher."""
    tokens = shlex.split(line)
    script = "pretrain.py"
    if tokens[0].startswith("job_"):  # job_X=$([SCRIPT=finetune.py] sbatch --parsable ... scripts/slurm.sbatch ARGS)
        assert tokens[0].endswith("=$(sbatch") or tokens[0].endswith("=$(SCRIPT=finetune.py")
        script = "finetune.py" if "SCRIPT=finetune.py" in tokens[0] else script
        assert (REPO / "scripts/slurm.sbatch").is_file() and tokens[-1].endswith(")")
        args = tokens[tokens.index("scripts/slurm.sbatch") + 1:]
        args[-1] = args[-1][:-1]
    else:
        script = next(t for t in tokens if t.endswith(".py"))
        args = tokens[tokens.index(script) + 1:]
    assert (REPO / script).is_file()
    schema = PretrainConfig if script == "pretrain.py" else FinetuneConfig
    return schema, load_config(args, schema)


def test_simclr_b9_prints_a_command_for_every_row_that_parses():
    result = run_entry("reproduce.py", "simclr_b9", "--print")
    assert result.returncode == 0, result.stderr
    spec = load_table("simclr_b9")
    commands = [line for line in result.stdout.splitlines() if line and not line.startswith("#")]
    assert len(commands) == 3 * (2 * 20 + 1)  # python, torchrun, sbatch for 20 pretrainings + probes, 1 supervised
    for launcher in ("python ", "torchrun --nproc-per-node 8 ", "job_"):
        assert any(c.startswith(launcher) for c in commands), launcher
    grid, probes, supervised = set(), 0, 0
    for line in commands:
        schema, cfg = parse_printed(line)
        if schema is PretrainConfig:
            assert cfg.model.arch == "resnet50" and cfg.loss.temperature == 0.5 and cfg.optim.name == "lars"
            grid.add((cfg.train.batch_size, cfg.train.epochs))
        elif cfg.checkpoint == "none":
            assert cfg.eval.mode == "finetune" and cfg.model.arch == "resnet50" and cfg.train.batch_size == 1024
            supervised += 1
        else:
            assert cfg.eval.mode == "linear" and cfg.checkpoint.startswith("runs/simclr_b9/b")
            probes += 1
    assert grid == {(b, e) for b in (256, 512, 1024, 2048, 4096) for e in (100, 200, 500, 1000)}
    assert probes == 3 * 20 and supervised == 3
    for row in spec.rows:  # every row is named in a command's comment
        assert f" for {row.name}" in result.stdout or f", {row.name}" in result.stdout


def test_printed_sbatch_lines_submit_the_table_in_order(tmp_path):
    """`--print --launcher sbatch | bash` submits every run once, each evaluation after its own pretraining
    (afterok), with SCRIPT=finetune.py for evaluations. A stand-in `sbatch` records what it was given."""
    log = tmp_path / "submitted.jsonl"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f"""#!/usr/bin/env python3
import json, os, sys
with open({str(log)!r}, "a") as f:
    f.write(json.dumps({{"args": sys.argv[1:], "script": os.environ.get("SCRIPT", "pretrain.py")}}) + "\\n")
print(sum(1 for _ in open({str(log)!r})) + 1000)
""")
    fake.chmod(0o755)
    printed = run_entry("reproduce.py", "smoke", "--print", "--launcher", "sbatch", "--nproc-per-node", "4", "--nodes",
                        "2")
    assert printed.returncode == 0, printed.stderr
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}"}
    shell = subprocess.run(["bash", "-euo", "pipefail"], input=printed.stdout, env=env, cwd=REPO, text=True,
                           capture_output=True)
    assert shell.returncode == 0, shell.stderr
    jobs = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(jobs) == SMOKE_RUNS and all({"--gpus-per-node=4", "--nodes=2"} <= set(j["args"]) for j in jobs)
    job_id = {next(a for a in j["args"] if a.startswith("run.name=")): 1001 + i for i, j in enumerate(jobs)}
    for job in jobs:
        checkpoint = next((a.split("=", 1)[1] for a in job["args"] if a.startswith("checkpoint=")), None)
        dependency = [a for a in job["args"] if a.startswith("--dependency=")]
        if job["script"] == "pretrain.py":
            assert checkpoint is None and not dependency
        elif checkpoint == "none":  # a row without pretraining waits for nothing
            assert not dependency
        else:
            assert job["script"] == "finetune.py"
            assert dependency == [f"--dependency=afterok:{job_id['run.name=' + Path(checkpoint).name]}"]


@pytest.mark.parametrize("name", available_tables())
def test_every_table_plans(name):
    spec = load_table(name)
    plan = plan_table(spec, spec.seeds, "runs")
    assert plan.runs and all((row.name, seed, column.evaluation) in plan.by_cell
                             for row in spec.rows for seed in spec.seeds for column in spec.row_columns(row))
    for row in spec.rows:  # a published value is either a number or marked as read off a figure
        assert all((p.value is None) == p.figure_only for p in row.published.values()), row.name


def test_published_values_are_the_ones_the_sources_state():
    b9, refs = load_table("simclr_b9"), load_table("resnet18_references")
    stated = {(r.name, c): p.value for r in b9.rows + refs.rows for c, p in r.published.items() if p.value}
    assert stated == {("b1024-e1000", "linear"): 94.0, ("supervised", "supervised"): 95.1,
                      ("e1000-vs-dkobak", "linear"): 91.7, ("e1000-vs-dkobak", "knn"): 91.4,
                      ("e1000-vs-solo-learn", "linear"): 90.74, ("e200-b512-vs-lightly", "knn"): 84.8}


def test_wandb_runs_are_matched_like_run_directories(smoke_runs):
    """The W&B collector, given runs carrying what pretrain.py / finetune.py send to W&B (config, summary,
    job_type), finds the same numbers as the run directories. (A fake API: no network here.)"""

    class FakeRun:
        def __init__(self, run_dir: Path):
            self.config = {**yaml.safe_load((run_dir / "config.yaml").read_text()), "git_sha": "abc", "_wandb": {}}
            evaluation = "checkpoint" in self.config
            self.summary = json.loads((run_dir / ("results.json" if evaluation else "summary.json")).read_text())
            self.job_type = self.config["eval"]["mode"] if evaluation else "pretrain"
            self.id, self.state = run_dir.name, "finished"

    class FakeApi:
        def runs(self, path, filters):
            assert path == "me/simclr-cifar10" and filters == {"group": "smoke"}
            return [FakeRun(p.parent) for p in smoke_runs.rglob("config.yaml")]

    spec = load_table("smoke")
    plan = plan_table(spec, spec.seeds, str(smoke_runs))
    from_dirs = build_cells(plan, match(plan, scan_run_dirs(smoke_runs)))
    from_wandb = build_cells(plan, match(plan, wandb_records(FakeApi(), "me/simclr-cifar10", "smoke")))
    assert [c.values for c in from_wandb] == [c.values for c in from_dirs]
    assert all(len(c.values) == 2 for c in from_wandb)


def test_bad_input_is_one_error_line(tmp_path, capsys):
    assert_user_error(run_entry("reproduce.py", "no_such_table", "--print"), "no table 'no_such_table'")  # as a process
    for argv, fragment in [
            (["smoke"], "say what to do"),
            (["smoke", "--print", "--bogus"], "unrecognized arguments"),
            (["smoke", "--print", "train.epoch=3"], "names no config key"),
            (["smoke", "--run", "--launcher", "sbatch"], "--print --launcher sbatch"),
            ([smoke_variant(tmp_path / "a.yaml", rows=[{"name": "r", "pretrain": ["loss.temprature=0.1"]}]), "--print"],
             "row 'r': unknown config key 'loss.temprature'"),
            ([smoke_variant(tmp_path / "b.yaml", rows=[{"name": "r", "columns": ["nope"]}]), "--print"],
             "unknown columns ['nope']"),
            ([smoke_variant(tmp_path / "c.yaml", rows=[{"name": "a/b"}]), "--print"], "row name 'a/b' may hold only"),
            ([smoke_variant(tmp_path / "d.yaml", colums=[]), "--print"], "colums")]:
        assert_user_error_here(capsys, reproduce_entry.main, [str(a) for a in argv], fragment)


def test_peer_parity_rows_run_each_peer_recipe_with_its_protocol():
    spec = load_table("peer_parity")
    stated = {(r.name, c): p.value for r in spec.rows for c, p in r.published.items()}
    assert stated == {("kobak-e100", "knn10"): 83.2, ("kobak-e100", "linear"): 85.6,
                      ("lightly-e200", "knn200_max"): 84.8, ("kobak-e500", "knn10"): 90.3,
                      ("kobak-e1000", "knn10"): 91.4, ("kobak-e1000", "linear"): 91.7,
                      ("solo-learn-e1000", "online"): 90.74}
    plan = plan_table(spec, spec.seeds, "runs")
    pre = {row.name: plan.by_cell[(row.name, 0, "pretrain")] for row in spec.rows}
    assert any("kobak_resnet18.yaml" in a for a in pre["kobak-e100"].args)
    assert any("lightly_resnet18.yaml" in a for a in pre["lightly-e200"].args)
    kobak, lightly = (load_config(p.args, PretrainConfig) for p in (pre["kobak-e100"], pre["lightly-e200"]))
    assert (kobak.train.epochs, kobak.optim.base_lr, kobak.aug.normalize) == (100, 0.06, "none")
    assert (lightly.train.epochs, lightly.model.proj_out_bn, lightly.eval.knn_test_monitor) == (200, True, True)
    knn10 = load_config(plan.by_cell[("kobak-e100", 0, "knn10")].args, FinetuneConfig)
    assert (knn10.eval.mode, knn10.eval.knn_k, knn10.eval.knn_vote, knn10.data.val_size) == ("knn", 10, "majority", 0)
    solo = load_config(pre["solo-learn-e1000"].args, PretrainConfig)
    assert (solo.eval.online_linear, solo.loss.temperature, solo.optim.lars_trust_coeff) == (True, 0.2, 0.02)


def test_committed_simclr_v2_semi_records_fill_every_cell_with_their_teachers():
    """The records committed under bench/results/tables/simclr_v2_semi (docs/evaluation.md renders them): every cell
    has its 3 seeds, each distillation is matched to the very classifier it learnt from, every claim gets a
    verdict."""
    from tables.claims import check_claims

    spec = load_table("simclr_v2_semi")
    runs_dir = REPO / "bench" / "results" / "tables" / "simclr_v2_semi"
    plan = plan_table(spec, spec.seeds, str(runs_dir))
    found = match(plan, scan_run_dirs(runs_dir))
    cells = build_cells(plan, found)
    assert [len(cell.values) for cell in cells] == [len(spec.seeds)] * len(cells), [c.missing for c in cells]
    for run in (r for r in plan.runs if r.teacher is not None):
        student, teacher = found[run.name].values, found[run.teacher.name].values
        assert student["mode"] == "distill" and teacher["mode"] == "finetune" and teacher["features"] == "head1"
        assert student["teacher_sha256"] == teacher["classifier_sha256"]
        assert student["label_fraction"] == teacher["label_fraction"]
        assert student["data/labeled_images"] == teacher["data/train_images"] < student["data/train_images"]
    assert len(check_claims(spec.claims, cells)) == len(spec.claims)
