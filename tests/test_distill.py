"""SimCLRv2's semi-supervised recipe: fine-tuning from a projection head layer (eval.features=headK with
eval.mode=finetune) and distillation into a student (eval.mode=distill teacher=RUN), through the real command line."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import finetune as finetune_entry
from evaluation.distillation import distill_loss
from evaluation.inputs import features_from, load_encoder
from models.heads import head_prefix
from rundir.checkpoint import read_encoder, sha256_of
from tests.conftest import REPO, assert_user_error_here, run_entry, tiny_run_args

DATA = ["data.name=synthetic", "device=cpu", "data.val_size=200", "data.train_limit=1000", "wandb.mode=disabled"]
FRACTION = "eval.label_fraction=0.04"  # 200 of synthetic's 5,000 training labels, inside the 1,000 images


@pytest.fixture(scope="module")
def pretrained_v2(tmp_path_factory):
    """A tiny pretraining run with SimCLRv2's 3-layer projection head."""
    root = tmp_path_factory.mktemp("v2")
    result = run_entry("pretrain.py", *tiny_run_args(root, "train.epochs=1", "eval.knn_every=0", "model.proj_layers=3"))
    assert result.returncode == 0, result.stderr
    return root / "tiny"


def finetune_args(run_dir, name, *extra):
    return [*DATA, FRACTION, "eval.mode=finetune", "train.epochs=2", "train.batch_size=50", "train.log_every=2",
            "eval.val_every=1", f"run.dir={run_dir}", f"run.name={name}", *extra]


def distill_args(run_dir, name, teacher, *extra):
    return [*DATA, FRACTION, "eval.mode=distill", f"teacher={teacher}", "train.epochs=2", "train.batch_size=100",
            "train.log_every=2", "eval.val_every=1", f"run.dir={run_dir}", f"run.name={name}", *extra]


@pytest.fixture(scope="module")
def teacher_run(pretrained_v2, tmp_path_factory):
    """Fine-tuned from head layer 1 on 4% of the labels: the teacher of the distillations below."""
    root = tmp_path_factory.mktemp("teacher")
    finetune_entry.main(finetune_args(root, "teacher", f"checkpoint={pretrained_v2}", "eval.features=head1"))
    return root / "teacher"


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_a_head_layer_classifier_trains_the_encoder_and_those_layers(pretrained_v2, layers):
    """headK for fine-tuning: the classifier's features are the head's K-th layer output (with its batch norm), and
    exactly the encoder's and the first K layers' parameters train."""
    source = read_encoder(str(pretrained_v2))
    encoder = load_encoder(source.arch, source.width, source, torch.device("cpu"), trainable=True)
    features = features_from(encoder, source, f"head{layers}")
    head = source.build_head(encoder.feature_dim)
    images = torch.randn(6, 3, 32, 32)
    features.eval(), head.eval()
    with torch.no_grad():
        torch.testing.assert_close(features(images), head_prefix(head, layers)(encoder(images)), rtol=0, atol=0)
    trained = {name for name, p in features.named_parameters() if p.requires_grad}
    expected = {f"encoder.{n}" for n, _ in encoder.named_parameters()} | {
        f"layers.{n}" for n, _ in head_prefix(head, layers).named_parameters()}
    assert trained == expected and len(features.layers) == len(head_prefix(head, layers))
    assert features.feature_dim == [m for m in head_prefix(head, layers) if isinstance(m, torch.nn.Linear)][-1].out_features


def test_fine_tuning_from_head1_records_it_and_keeps_its_layers(teacher_run, pretrained_v2):
    record = json.loads((teacher_run / "results.json").read_text())
    assert record["mode"] == "finetune" and record["features"] == "head1" and record["label_fraction"] == 0.04
    assert record["data/train_images"] == 200 and record["model"] == {"arch": "resnet18", "width": 4}
    assert record["classifier_sha256"] == sha256_of(teacher_run / "classifier.pt")
    saved = torch.load(teacher_run / "classifier.pt", weights_only=True)
    layers = saved["feature_layers"]
    assert layers["layers"] == 1 and saved["features"] == "head1"
    pretrained_head = read_encoder(str(pretrained_v2)).head
    assert set(layers["state"]) == {"0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var",
                                    "1.num_batches_tracked"}  # Linear (no bias before BN), BatchNorm
    assert not torch.equal(layers["state"]["0.weight"], pretrained_head["0.weight"])  # the layer was fine-tuned


def test_distillation_loss_against_a_hand_computation():
    student = torch.tensor([[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]])
    teacher = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    labels, labeled = torch.tensor([0, 1]), torch.tensor([False, True])
    t = 2.0
    expected = 0.0
    for i in range(2):  # -sum_y P_T(y) log P_S(y), both at temperature t
        p_t = [torch.exp(teacher[i, y] / t) / torch.exp(teacher[i] / t).sum() for y in range(3)]
        log_p_s = [student[i, y] / t - torch.log(torch.exp(student[i] / t).sum()) for y in range(3)]
        expected += -sum(p * q for p, q in zip(p_t, log_p_s)) / 2
    assert distill_loss(student, (teacher, labels, labeled), t).item() == pytest.approx(expected.item(), rel=1e-6)
    ce_of_labeled = -(student[1, 1] - torch.log(torch.exp(student[1]).sum()))  # only image 1 is labeled
    with_labels = distill_loss(student, (teacher, labels, labeled), t, label_weight=0.5).item()
    assert with_labels == pytest.approx(expected.item() + 0.5 * ce_of_labeled.item(), rel=1e-6)
    nothing_labeled = distill_loss(student, (teacher, labels, torch.tensor([False, False])), t, label_weight=0.5)
    assert nothing_labeled.item() == pytest.approx(expected.item(), rel=1e-6)
    # the gradient reaches the student only
    s = student.clone().requires_grad_(True)
    distill_loss(s, (teacher, labels, labeled), t).backward()
    torch.testing.assert_close(s.grad, (F.softmax(s.detach() / t, 1) - F.softmax(teacher / t, 1)) / t / 2)


def test_distillation_into_a_half_width_student_leaves_the_teacher_untouched(teacher_run, tmp_path):
    before = {name: sha256_of(teacher_run / name) for name in ("classifier.pt", "results.json", "config.yaml")}
    result = run_entry("finetune.py", *distill_args(tmp_path, "student", teacher_run, "checkpoint=none",
                                                     "model.arch=resnet18", "model.width=2",
                                                     "distill.temperature=2", "distill.label_weight=0.5"))
    assert result.returncode == 0, result.stderr
    assert {name: sha256_of(teacher_run / name) for name in before} == before  # bitwise
    record = json.loads((tmp_path / "student" / "results.json").read_text())
    assert record["mode"] == "distill" and record["label_fraction"] == 0.04 and record["checkpoint"] == "none"
    assert record["teacher_sha256"] == before["classifier.pt"] and record["teacher_features"] == "head1"
    assert record["model"] == {"arch": "resnet18", "width": 2} and record["teacher_model"]["width"] == 4
    assert record["data/train_images"] == 1000 and record["data/labeled_images"] == 200  # all images, 4% labeled
    assert record["distill/temperature"] == 2 and record["distill/label_weight"] == 0.5
    assert "training images (200 labeled)" in result.stdout and 0 <= record["test/top1"] <= 100


def test_distillation_stopped_by_a_signal_resumes_to_the_same_results(teacher_run, pretrained_v2, tmp_path):
    args = distill_args(tmp_path / "whole", "s", teacher_run, f"checkpoint={pretrained_v2}")  # 20 steps
    whole = run_entry("finetune.py", *args)
    assert whole.returncode == 0, whole.stderr
    cut = distill_args(tmp_path / "cut", "s", teacher_run, f"checkpoint={pretrained_v2}")
    proc = subprocess.Popen([sys.executable, str(REPO / "finetune.py"), *cut], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:
        if line.startswith("step 12 |"):
            proc.send_signal(signal.SIGTERM)
            break
    output = line + proc.stdout.read()
    assert proc.wait() == 128 + signal.SIGTERM and "stopped: SIGTERM at step" in output, output
    resumed = run_entry("finetune.py", *cut)
    assert resumed.returncode == 0 and "resume: from epoch" in resumed.stdout, resumed.stderr
    numbers = ("test/top1", "test/top5", "val/top1", "test/confusion", "finetune/steps")
    a, b = (json.loads((tmp_path / d / "s" / "results.json").read_text()) for d in ("whole", "cut"))
    assert {k: a[k] for k in numbers} == {k: b[k] for k in numbers}
    for key, value in torch.load(tmp_path / "whole" / "s" / "classifier.pt", weights_only=True)["encoder"].items():
        assert torch.equal(value, torch.load(tmp_path / "cut" / "s" / "classifier.pt",
                                             weights_only=True)["encoder"][key]), key


def test_misuse_is_refused_before_anything_is_written(teacher_run, pretrained_v2, pretrained_run, tmp_path, capsys):
    knn = tmp_path / "knn"
    finetune_entry.main([*DATA, "eval.mode=knn", "eval.knn_k=20", f"checkpoint={pretrained_v2}", f"run.dir={tmp_path}",
                         "run.name=knn"])
    refused = tmp_path / "refused"
    student = [f"checkpoint={pretrained_v2}"]
    for args, fragment in [
        (distill_args(refused, "x", knn, *student), "holds no classifier.pt"),
        (distill_args(refused, "x", tmp_path / "absent", *student), "is not a run directory"),
        (distill_args(refused, "x", teacher_run, "checkpoint=none", "model.arch=resnet18", "data.image_size=48"),
         "takes 32x32 images"),
        (distill_args(refused, "x", teacher_run, *student, "data.val_size=300"), "another split"),
        (distill_args(refused, "x", teacher_run, *student, "eval.label_fraction=0.1"), "eval.label_fraction=0.04"),
        (distill_args(refused, "x", teacher_run, *student, "train.mixup_alpha=0.2"), "learns the teacher's"),
        ([*DATA, "eval.mode=distill", *student, f"run.dir={refused}"], "needs teacher="),
        ([*DATA, "eval.mode=finetune", f"teacher={teacher_run}", *student, f"run.dir={refused}"],
         "applies to eval.mode=distill only"),
        ([*DATA, "eval.mode=linear", "distill.temperature=2", *student, f"run.dir={refused}"], "distill.* apply"),
        (finetune_args(refused, "x", *student, "eval.features=head4"), "has 3 layer(s); choose one of head1 to head3"),
        (finetune_args(refused, "x", f"checkpoint={pretrained_run}", "eval.features=head3"), "has 2 layer(s)"),
        (finetune_args(refused, "x", "checkpoint=none", "model.arch=resnet18", "eval.features=head1"),
         "checkpoint=none has none"),
    ]:
        assert_user_error_here(capsys, finetune_entry.main, args, fragment)
    assert not refused.exists()
    assert_user_error_here(capsys, __import__("export").main, [f"checkpoint={teacher_run}", f"out={tmp_path / 'x.onnx'}"],
                           "fine-tuned from projection head layers")
