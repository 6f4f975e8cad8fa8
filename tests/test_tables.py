"""Table planning and matching as units (tests/test_reproduce.py runs them end to end)."""
from configs.load import to_dict
from configs.schema import FinetuneConfig, PretrainConfig
from tables.collect import RunRecord, match
from tables.plan import comparable, plan_table
from tables.spec import load_table


def test_comparable_keeps_what_decides_results_and_fills_defaults():
    config = to_dict(PretrainConfig())
    config["run"]["name"], config["device"], config["train"]["compile"] = "anything", "cuda:3", True
    config["wandb_extra"] = {"from": "W&B"}  # keys the schema lacks are dropped
    del config["aug"]["normalize"]  # a run from before the key existed: takes its default
    kept = comparable(config, PretrainConfig)
    assert kept == comparable(to_dict(PretrainConfig()), PretrainConfig)
    assert not any(k.startswith(("run.", "wandb.", "device")) or k == "train.compile" for k in kept)
    assert kept["aug.normalize"] == "auto" and kept["train.epochs"] == 1000
    assert comparable({"train": {"epochs": "many"}}, PretrainConfig) is None  # does not fit the schema


def _record(run, status="finished", sha="abc", **extra):
    kind = "pretrain" if run.stage == "pretrain" else "evaluation"
    values = {"encoder_sha256": sha} if kind == "pretrain" else {"checkpoint_sha256": sha}
    return RunRecord(kind, dict(run.expected), status, values, where=f"/runs/{run.name}-{status}", **extra)


def test_match_prefers_finished_runs_and_checks_the_encoder_an_evaluation_read():
    plan = plan_table(load_table("smoke"), [0], "runs")
    pretraining = next(r for r in plan.runs if r.stage == "pretrain")
    evaluation = next(r for r in plan.runs if r.pretraining is pretraining)
    records = [_record(pretraining, "unfinished"), _record(pretraining, "finished"),
               _record(evaluation, sha="other encoder")]
    found = match(plan, records)
    assert found[pretraining.name].status == "finished"  # of two matching runs, the finished one speaks
    assert found[evaluation.name] is None  # an evaluation of another encoder does not count
    found = match(plan, records + [_record(evaluation, sha="abc")])
    assert found[evaluation.name].checkpoint_sha256 == "abc"
    edited = _record(pretraining)
    edited.config["loss.temperature"] = 0.9  # another recipe: never matched, whatever its name
    assert match(plan, [edited])[pretraining.name] is None


def test_every_planned_run_resolves_through_the_config_loader():
    plan = plan_table(load_table("peer_parity"), [0, 1], "runs")
    assert {r.seed for r in plan.runs} == {0, 1} and len({r.name for r in plan.runs}) == len(plan.runs)
    for run in plan.runs:
        schema = PretrainConfig if run.stage == "pretrain" else FinetuneConfig
        assert comparable(run.expected, schema) == run.expected  # already in comparable form


def test_a_collapsed_pretraining_counts_for_no_cell(tmp_path):
    """summary.json's "collapsed" (pretrain.py's embedding-collapse check) makes the run speak as collapsed, like a
    diverged one: its number is not averaged into a cell and evaluations of its encoder wait on it."""
    import json

    import yaml

    from tables.collect import describe, scan_run_dirs

    for name, collapsed in (("fine", False), ("flat", True)):
        run = tmp_path / name
        run.mkdir()
        (run / "config.yaml").write_text(yaml.safe_dump(to_dict(PretrainConfig())))
        (run / "summary.json").write_text(json.dumps({"status": "finished", "knn/top1": 11.0, "train/z_std": 0.12,
                                                      "collapsed": collapsed, "encoder_sha256": name}))
    records = {r.where.rsplit("/", 1)[-1]: r for r in scan_run_dirs(tmp_path)}
    assert records["fine"].status == "finished" and records["flat"].status == "collapsed"
    assert describe(records["flat"]) == "collapsed (train/z_std 0.12)"
