"""--help is generated from configs/schema.py (every key, its default and its comment); --print-config prints the
resolved config and runs nothing."""
from __future__ import annotations

import re

import pytest
import yaml

from configs.help import describe, help_text
from configs.load import config_keys, load_config
from configs.schema import FinetuneConfig, PretrainConfig
from tests.conftest import assert_user_error, run_entry
from core.errors import Answered, UserError

LISTED_KEY = re.compile(r"^  ([a-z_][a-z_.0-9]*)=", re.MULTILINE)


@pytest.mark.parametrize("script, schema", [("pretrain.py", PretrainConfig), ("finetune.py", FinetuneConfig)])
def test_help_lists_every_schema_key_and_fits_a_terminal(script, schema, tmp_path):
    result = run_entry(script, "--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and "Traceback" not in result.stdout
    assert LISTED_KEY.findall(result.stdout) == config_keys(schema)  # every key, in schema order, nothing else
    assert max(len(line) for line in result.stdout.splitlines()) <= 100
    assert f"usage: python {script}" in result.stdout
    assert list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_help_shows_default_type_allowed_values_and_the_schema_comment():
    text = help_text(PretrainConfig, "usage: x", "summary", width=100)
    assert "  optim.name=lars  (str; lars | sgd | adamw)" in text
    assert "  aug.min_scale=0.08  (float; in (0, 1])" in text
    assert "  model.width=null  (int or null; >= 1)" in text
    assert "  probe.wd_grid=[0.0,1e-05,0.0001,0.001,0.01]  (list of float)" in text
    # the comment beside the field, and the comment block above a field, both reach the help
    assert "random resized crop: smallest area fraction" in text
    assert "image-folder directory or a .tar/.tar.gz/.tar.xz archive" in re.sub(r"\s+", " ", text)


def test_every_key_has_a_description_and_defaults_match_the_schema():
    for schema in (PretrainConfig, FinetuneConfig):
        described = {k.key: k for k in describe(schema)}
        assert list(described) == config_keys(schema)
        assert all(k.description for k in described.values()), [k.key for k in described.values() if not k.description]
    finetune = {k.key: k.default for k in describe(FinetuneConfig)}
    assert finetune["train.epochs"] == FinetuneConfig().train.epochs == 100  # the section's own defaults


def test_help_for_one_section(capsys):
    with pytest.raises(Answered) as answer:
        load_config(["--help", "optim"], PretrainConfig, prog="pretrain.py")
    keys = LISTED_KEY.findall(answer.value.text)
    assert keys and all(k.startswith("optim.") for k in keys)
    assert keys == [k for k in config_keys(PretrainConfig) if k.startswith("optim.")]
    with pytest.raises(Answered) as same:
        load_config(["--help=optim"], PretrainConfig)
    assert LISTED_KEY.findall(same.value.text) == keys
    with pytest.raises(UserError, match="no such section; sections: data, model"):
        load_config(["--help", "optimizer"], PretrainConfig)


def test_print_config_resolves_file_and_overrides_and_runs_nothing(tmp_path, capsys, monkeypatch):
    import pretrain as pretrain_entry
    from rundir.cli import run_cli

    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  epochs: 7\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:  # as `python pretrain.py ...` ends: run_cli prints, exits 0
        run_cli(pretrain_entry.main, ["--config", str(recipe), "optim.base_lr=0.3", "--print-config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["epochs"] == 7 and printed["optim"]["base_lr"] == 0.3
    assert printed["model"]["arch"] == "resnet18"  # defaults filled in
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no run directory, no data read


def test_print_config_still_validates():
    with pytest.raises(UserError, match="optim.name='lamb' is not one of"):
        load_config(["optim.name=lamb", "--print-config"], PretrainConfig)
    result = run_entry("finetune.py", "eval.mode=probe", "--print-config")
    assert_user_error(result, "eval.mode='probe' is not one of linear, finetune, knn")
