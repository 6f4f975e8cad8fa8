"""finetune.py: each mode and checkpoint form through the real command line, results.json, bad input.

Runs that only check a detail call the same ``run_cli(main, argv)`` that ``python finetune.py`` calls, in this
process: a subprocess spends ~6 s importing torch and timm before it does anything.
"""
import json

import pytest
import torch

import finetune as finetune_entry
from rundir.checkpoint import sha256_of
from tests.conftest import assert_user_error, assert_user_error_here, read_jsonl, run_entry, tiny_run_args

RESULT_KEYS = {"test/top1", "test/top5", "val/top1", "test/per_class", "test/confusion", "data/train_images", "mode",
               "label_fraction", "checkpoint", "checkpoint_sha256", "git_sha", "config"}


@pytest.fixture(scope="module")
def pretrained(pretrained_run):
    return pretrained_run


def eval_args(run_dir, *extra):
    return ["data.name=synthetic", "device=cpu", "data.val_size=500", "probe.epochs=5", "train.epochs=1",
            "train.batch_size=100", "train.log_every=20", "eval.knn_k=20", "wandb.mode=disabled",
            f"run.dir={run_dir}", "run.name=eval", *extra]


def finetune(run_dir, *extra):
    """The real entrypoint in a subprocess -> (completed process, results.json)."""
    result = run_entry("finetune.py", *eval_args(run_dir, *extra))
    assert result.returncode == 0, result.stderr
    return result, json.loads((run_dir / "eval" / "results.json").read_text())


def finetune_here(run_dir, *extra):
    """The entrypoint's main() in this process -> results.json."""
    finetune_entry.main(eval_args(run_dir, *extra))
    return json.loads((run_dir / "eval" / "results.json").read_text())


def user_error_here(capsys, argv, fragment):
    """``run_cli(main, argv)`` as ``python finetune.py`` runs it: exit status 2 and one `error:` line."""
    assert_user_error_here(capsys, finetune_entry.main, argv, fragment)


@pytest.mark.parametrize("mode, checkpoint", [("linear", "."), ("knn", "encoder.pt"),
                                              ("finetune", "checkpoints/last.pt")])
def test_each_mode_writes_its_results(tmp_path, pretrained, mode, checkpoint):
    result, record = finetune(tmp_path, f"checkpoint={pretrained / checkpoint}", f"eval.mode={mode}")
    assert RESULT_KEYS <= set(record) and record["mode"] == mode and record["label_fraction"] == 1.0
    assert record["config"]["eval"]["mode"] == mode
    read = pretrained / ("encoder.pt" if checkpoint == "." else checkpoint)
    assert record["checkpoint"] == str(read) and record["checkpoint_sha256"] == sha256_of(read)
    assert 0 <= record["test/top1"] <= record["test/top5"] <= 100
    assert record["data/train_images"] == (5000 if mode == "linear" else 4500)  # linear refits on train + val
    confusion = torch.tensor(record["test/confusion"])
    assert confusion.shape == (10, 10) and confusion.sum() == 1000
    assert confusion.diag().sum().item() / 10 == pytest.approx(record["test/top1"])
    assert len(record["test/per_class"]) == 10
    assert (tmp_path / "eval" / "confusion.png").read_bytes()[:4] == b"\x89PNG"
    last_line = result.stdout.strip().splitlines()[-1]
    assert last_line.startswith("result: ") and f"test top-1 {record['test/top1']:.2f}%" in last_line
    final = json.loads((tmp_path / "eval" / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["test/top1"] == record["test/top1"] and final["val/top1"] == record["val/top1"]


def test_last_pt_and_encoder_pt_hold_the_same_encoder(tmp_path, pretrained):
    from_encoder = finetune_here(tmp_path / "a", f"checkpoint={pretrained / 'encoder.pt'}", "eval.mode=knn")
    from_last = finetune_here(tmp_path / "b", f"checkpoint={pretrained / 'checkpoints' / 'last.pt'}", "eval.mode=knn")
    assert from_encoder["test/confusion"] == from_last["test/confusion"]


def test_supervised_baseline_and_label_fraction(tmp_path):
    record = finetune_here(tmp_path, "checkpoint=none", "model.arch=resnet18", "model.width=4",
                              "eval.mode=finetune", "eval.label_fraction=0.1", "train.epochs=2", "eval.val_every=1")
    assert record["checkpoint"] == "none" and record["checkpoint_sha256"] is None
    assert record["data/train_images"] == 500  # 10% of the 5,000 synthetic training images, 50 per class
    records = read_jsonl((tmp_path / "eval" / "metrics.jsonl"))
    assert [r["epoch"] for r in records if "val/top1" in r and "test/top1" not in r] == [1, 2]
    assert all(r["train/loss"] > 0 for r in records if "train/loss" in r)
    assert record["selection/val_images"] == 500 and record["selection/within_fraction"] is False  # held out


def test_selection_on_a_validation_split_within_the_label_fraction(tmp_path, pretrained):
    record = finetune_here(tmp_path, f"checkpoint={pretrained}", "eval.label_fraction=0.1", "probe.epochs=2",
                           "eval.val_share_of_labels=0.2", "probe.wd_grid=[0.0,0.01]")
    assert record["selection/within_fraction"] is True and record["selection/val_images"] == 100
    assert record["data/train_images"] == 500  # refit on train + val: the 10% fraction, nothing beyond it


def test_augmented_linear_protocol(tmp_path, pretrained):
    record = finetune_here(tmp_path, f"checkpoint={pretrained}", "eval.augment=true", "probe.epochs=2",
                           "probe.wd_grid=[0.0,0.001]")
    assert record["probe/augment"] is True and set(record["probe/val_top1_by_wd"]) == {"0", "0.001"}


def test_linear_probe_at_the_end_of_pretraining(tmp_path):
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.linear_at_end=true",
                                                     "probe.epochs=3"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    record = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert summary["linear/test_top1"] == record["test/top1"] and record["mode"] == "linear"
    assert record["data/train_images"] == 800  # the run's 600 training images + 200 validation images (refit)


def test_linear_probe_at_the_end_without_a_validation_split(tmp_path):
    """data.val_size=0 with one weight decay: nothing to choose, so the probe runs (it was a traceback after the whole
    pretraining); with a grid it is refused before any work (test_pretrain.py's bad-input cases)."""
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.linear_at_end=true",
                                                     "probe.epochs=2", "data.val_size=0", "eval.knn_every=0",
                                                     "probe.wd_grid=[1e-4]"))
    assert result.returncode == 0, result.stderr
    assert "weight decay 0.0001 the only one (no validation split)" in result.stdout
    record = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert record["val/top1"] is None and record["probe/weight_decay"] == 1e-4 and 0 <= record["test/top1"] <= 100
    assert json.loads((tmp_path / "tiny" / "summary.json").read_text())["linear/test_top1"] == record["test/top1"]


def broken_encoder(tmp_path, pretrained, change):
    state = torch.load(pretrained / "encoder.pt", weights_only=False)
    change(state["encoder"])
    path = tmp_path / "broken.pt"
    torch.save(state, path)
    return path


def test_strict_loading_names_missing_and_unexpected_keys(tmp_path, pretrained, capsys):
    missing = broken_encoder(tmp_path, pretrained, lambda s: s.pop("conv1.weight"))
    user_error_here(capsys, eval_args(tmp_path, f"checkpoint={missing}"), "missing keys [conv1.weight]")
    extra = broken_encoder(tmp_path, pretrained, lambda s: s.update({"extra.weight": torch.zeros(1)}))
    user_error_here(capsys, eval_args(tmp_path, f"checkpoint={extra}"), "unexpected keys [extra.weight]")
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("args, fragment", [
    (["checkpoint=/no/such/run/encoder.pt"], "does not exist"),
    (["checkpoint=NOT_A_CHECKPOINT"], "is not a readable checkpoint"),
    (["checkpoint=PRETRAINED", "eval.label_fraction=0"], "eval.label_fraction=0.0 is out of range"),
    (["checkpoint=PRETRAINED", "eval.label_fraction=1.5"], "eval.label_fraction=1.5 is out of range"),
    (["checkpoint=PRETRAINED", "eval.mode=probe"], "eval.mode='probe' is not one of linear, finetune, knn"),
    (["checkpoint=PRETRAINED", "eval.label_fractoin=0.1"], "did you mean 'eval.label_fraction'"),
    ([], "checkpoint= is required"),
    (["checkpoint=none"], "checkpoint=none needs model.arch"),
    (["checkpoint=PRETRAINED", "model.arch=resnet50"], "holds a resnet18 (width 4) encoder"),
    (["checkpoint=PRETRAINED", "probe.wd_grid=[]"], "probe.wd_grid"),
    (["checkpoint=PRETRAINED", "eval.mode=finetune", "eval.label_fraction=0.01"], "exceeds the 50"),
])
def test_bad_input(tmp_path, pretrained, capsys, args, fragment):
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("not a checkpoint")
    args = [a.replace("NOT_A_CHECKPOINT", str(not_a_checkpoint)).replace("PRETRAINED", str(pretrained))
            for a in args]
    user_error_here(capsys, eval_args(tmp_path, *args), fragment)
    assert not (tmp_path / "eval" / "results.json").exists()


def test_bad_input_through_the_command_line(tmp_path):
    """The subprocess form of the contract: stderr's last line, exit status 2, no traceback."""
    assert_user_error(run_entry("finetune.py", *eval_args(tmp_path, "checkpoint=/no/such/encoder.pt")),
                      "does not exist")
    assert not (tmp_path / "eval").exists()


def test_existing_results_are_never_overwritten(tmp_path, pretrained, capsys):
    finetune_here(tmp_path, f"checkpoint={pretrained}", "eval.mode=knn")
    before = {p: p.read_bytes() for p in (tmp_path / "eval").iterdir()}
    user_error_here(capsys, eval_args(tmp_path, f"checkpoint={pretrained}", "eval.mode=knn"),
                    "already holds an evaluation")
    assert {p: p.read_bytes() for p in (tmp_path / "eval").iterdir()} == before


def test_evaluations_feed_the_encoder_its_pretraining_normalization(tmp_path, pretrained):
    """encoder.pt records the statistics its inputs were normalized with (aug.normalize=auto: measured); files that
    record only a name (none: pixels in [0, 1], imagenet) mean those constants; files from before the key existed
    mean CIFAR-10 statistics."""
    from augment import CIFAR10_MEAN, CIFAR10_STD, NORMALIZATIONS
    from rundir.checkpoint import read_encoder

    state = torch.load(pretrained / "encoder.pt", weights_only=False)
    assert state["normalize"] == "auto" and read_encoder(str(pretrained)).statistics() == (
        tuple(state["mean"]), tuple(state["std"]))
    named = {k: v for k, v in state.items() if k not in ("mean", "std")}
    for name in ("none", "imagenet"):
        torch.save({**named, "normalize": name}, tmp_path / f"{name}.pt")
        assert read_encoder(str(tmp_path / f"{name}.pt")).statistics() == NORMALIZATIONS[name]
    del named["normalize"]
    torch.save(named, tmp_path / "old.pt")
    assert read_encoder(str(tmp_path / "old.pt")).statistics() == (CIFAR10_MEAN, CIFAR10_STD)
    torch.save({**named, "normalize": "zca"}, tmp_path / "odd.pt")
    with pytest.raises(Exception, match="unknown input normalization 'zca'"):
        read_encoder(str(tmp_path / "odd.pt")).statistics()


def test_head_layer_features(tmp_path, pretrained, capsys):
    """eval.features=headK: kNN and the probe read the output of the head's K-th layer, and results.json says so;
    layers beyond the head, a random encoder and files without a head are refused before anything is written
    (fine-tuning from a head layer: tests/test_distill.py)."""
    from rundir.checkpoint import read_encoder
    from evaluation.inputs import features_from
    from models.heads import head_prefix

    record = finetune_here(tmp_path, f"checkpoint={pretrained}", "eval.mode=knn", "eval.features=head1")
    assert record["features"] == "head1" and record["config"]["eval"]["features"] == "head1"
    source = read_encoder(str(pretrained))
    encoder = source.build()
    encoder.load_state_dict(source.state)
    head = source.build_head(encoder.feature_dim).eval()
    features, images = features_from(encoder, source, "head2").eval(), torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(features(images), head(encoder.eval()(images)))  # head2 of a 2-layer head: g(h)
        torch.testing.assert_close(features_from(encoder, source, "head1").eval()(images),
                                   head_prefix(head, 1)(encoder(images)))
    assert features_from(encoder, source, "encoder") is encoder
    assert all(p.requires_grad for p in features.layers.parameters())  # trained like the encoder (fine-tuning)
    encoder.requires_grad_(False)  # as load_encoder leaves it for kNN and the probe
    assert not any(p.requires_grad for p in features_from(encoder, source, "head2").layers.parameters())
    headless = {k: v for k, v in torch.load(pretrained / "encoder.pt", weights_only=True).items()
                if k not in ("head", "head_arch")}
    torch.save(headless, tmp_path / "old.pt")  # an encoder.pt of an earlier version: the encoder only
    for args, fragment in [(["eval.features=head3"], "has 2 layer(s); choose one of head1 to head2"),
                           (["eval.features=head0"], "neither encoder nor headK"),
                           (["eval.features=gh"], "neither encoder nor headK"),
                           (["eval.features=head1", f"checkpoint={tmp_path / 'old.pt'}"], "holds no projection head")]:
        user_error_here(capsys, eval_args(tmp_path / "refused", f"checkpoint={pretrained}", *args), fragment)
    user_error_here(capsys, eval_args(tmp_path / "refused", "checkpoint=none", "model.arch=resnet18",
                                      "eval.features=head1"), "checkpoint=none has none")
    assert not (tmp_path / "refused").exists()
