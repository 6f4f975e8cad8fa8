"""pretrain.py through its real command line: a smoke run, bad input, resume bit-exactness, real data."""
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

import pretrain as pretrain_entry
from rundir.checkpoint import sha256_of
from tests.conftest import REPO, assert_user_error, assert_user_error_here, read_jsonl, run_entry, tiny_run_args


def test_smoke_run_writes_the_run_directory(tmp_path):
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path))
    assert result.returncode == 0, result.stderr
    run = tmp_path / "tiny"
    expected = {"config.yaml", "metrics.jsonl", "summary.json", "encoder.pt", "checkpoints"}
    assert expected <= {p.name for p in run.iterdir()}
    assert "model:\n  arch: resnet18" in result.stdout  # resolved config printed at start
    records = read_jsonl(run / "metrics.jsonl")
    train = [r for r in records if "train/loss" in r]
    knn = [r for r in records if "knn/top1" in r]
    assert train and all({"step", "epoch", "train/lr", "train/base_lr", "train/views_per_s", "train/align",
                          "train/uniform", "train/pos_cos", "train/neg_cos"} <= set(r) for r in train)
    assert [r["epoch"] for r in knn] == [0, 1, 2]  # at initialization, every epoch, at the end
    summary = json.loads((run / "summary.json").read_text())
    assert summary["knn/top1"] == knn[-1]["knn/top1"] and summary["knn/init_top1"] == knn[0]["knn/top1"]
    assert summary["status"] == "finished" and summary["encoder_sha256"] == sha256_of(run / "encoder.pt")
    encoder = torch.load(run / "encoder.pt", weights_only=False)
    from models import create_encoder
    rebuilt = create_encoder(**encoder["arch"])
    rebuilt.load_state_dict(encoder["encoder"])  # strict: the saved arch config rebuilds exactly this backbone
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 12 and ckpt["config"]["model"]["width"] == 4
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ckpt["model"])


@pytest.mark.parametrize("args, fragment", [
    (["train.epoch=3"], "did you mean 'train.epochs'"),
    (["train.epochs=many"], "train.epochs"),
    (["train.batch_size=0"], "train.batch_size=0 is out of range"),
    (["train.batch_size=-8"], "out of range"),
    (["model.arch=resnet9"], "model.arch='resnet9'"),
    (["data.name=imagenet"], "data.name='imagenet'"),
    (["loss.temperature=0"], "loss.temperature"),
    (["loss.temperature=-0.5"], "loss.temperature"),
    (["train.epochs"], "has no '='"),
    (["--config", "missing.yaml"], "does not exist"),
    (["device=cuda"] if not torch.cuda.is_available() else ["device=cuda:99"], "cuda"),
    (["data.name=folder", "data.root=/no/such/dir"], "does not exist"),
    (["data.name=cifar10", "data.download=false", "data.root=/tmp/no-cifar-here"], "point data.root at a local copy"),
    (["train.batch_size=5000"], "exceeds"),
    (["eval.linear_at_end=true", "data.val_size=0", "eval.knn_every=0"], "no validation split to choose among"),
    (["train.schedule_restarts=[1,1]"], "must be increasing epochs between 0 and train.epochs=2"),
    (["loss.name=supcon", "data.unlabeled=true"], "loss.name=supcon takes the positives from the labels"),
    (["loss.name=simclr"], "loss.name='simclr' is not one of ntxent, supcon, dcl, dclw"),
    (["loss.dcl_sigma=0.2"], "applies to loss.name=dclw only, not ntxent"),
    (["aug.local_crops=2", "aug.crop=false"], "need aug.crop=true"),
    (["aug.local_crops=2", "aug.local_min_scale=0.5", "aug.local_max_scale=0.2"], "exceeds aug.local_max_scale"),
    (["aug.local_crops=2", "model.forward_views=separate"], "use model.forward_views=joint"),
    (["aug.local_crops=2", "aug.local_size=18", "model.arch=vit_tiny", "model.width=null"],
     "divides into 4-pixel patches"),
])
def test_bad_input(tmp_path, capsys, args, fragment):
    """In this process (run_cli, as `python pretrain.py` runs it); the first case also as a process of its own."""
    if args == ["train.epoch=3"]:
        assert_user_error(run_entry("pretrain.py", *tiny_run_args(tmp_path), *args), fragment)
    assert_user_error_here(capsys, pretrain_entry.main, [*tiny_run_args(tmp_path), *args], fragment)
    assert not (tmp_path / "tiny").exists()  # nothing was created


def test_malformed_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {arch: [\n")
    assert_user_error_here(capsys, pretrain_entry.main, ["--config", str(bad)], "not valid YAML")


def test_corrupt_archive(tmp_path, capsys):
    archive = tmp_path / "broken.tar.xz"
    archive.write_bytes(b"\xfd7zXZ\x00\x00 truncated")
    args = [*tiny_run_args(tmp_path), "data.name=folder", f"data.root={archive}", f"data.cache_dir={tmp_path / 'c'}"]
    assert_user_error_here(capsys, pretrain_entry.main, args, "cannot read archive")


def test_existing_run_is_never_overwritten_by_bad_input(tmp_path, capsys):
    pretrain_entry.main(tiny_run_args(tmp_path, "train.epochs=1"))
    run = tmp_path / "tiny"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for extra, fragment in [(["model.width=8"], "model.width: 4 -> 8"), (["run.resume=never"], "already holds a run"),
                            ([f"run.resume={tmp_path / 'nope.pt'}"], "does not exist")]:
        assert_user_error_here(capsys, pretrain_entry.main, tiny_run_args(tmp_path, "train.epochs=1", *extra),
                               fragment)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["model"]


# SupCon at the default lr gathers these synthetic images' views near one point within 4 epochs (train/neg_cos 0.90,
# kNN 41 -> 22: flagged collapsed, exit 4); at base lr 0.3 it ends unflagged, which this test needs.
@pytest.mark.parametrize("loss", [[], ["loss.name=supcon", "optim.base_lr=0.3"], ["aug.local_crops=4", "aug.local_size=16"]],
                         ids=["ntxent", "supcon", "multi-crop"])
def test_resume_after_kill_minus_9_is_bit_identical(tmp_path, loss):
    args = ["train.epochs=4", "train.log_every=1", "eval.knn_every=0", "run.ckpt_every=1", *loss]
    straight = run_entry("pretrain.py", *tiny_run_args(tmp_path / "a", *args))
    assert straight.returncode == 0, straight.stderr
    # Second run: killed with SIGKILL mid-epoch, after its first checkpoint, then started again with the same command.
    cmd = [sys.executable, str(REPO / "pretrain.py"), *tiny_run_args(tmp_path / "b", *args)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    ckpt = tmp_path / "b" / "tiny" / "checkpoints" / "last.pt"
    for line in proc.stdout:  # 6 steps per epoch: step 8 is inside epoch 2, after checkpoint 1
        if line.startswith("step 8 |"):
            break
    assert ckpt.is_file()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run_entry("pretrain.py", *tiny_run_args(tmp_path / "b", *args))
    assert resumed.returncode == 0, resumed.stderr
    assert "resume: from epoch" in resumed.stdout
    a, b = weights(tmp_path / "a" / "tiny"), weights(tmp_path / "b" / "tiny")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_jsonl(tmp_path / "b" / "tiny" / "metrics.jsonl")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # re-done steps are not logged twice


@pytest.mark.real_data
def test_real_data_subset(tmp_path, archive):
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path), "data.name=folder", f"data.root={archive}",
                       f"data.cache_dir={tmp_path / 'cache'}", "data.train_limit=400", "data.val_size=200")
    assert result.returncode == 0, result.stderr
    assert "data: 400 train / 200 val images (3, 32, 32)" in result.stdout
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert 10.0 < summary["knn/top1"] <= 100.0  # real labels: above chance once features exist


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    first = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0"))
    assert first.returncode == 0, first.stderr
    ckpt = tmp_path / "tiny" / "checkpoints" / "last.pt"
    # The same recipe continued (resume refuses a changed one, and a non-finite checkpoint) from a checkpoint with
    # one huge but finite first-layer weight: the convolution overflows, then the loss becomes non-finite in epoch 2.
    state = torch.load(ckpt, weights_only=True)
    state["model"]["encoder.conv1.weight"][0] = 3e38
    torch.save(state, ckpt)
    good = ckpt.read_bytes()
    diverged = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=3", "eval.knn_every=0"))
    assert_user_error(diverged, "loss became", status=3)  # divergence is a result, not bad input (2)
    assert "last good checkpoint" in diverged.stderr
    assert ckpt.read_bytes() == good
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())  # a result that tables show as such
    assert summary["status"] == "diverged" and summary["step"] > 6 and summary["train/loss"] in ("nan", "inf")


def test_a_pretraining_ends_with_its_curves_and_an_embedding_map(tmp_path):
    """eval.plots (on by default): curves.png and a t-SNE embedding.png of the validation features, real pictures."""
    import numpy as np
    from PIL import Image

    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "eval.plots=true"))
    assert result.returncode == 0, result.stderr
    for name, size in (("curves.png", (1200, 840)), ("embedding.png", (840, 720))):
        image = np.asarray(Image.open(tmp_path / "tiny" / name).convert("L"), dtype=np.float64)
        assert image.shape[::-1] == size and image.std() > 10, name  # drawn, not blank
    assert not list((tmp_path / "tiny").glob(".*.tmp"))


def test_collapsed_embeddings_are_detected_warned_once_and_recorded(tmp_path):
    """SGD at base lr 1e6: weights explode, the loss stays finite and the views gather on a few points; the run used
    to end as a plain success. Now: one warning, status collapsed, exit status 4 after its records and encoder are
    written. The healthy twin (base lr 0.1) is not flagged."""
    common = ["train.epochs=3", "eval.knn_every=0", "optim.name=sgd", "model.proj_dim=64"]
    exploded = run_entry("pretrain.py", *tiny_run_args(tmp_path, *common, "optim.base_lr=1e6", "run.name=flat"))
    healthy = run_entry("pretrain.py", *tiny_run_args(tmp_path, *common, "optim.base_lr=0.1", "run.name=fine"))
    assert exploded.returncode == 4 and healthy.returncode == 0, exploded.stderr + healthy.stderr
    assert exploded.stderr.count("warning: the embeddings look collapsed at step") == 1
    assert exploded.stderr.strip().splitlines()[-1].startswith("error: the embeddings collapsed (over the last epoch")
    assert "collapsed" not in healthy.stderr
    flat, fine = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("flat", "fine"))
    assert flat["collapsed"] is True and flat["status"] == "collapsed" and (tmp_path / "flat" / "encoder.pt").is_file()
    assert fine["collapsed"] is False and fine["status"] == "finished"
    assert flat["train/erank"] < 4 < fine["train/erank"] and "train/neg_cos" in fine
    logged = [r["train/erank"] for r in read_jsonl(tmp_path / "flat" / "metrics.jsonl") if "train/erank" in r]
    assert len(logged) == 9 and all(0 <= v <= 64 for v in logged)  # every train.log_every=2 steps and epoch end


def test_the_collapse_measure_is_rotation_invariant_and_sees_a_few_points():
    """Two antipodal points (lightly's z_std: about 0.8, unflagged) and one point are collapsed; a healthy embedding
    along a few axes (z_std 0.25-0.64) and a rotated copy of it are not, with the same effective rank."""
    from training.pretraining import looks_collapsed
    from losses.diagnostics import embedding_stats

    torch.manual_seed(0)
    n, d = 256, 128
    direction = torch.nn.functional.normalize(torch.randn(d), dim=0)
    antipodal = direction * (torch.arange(n) % 2 * 2 - 1.0)[:, None]
    axes = torch.zeros(n, d)
    axes[torch.arange(n), torch.randint(0, 12, (n,))] = torch.randint(0, 2, (n,)) * 2 - 1.0
    axes2 = axes + 0.05 * torch.randn(n, d)
    rotation = torch.linalg.qr(torch.randn(d, d))[0]
    stats = {name: embedding_stats(z1, z2) for name, (z1, z2) in {
        "antipodal": (antipodal, antipodal), "point": (direction.expand(n, d), direction.expand(n, d)),
        "axes": (axes, axes2), "rotated": (axes @ rotation, axes2 @ rotation)}.items()}
    verdict = {name: looks_collapsed(s["erank"].item(), d) for name, s in stats.items()}
    assert verdict == {"antipodal": True, "point": True, "axes": False, "rotated": False}
    assert stats["antipodal"]["z_std"] > 0.5 and stats["axes"]["z_std"] < 0.7  # what z_std alone got wrong
    assert abs(stats["axes"]["erank"] - stats["rotated"]["erank"]) < 1e-6 * stats["axes"]["erank"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_training_step_never_waits_for_the_gpu():
    """No host sync inside training.pretraining.train_step (augmentation, forward, backward, LARS): CUDA's sync debug mode
    raises on any synchronizing call (.item(), a pageable host-to-device copy, nonzero, ...)."""
    from augment import SimCLRAugment
    from configs.load import load_config
    from optim.optimizers import create_optimizer
    from training.pretraining import StepContext, build_model, train_step

    device = torch.device("cuda")
    model = build_model(load_config(["model.width=16"]), device, torch.bfloat16)  # on the GPU, channels_last
    optimizer = create_optimizer("lars", model, lr=0.1, weight_decay=1e-6)
    ctx = StepContext(model, optimizer, SimCLRAugment(), device, torch.bfloat16)
    g = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=device)
    train_step(ctx, images, g, 0.1)  # first step: lazy set-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            out = train_step(ctx, images, g, 0.1)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out["loss"]).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_training_run_on_the_gpu(tmp_path):
    """train.compile=true with bf16: the compiled model and augmentation train and evaluate end to end."""
    out = run_entry("pretrain.py", *tiny_run_args(tmp_path), "device=cuda", "train.compile=true")
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert 0 <= summary["knn/top1"] <= 100
