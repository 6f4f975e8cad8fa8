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


def _cells(values_by_row, seeds=(0, 1, 2)):
    """Rendered cells of one column 'top1' from hand-written per-seed values (None: the seed did not run)."""
    from tables.render import Cell
    from tables.spec import Column, Row

    column, cells = Column(name="top1", evaluation="pretrain", metric="m"), []
    for name, values in values_by_row.items():
        cell = Cell(Row(name=name), column)
        for seed, value in zip(seeds, values):
            if value is None:
                cell.missing[seed] = "not run"
            else:
                cell.values[seed] = value
        cells.append(cell)
    return cells


def test_claim_verdicts_from_the_seeds():
    from tables.claims import DOES_NOT_HOLD, HOLDS, UNDECIDED, check_claims, judge
    from tables.spec import Claim

    assert judge([60.1, 60.8, 61.0], [55.2, 54.9, 56.0])[0] == HOLDS
    assert judge([55.2, 54.9, 56.0], [60.1, 60.8, 61.0])[0] == DOES_NOT_HOLD
    assert judge([60.1, 57.0, 62.0], [59.0, 61.5, 58.0])[0] == UNDECIDED  # within the spread
    assert judge([60.0, 60.0], [59.0, 59.0]) == (HOLDS, 0.0)  # no spread at all: the means decide
    assert judge([60.0, 60.0], [60.0, 60.0]) == (UNDECIDED, None)
    assert judge([70.0], [50.0, 51.0]) == (UNDECIDED, None)  # one seed is no spread to judge by
    cells = _cells({"a": [60.1, 60.8, None], "b": [55.2, None, None], "c": [55.0, 54.0, 56.5]})
    partial, lonely = check_claims([Claim(better="a", worse="c", column="top1"),
                                    Claim(better="a", worse="b", column="top1")], cells)
    assert partial.verdict == HOLDS and partial.missing == ["a/top1 seed 2: not run"]
    assert partial.better == [60.1, 60.8] and abs(partial.difference - ((60.1 + 60.8) / 2 - 165.5 / 3)) < 1e-9
    assert lonely.verdict == UNDECIDED and lonely.missing == ["a/top1 seed 2: not run", "b/top1 seed 1: not run",
                                                              "b/top1 seed 2: not run"]


def test_claim_p_value_is_welchs():
    """The one-sided p-value against Welch's t statistic and Welch-Satterthwaite degrees of freedom, by hand."""
    import statistics

    from scipy.stats import t as student_t

    from tables.claims import one_sided_p

    a, b = [61.0, 59.5, 60.7], [59.9, 58.2, 60.1, 58.8]
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    t = (statistics.fmean(a) - statistics.fmean(b)) / (va + vb) ** 0.5
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    assert abs(one_sided_p(a, b) - student_t.sf(t, df)) < 1e-12
    assert abs(one_sided_p(b, a) - (1 - student_t.sf(t, df))) < 1e-12


def test_claims_and_rows_are_checked_against_the_spec(tmp_path):
    import pytest
    import yaml

    from core.errors import UserError
    from tables.spec import REPO, select_rows

    spec = yaml.safe_load((REPO / "configs" / "tables" / "smoke.yaml").read_text())
    for claim, fragment in [({"better": "t0.9", "worse": "t0.5", "column": "linear"}, "names row 't0.9'"),
                            ({"better": "scratch", "worse": "t0.5", "column": "knn_val"},
                             "row 'scratch' is not measured in column 'knn_val'"),
                            ({"better": "t0.5", "worse": "t0.5", "column": "linear"}, "with itself")]:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({**spec, "claims": [claim]}))
        with pytest.raises(UserError, match=fragment):
            load_table(str(path))
    smoke = load_table("smoke")
    chosen = select_rows(smoke, ["scratch", "t0.5"])
    assert [r.name for r in chosen.rows] == ["t0.5", "scratch"] and len(chosen.claims) == 2
    assert [c.worse for c in select_rows(smoke, ["t0.5"]).claims] == ["t0.5"]  # the claim within the row stays
    with pytest.raises(UserError, match="has no row 't9'; its rows: t0.2, t0.5, scratch"):
        select_rows(smoke, ["t9"])


def test_distillation_rows_learn_from_the_teacher_rows_run_of_the_same_column():
    """simclr_v2_semi: each distillation run is launched with teacher= its teacher row's run of the same evaluation
    and seed, waits for it (afterok on both jobs), and only a run that read that teacher's classifier counts."""
    from tables.collect import inputs_pending
    from tables.plan import command

    plan = plan_table(load_table("simclr_v2_semi"), [0, 1], "runs")
    for stage in ("ft1", "ft10"):
        for seed in (0, 1):
            student, teacher = plan.by_cell[("distill_same", seed, stage)], plan.by_cell[("from_head1", seed, stage)]
            assert student.teacher is teacher and teacher.teacher is None
            assert f"teacher={teacher.path}" in student.command_args() and "eval.mode=distill" in student.args
            assert plan.runs.index(teacher) < plan.runs.index(student)
            line = command(student, "sbatch")
            assert f"--dependency=afterok:$job_{student.pretraining.name.replace('-', '_')}:" \
                   f"$job_{teacher.name.replace('-', '_')} " in line
    half = plan.by_cell[("distill_half", 0, "ft1")]
    assert half.teacher is plan.by_cell[("from_head1", 0, "ft1")] and half.pretraining.expected["model.width"] == 4
    student, teacher = plan.by_cell[("distill_same", 0, "ft1")], plan.by_cell[("from_head1", 0, "ft1")]
    pretrainings = [_record(r) for r in plan.runs if r.stage == "pretrain"]
    taught = _record(teacher)
    taught.values["classifier_sha256"] = "cls"
    assert inputs_pending(student, match(plan, pretrainings)) == ("teacher", "not run")
    assert inputs_pending(student, match(plan, pretrainings + [taught])) is None
    other = _record(student, teacher="/elsewhere")
    other.values["teacher_sha256"] = "another classifier"
    assert match(plan, pretrainings + [taught, other])[student.name] is None  # learnt from another teacher
    right = _record(student, teacher="/elsewhere")
    right.values["teacher_sha256"] = "cls"
    assert match(plan, pretrainings + [taught, other, right])[student.name] is right
    assert match(plan, pretrainings + [_record(student, teacher="")])[student.name] is None


def test_teacher_rows_are_checked_against_the_spec(tmp_path):
    import pytest
    import yaml

    from core.errors import UserError
    from tables.spec import REPO

    spec = yaml.safe_load((REPO / "configs" / "tables" / "simclr_v2_semi.yaml").read_text())
    rows = {row["name"]: row for row in spec["rows"]}
    cases = [({**rows["distill_same"], "teacher": "supervised"}, "which is not a row listed before it"),
             ({**rows["distill_same"], "teacher": "distill_same"}, "which is not a row listed before it"),
             ({**rows["distill_same"], "teacher": None}, "eval.mode=distill, which needs `teacher:`"),
             ({**rows["from_head1"], "name": "taught", "teacher": "from_encoder"}, "with a teacher; distillation is")]
    for row, fragment in cases:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({**spec, "claims": [], "rows": [
            rows["from_encoder"], rows["from_head1"], {**row, "name": row.get("name") + "_x"}, rows["supervised"]]}))
        with pytest.raises(UserError, match=fragment):
            plan_table(load_table(str(path)), [0], "runs")
    narrow = {**rows["from_head1"], "columns": ["ft1"]}
    path.write_text(yaml.safe_dump({**spec, "claims": [], "rows": [narrow, rows["distill_same"]]}))
    with pytest.raises(UserError, match="distils from 'from_head1', which runs no ft10"):
        load_table(str(path))
