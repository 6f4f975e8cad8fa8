"""The peer recipes (dkobak, lightly) end to end on tiny synthetic runs, and the evaluation options they need."""
import json

import pytest
import torch
import yaml

from rundir.checkpoint import read_encoder
from tests.conftest import REPO, assert_user_error, read_jsonl, run_entry

TINY = ["data.name=synthetic", "device=cpu", "model.width=4", "data.train_limit=600", "train.batch_size=100",
        "train.epochs=1", "train.log_every=2", "wandb.mode=disabled"]


def run_recipe(tmp_path, recipe, *extra):
    result = run_entry("pretrain.py", "--config", str(REPO / "configs/pretrain" / recipe), *TINY,
                       f"run.dir={tmp_path}", *extra)
    assert result.returncode == 0, result.stderr
    run = next(p for p in tmp_path.iterdir() if (p / "config.yaml").is_file())
    return run, yaml.safe_load((run / "config.yaml").read_text())


def test_kobak_recipe_runs_with_every_setting_as_published(tmp_path):
    run, cfg = run_recipe(tmp_path, "kobak_resnet18.yaml")
    assert cfg["aug"] == {**cfg["aug"], "min_scale": 0.2, "strength": 0.5, "jitter_prob": 0.8, "gray_prob": 0.1,
                          "blur_prob": 0.0, "normalize": "none"}
    assert cfg["model"] == {**cfg["model"], "proj_hidden_dim": 1024, "proj_dim": 128, "proj_bn": False,
                            "proj_out_bn": False, "forward_views": "separate"}
    assert cfg["optim"] == {**cfg["optim"], "name": "sgd", "base_lr": 0.03, "momentum": 0.9, "nesterov": False,
                            "weight_decay": 5e-4, "decay_norm_bias": True, "warmup_epochs": 0}
    assert (cfg["loss"]["temperature"], cfg["train"]["batch_size"], cfg["train"]["precision"]) == (0.5, 100, "fp32")
    assert cfg["data"]["val_size"] == 0  # all training images, as he trains
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    head = {k: tuple(v.shape) for k, v in ckpt["model"].items() if k.startswith("head.")}
    assert head == {"head.0.weight": (1024, 32), "head.0.bias": (1024,), "head.2.weight": (128, 1024),
                    "head.2.bias": (128,)}  # Linear(512 -> 1024) - ReLU - Linear(1024 -> 128), biases, no BN
    (group,) = ckpt["optimizer"]["param_groups"]  # every parameter decayed, lr 0.03 x 100 / 256, no warm-up
    assert group["weight_decay"] == 5e-4 and group["momentum"] == 0.9 and len(group["params"]) == len(ckpt["model"]) \
        - sum(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in ckpt["model"])
    assert read_encoder(str(run)).normalize == "none"  # evaluations feed the encoder what it was trained on


def test_lightly_recipe_runs_with_every_setting_as_published(tmp_path):
    run, cfg = run_recipe(tmp_path, "lightly_resnet18.yaml")
    assert cfg["aug"] == {**cfg["aug"], "min_scale": 0.08, "strength": 0.5, "gray_prob": 0.2, "blur_prob": 0.0,
                          "normalize": "imagenet"}
    assert cfg["model"] == {**cfg["model"], "proj_hidden_dim": 512, "proj_bn": True, "proj_out_bn": True,
                            "forward_views": "separate"}
    assert cfg["optim"] == {**cfg["optim"], "name": "sgd", "base_lr": 0.12, "weight_decay": 5e-4,
                            "decay_norm_bias": True, "warmup_epochs": 0}
    assert cfg["eval"] == {**cfg["eval"], "knn_k": 200, "knn_temperature": 0.1, "knn_vote": "weighted",
                           "knn_test_monitor": True}
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert {k for k in ckpt["model"] if k.startswith("head.") and k.endswith(("weight", "bias"))} == {
        "head.0.weight", "head.1.weight", "head.1.bias", "head.3.weight", "head.4.weight", "head.4.bias"}
    summary = json.loads((run / "summary.json").read_text())
    records = read_jsonl((run / "metrics.jsonl"))
    monitored = [r["knn_test/top1"] for r in records if "knn_test/top1" in r]
    assert len(monitored) == 2 and "knn/top1" not in summary  # no validation split: only the test monitor
    assert summary["knn_test/top1"] == monitored[-1] and summary["knn_test/max_top1"] == max(monitored)
    assert read_encoder(str(run / "encoder.pt")).normalize == "imagenet"


def test_online_classifier_is_trained_logged_and_scored(tmp_path):
    # solo-learn's LARS settings (their trust coefficient 0.02, clipped): the online classifier's weight is LARS-adapted
    run, _ = run_recipe(tmp_path, "cifar10_resnet18.yaml", "eval.online_linear=true", "eval.online_lr=1.0",
                        "optim.lars_trust_coeff=0.02", "optim.lars_trust_clip=true",
                        "data.val_size=200", "eval.knn_every=4", "eval.knn_k=20", "train.epochs=8",
                        "optim.warmup_epochs=0", "run.name=online")
    records = read_jsonl((run / "metrics.jsonl"))
    assert [r["epoch"] for r in records if "online/val_top1" in r] == [0, 4, 8]
    assert all(0 <= r["online/train_top1"] <= 100 for r in records if "train/loss" in r)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["online/test_top1"] > 15  # 10 classes, 1,000 test images: chance is 10% +- 1
    assert summary["online/val_top1"] == records[-1]["online/val_top1"]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["model"]["classifier.weight"].shape == (10, 32)
    own = ckpt["optimizer"]["param_groups"][-1]  # its own group: no decay, no LARS adaptation, lr x 1.0 / 1.0
    assert own["weight_decay"] == 0.0 and own["always_adapt"] is False and own["lr_scale"] == 1.0


@pytest.mark.parametrize("args, fragment", [
    (["model.forward_views=both"], "model.forward_views='both'"),
    (["aug.normalize=zca"], "aug.normalize='zca'"),
    (["eval.knn_vote=soft"], "eval.knn_vote='soft'"),
    (["eval.online_lr=0"], "eval.online_lr=0.0 is out of range"),
    (["model.proj_bn=sometimes"], "model.proj_bn"),
    (["optim.decay_norm_bias=often"], "optim.decay_norm_bias"),
    (["eval.knn_test_monitor=maybe"], "eval.knn_test_monitor"),
    (["model.proj_out_bnn=true"], "did you mean 'model.proj_out_bn'"),
    (["optim.lars_trust_coeff=0"], "optim.lars_trust_coeff=0.0 is out of range"),
    (["optim.lars_trust_clip=perhaps"], "optim.lars_trust_clip"),
    (["eval.online_linear=yes-please"], "eval.online_linear"),
])
def test_new_keys_reject_bad_values(tmp_path, capsys, args, fragment):
    """In this process, as ``python pretrain.py`` runs main (tests/test_pretrain.py checks the same contract
    through a subprocess): exit status 2, one `error:` line, nothing written."""
    import pretrain
    from rundir.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(pretrain.main, [*TINY, f"run.dir={tmp_path}", "run.name=bad", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and err[-1].startswith("error: ") and fragment in err[-1], err
    assert not (tmp_path / "bad").exists()


def test_finetune_rejects_a_bad_knn_vote(tmp_path):
    assert_user_error(run_entry("finetune.py", "checkpoint=none", "model.arch=resnet18", "eval.mode=knn",
                                "eval.knn_vote=soft", "data.name=synthetic", f"run.dir={tmp_path}"), "eval.knn_vote")
