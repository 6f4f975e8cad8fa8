"""Running on a shared cluster: untrusted checkpoints, preemption signals, resumable evaluations, one writer per run,
divergence, resume checks, W&B without network, OS errors. Each through the real command line."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import finetune as finetune_entry
import pretrain as pretrain_entry
from tests.conftest import REPO, assert_user_error, assert_user_error_here, read_jsonl, run_entry, tiny_run_args


class Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def finished_run(pretrained_run):
    """A tiny finished pretraining run (its encoder.pt and last.pt are the templates of the crafted files)."""
    return pretrained_run


def test_crafted_checkpoints_are_refused_and_never_run(tmp_path, finished_run):
    marker = tmp_path / "payload-ran"
    encoder = torch.load(finished_run / "encoder.pt", weights_only=True)
    last = torch.load(finished_run / "checkpoints" / "last.pt", weights_only=True)
    crafted_encoder, crafted_last = tmp_path / "encoder.pt", tmp_path / "last.pt"
    torch.save({**encoder, "extra": Payload(marker)}, crafted_encoder)  # otherwise a valid encoder
    torch.save({**last, "extra": Payload(marker)}, crafted_last)
    auto_dir = tmp_path / "runs" / "tiny" / "checkpoints"
    auto_dir.mkdir(parents=True)
    torch.save({**last, "extra": Payload(marker)}, auto_dir / "last.pt")
    attempts = {
        "finetune checkpoint=": run_entry("finetune.py", f"checkpoint={crafted_encoder}", "eval.mode=knn",
                                          "data.name=synthetic", "device=cpu", f"run.dir={tmp_path / 'eval'}"),
        "run.resume=PATH": run_entry("pretrain.py", *tiny_run_args(tmp_path / "other", f"run.resume={crafted_last}")),
        "run.resume=auto": run_entry("pretrain.py", *tiny_run_args(tmp_path / "runs")),
    }
    for how, result in attempts.items():
        assert_user_error(result, "so it was not loaded")
        assert "posix.system" in result.stderr, how
    assert not marker.exists()  # the payload never ran
    assert not (tmp_path / "eval").exists() and not (tmp_path / "other").exists()


def test_divergence_with_a_finite_loss_is_recorded_as_divergence(tmp_path):
    """LARS at base lr 1e6: the loss stays near 5.3 while weights and batch-norm statistics overflow."""
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=3", "eval.knn_every=0",
                                                     "optim.base_lr=1e6"))
    assert_user_error(result, "weights or batch-norm statistics became non-finite", status=3)
    summary = json.loads((tmp_path / "tiny" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["reason"].startswith("weights")
    assert float(summary["train/loss"]) < 10  # the loss itself never said so
    last = tmp_path / "tiny" / "checkpoints" / "last.pt"
    if last.exists():  # a checkpoint written before the divergence is a good one
        ckpt = torch.load(last, weights_only=True)
        assert all(t.isfinite().all() for t in ckpt["model"].values() if t.is_floating_point())
    else:
        assert "no checkpoint was written" in result.stderr
    assert not (tmp_path / "tiny" / "encoder.pt").exists()


def test_resume_refuses_a_changed_recipe_and_allows_more_epochs(tmp_path):
    assert run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0")).returncode == 0
    run = tmp_path / "tiny"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    for change, named in (["seed=1"], "seed: 0 -> 1"), (["optim.name=sgd"], "optim.name: 'lars' -> 'sgd'"), \
            (["loss.temperature=0.2"], "loss.temperature: 0.5 -> 0.2"):
        result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0", *change))
        assert_user_error(result, named)
        assert "another recipe" in result.stderr and "run.resume=never" not in result.stderr
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # config.yaml not rewritten
    longer = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=2", "eval.knn_every=0",
                                                     "train.log_every=3", "wandb.mode=disabled"))
    assert longer.returncode == 0 and "resume: from epoch 1" in longer.stdout, longer.stderr
    assert json.loads((run / "summary.json").read_text())["epoch"] == 2


def test_train_epochs_on_resume_never_rewrites_the_schedule_and_an_extension_is_recorded(tmp_path, capsys):
    """An unfinished run keeps its length; a finished one is never shortened; extending a finished one is a new
    schedule phase (warm-up + cosine from its old end), recorded in config.yaml and summary.json, and a table never
    takes it for a run trained on the longer schedule from the start."""
    import yaml

    from configs.load import load_config, to_dict
    from tables.plan import comparable

    args = ["train.log_every=1", "eval.knn_every=0", "run.ckpt_every=1"]
    run = tmp_path / "tiny"
    status, output = _run_until(["pretrain.py", *tiny_run_args(tmp_path, "train.epochs=2", *args)], "step 3 |",
                                signal.SIGTERM)
    assert status == 128 + signal.SIGTERM, output
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    err = assert_user_error_here(capsys, pretrain_entry.main, tiny_run_args(tmp_path, "train.epochs=4", *args),
                                 "it is at epoch 0 of 2")
    assert any("once finished, train.epochs=4 extends it" in line for line in err)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    pretrain_entry.main(tiny_run_args(tmp_path, "train.epochs=2", *args))
    finished = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert_user_error_here(capsys, pretrain_entry.main, tiny_run_args(tmp_path, "train.epochs=1", *args),
                           "not shortened")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == finished  # encoder.pt not rewritten

    extended = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=3", *args))
    assert extended.returncode == 0 and "its lr schedule starts again at epoch 2" in extended.stdout, extended.stderr
    records = [r for r in read_jsonl(run / "metrics.jsonl") if "train/lr" in r]
    lr, per_epoch = {r["step"]: r["train/lr"] for r in records}, round(records[0]["step"] / records[0]["epoch"])
    times = [r["time/elapsed_s"] for r in read_jsonl(run / "metrics.jsonl") if r.get("time/elapsed_s")]
    assert times == sorted(times) and len(times) > 4  # carried across the stop and the extension: never backwards
    first, last = 2 * per_epoch + 1, 3 * per_epoch  # the new phase: a schedule of its own that ends annealed
    assert lr[first - 1] < lr[first] and lr[last] < lr[first] and lr[last] < 0.1 * max(lr.values())
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["train"]["epochs"] == 3 and config["train"]["schedule_restarts"] == [2]
    assert json.loads((run / "summary.json").read_text())["schedule_segments"] == [[0, 2], [2, 3]]
    plain = load_config(tiny_run_args(tmp_path, "train.epochs=3", *args))
    assert comparable(config, type(plain)) != comparable(to_dict(plain), type(plain))
    again = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=3", *args))  # a requeue of the same job
    assert again.returncode == 0 and "extend:" not in again.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["schedule_restarts"] == [2]


def test_a_finished_run_without_checkpoints_is_not_trained_over(tmp_path, finished_run):
    import shutil

    run = tmp_path / "tiny"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "checkpoints")
    encoder = (run / "encoder.pt").read_bytes()
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0"))
    assert_user_error(result, "holds a finished run")
    assert (run / "encoder.pt").read_bytes() == encoder and not (run / "checkpoints").exists()


def _run_until(args, at_line: str, signum: int):
    """Start pretrain.py/finetune.py (args[0]), send ``signum`` once a printed line starts with ``at_line``; returns
    (exit status, output)."""
    cmd = [sys.executable, str(REPO / args[0]), *args[1:]]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"})
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith(at_line):
            proc.send_signal(signum)
            break
    seen += proc.stdout.readlines()
    return proc.wait(), "".join(seen)


def _weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["model"]


PREEMPTED_ARGS = ["train.epochs=4", "train.log_every=1", "eval.knn_every=0", "run.ckpt_every=1"]


@pytest.fixture(scope="module")
def uninterrupted_pretraining(tmp_path_factory):
    """The weights a 4-epoch tiny run ends with when nothing stops it (the reference of every interrupted run)."""
    root = tmp_path_factory.mktemp("straight")
    straight = run_entry("pretrain.py", *tiny_run_args(root, *PREEMPTED_ARGS))
    assert straight.returncode == 0, straight.stderr
    return _weights(root / "tiny")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_preemption_signal_saves_the_step_and_the_rerun_ends_bit_identical(tmp_path, uninterrupted_pretraining,
                                                                             signum):
    args = PREEMPTED_ARGS
    status, output = _run_until(["pretrain.py", *tiny_run_args(tmp_path / "b", *args)], "step 8 |", signum)
    assert status == 128 + signum, output
    stopped = re.search(rf"stopped: {signal.Signals(signum).name} at step (\d+) \(epoch [\d.]+\); checkpoint", output)
    assert stopped and "Traceback" not in output, output
    saved = torch.load(tmp_path / "b" / "tiny" / "checkpoints" / "last.pt", weights_only=True)
    assert saved["step"] == int(stopped.group(1)) >= 8  # the checkpoint is at the step it stopped at
    resumed = run_entry("pretrain.py", *tiny_run_args(tmp_path / "b", *args))
    assert resumed.returncode == 0 and f"resume: from epoch {saved['epoch']}, step {saved['step']}" in resumed.stdout
    a, b = uninterrupted_pretraining, _weights(tmp_path / "b" / "tiny")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_jsonl((tmp_path / "b" / "tiny" / "metrics.jsonl"))]
    assert steps == sorted(set(steps))


def _finetune_args(run_dir, checkpoint, *extra):
    return ["data.name=synthetic", "device=cpu", "data.val_size=500", "data.train_limit=1000", "train.epochs=4",
            "train.batch_size=100", "train.log_every=1", "eval.mode=finetune", "eval.val_every=1",
            f"checkpoint={checkpoint}", "wandb.mode=disabled", f"run.dir={run_dir}", "run.name=ft",
            # the whole toolkit on: its random draws and the EMA must resume exactly too
            "train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "train.label_smoothing=0.1", "train.grad_clip=2.0",
            "train.ema_decay=0.9", *extra]


RESULT_NUMBERS = ("test/top1", "test/top5", "val/top1", "test/confusion", "test/per_class", "finetune/steps",
                  "ema/val_top1", "ema/test_top1")


@pytest.fixture(scope="module")
def uninterrupted_finetuning(tmp_path_factory, finished_run):
    root = tmp_path_factory.mktemp("finetune")
    result = run_entry("finetune.py", *_finetune_args(root, finished_run))
    assert result.returncode == 0, result.stderr
    return json.loads((root / "ft" / "results.json").read_text()), _weights(root / "ft")


def test_fine_tuning_stopped_by_a_signal_continues_to_the_same_results(tmp_path, finished_run, uninterrupted_finetuning):
    """SIGUSR1, what SLURM sends before the time limit (pretraining's tests cover SIGTERM and SIGINT through the same
    StopRequest)."""
    expected, weights, signum = *uninterrupted_finetuning, signal.SIGUSR1
    status, output = _run_until(["finetune.py", *_finetune_args(tmp_path, finished_run)], "step 12 |", signum)
    assert status == 128 + signum and f"stopped: {signal.Signals(signum).name} at step" in output, output
    saved = torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)
    assert 12 <= saved["step"] < 20 and not (tmp_path / "ft" / "results.json").exists()  # 10 steps per epoch
    resumed = run_entry("finetune.py", *_finetune_args(tmp_path, finished_run))
    assert resumed.returncode == 0 and f"resume: from epoch 1, step {saved['step']}" in resumed.stdout, resumed.stderr
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert {k: results[k] for k in RESULT_NUMBERS} == {k: expected[k] for k in RESULT_NUMBERS}
    final = _weights(tmp_path / "ft")
    assert all(torch.equal(final[k], weights[k]) for k in weights)


def test_fine_tuning_killed_with_sigkill_continues_to_the_same_results(
        tmp_path, finished_run, uninterrupted_finetuning):
    expected, _ = uninterrupted_finetuning
    status, _ = _run_until(["finetune.py", *_finetune_args(tmp_path, finished_run)], "step 14 |", signal.SIGKILL)
    assert status == -signal.SIGKILL
    assert torch.load(tmp_path / "ft" / "checkpoints" / "last.pt", weights_only=True)["epoch"] == 1
    resumed = run_entry("finetune.py", *_finetune_args(tmp_path, finished_run))
    assert resumed.returncode == 0 and "resume: from epoch 1, step 10" in resumed.stdout, resumed.stderr
    results = json.loads((tmp_path / "ft" / "results.json").read_text())
    assert {k: results[k] for k in RESULT_NUMBERS} == {k: expected[k] for k in RESULT_NUMBERS}
    steps = [r["step"] for r in read_jsonl((tmp_path / "ft" / "metrics.jsonl"))]
    assert steps == sorted(steps) and steps.count(12) == 1  # steps redone after the kill are logged once


def test_an_unfinished_linear_probe_runs_again_and_a_finished_one_is_kept(tmp_path, finished_run, capsys):
    args = ["data.name=synthetic", "device=cpu", "data.val_size=500", "probe.epochs=3", "eval.mode=linear",
            f"checkpoint={finished_run}", "wandb.mode=disabled", f"run.dir={tmp_path}", "run.name=lin"]
    (tmp_path / "lin").mkdir()
    (tmp_path / "lin" / "metrics.jsonl").write_text('{"step": 0, "epoch": 0, "train/loss": 1.0}\n')  # a killed run
    first = run_entry("finetune.py", *args)
    assert first.returncode == 0, first.stderr
    assert "train/loss" not in (tmp_path / "lin" / "metrics.jsonl").read_text()  # started over
    results = (tmp_path / "lin" / "results.json").read_bytes()
    assert_user_error_here(capsys, finetune_entry.main, args, "already holds an evaluation")
    assert (tmp_path / "lin" / "results.json").read_bytes() == results


def test_fine_tuning_refuses_to_resume_with_another_encoder_or_recipe(tmp_path, finished_run, capsys):
    status, _ = _run_until(["finetune.py", *_finetune_args(tmp_path, finished_run)], "step 6 |", signal.SIGTERM)
    assert status == 128 + signal.SIGTERM
    assert_user_error_here(capsys, finetune_entry.main, _finetune_args(tmp_path, finished_run, "optim.base_lr=0.5"),
                           "optim.base_lr: 0.05 -> 0.5")
    assert_user_error_here(capsys, finetune_entry.main, _finetune_args(tmp_path, "none", "model.arch=resnet18",
                                                                       "model.width=4"), "another encoder")


def test_a_second_identical_command_is_refused_while_the_first_trains(tmp_path):
    args = tiny_run_args(tmp_path, "train.epochs=3", "train.log_every=1", "eval.knn_every=0")
    first = subprocess.Popen([sys.executable, str(REPO / "pretrain.py"), *args], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in first.stdout:
        if line.startswith("step 1 |"):
            break
    second = run_entry("pretrain.py", *args)  # a double submit
    assert_user_error(second, f"is in use by pid {first.pid} on {socket.gethostname()}")
    first.stdout.read()
    assert first.wait() == 0
    steps = [r["step"] for r in read_jsonl((tmp_path / "tiny" / "metrics.jsonl"))]
    assert steps == sorted(set(steps)) and steps[-1] == 18  # every step once, from one writer
    assert not (tmp_path / "tiny" / ".lock").exists()


def test_a_lock_left_by_a_dead_process_does_not_block_a_rerun(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    run = tmp_path / "tiny"
    run.mkdir()
    lock = run / ".lock"
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": "earlier"}))
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0"))
    assert result.returncode == 0, result.stderr
    # A holder on another node: refused while its heartbeat is fresh, taken over once it is stale.
    lock.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": "earlier"}))
    assert_user_error_here(capsys, pretrain_entry.main, tiny_run_args(tmp_path, "train.epochs=2", "eval.knn_every=0"),
                           "is in use by pid 1 on node-elsewhere")
    old = time.time() - 3600
    os.utime(lock, (old, old))
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=2", "eval.knn_every=0"))
    assert result.returncode == 0 and "resume: from epoch 1" in result.stdout, result.stderr
    assert not lock.exists()


@pytest.mark.parametrize("content", [b"", b'{"host": "n1", "pid": "abc"}', b"[1, 2]", b"\xff\xfe"])
def test_an_unreadable_lock_is_taken_over_once_stale_and_refused_while_fresh(tmp_path, content):
    """A job killed (or out of disk) between creating .lock and writing it leaves it empty; malformed holders were
    tracebacks. Fresh, such a lock may be being written: refused with the reason. Stale: taken over, saying so."""
    run = tmp_path / "tiny"
    run.mkdir()
    lock = run / ".lock"
    lock.write_bytes(content)
    os.utime(lock, (time.time() - 60, time.time() - 60))
    fresh = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0"))
    assert_user_error(fresh, "cannot be read (empty or not a holder's record) and changed 6")
    assert "s ago; it is taken over once it is 180 s old" in fresh.stderr
    assert lock.read_bytes() == content
    os.utime(lock, (time.time() - 600, time.time() - 600))  # ten minutes untouched
    stale = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0"))
    assert stale.returncode == 0, stale.stderr
    assert re.search(r"note: taking over the lock .*: it cannot be read .* has not changed for 6\d\d s", stale.stderr)
    assert not lock.exists() and (run / "encoder.pt").is_file()


def test_leftovers_of_a_killed_writer_are_cleaned_and_a_nan_checkpoint_is_refused_at_once(tmp_path, finished_run):
    """kill -9 during a checkpoint write leaves .last.pt.*.tmp: removed once the lock is ours. A checkpoint holding
    NaN weights (written after a divergence by older code, or damaged) used to cost an epoch before the run stopped."""
    import shutil

    run = tmp_path / "tiny"
    shutil.copytree(finished_run, run)
    leftover = run / "checkpoints" / ".last.pt.k9x2.tmp"
    leftover.write_bytes(b"half a checkpoint")
    again = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0"))
    assert again.returncode == 0, again.stderr
    assert not leftover.exists() and (run / "checkpoints" / "last.pt").is_file()
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["model"]["encoder.conv1.weight"][0] = float("nan")
    state["epoch"] = 0  # an unfinished run, so resuming it would train
    torch.save(state, run / "checkpoints" / "last.pt")
    started = time.perf_counter()
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0"))
    assert_user_error(result, "holds non-finite model weights (NaN or inf in encoder.conv1.weight); a run cannot "
                              "continue from it")
    assert "step 1 |" not in result.stdout and time.perf_counter() - started < 30


def test_a_failed_wandb_start_leaves_no_config_behind(tmp_path):
    run = tmp_path / "tiny"
    run.mkdir()
    (run / "wandb").write_text("")  # W&B cannot make its directory here (as with a read-only wandb/)
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0",
                                                     "wandb.mode=offline"))
    assert_user_error(result, "wandb")
    assert sorted(p.name for p in run.iterdir()) == ["wandb"]


def test_wandb_without_network_decides_within_seconds(tmp_path):
    """A W&B server that accepts connections and never answers (127.0.0.1 only): auto falls back to offline and the
    run completes; online stops with an error line before any training."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(16)
        env = {**os.environ, "WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}", "HOME": str(tmp_path),
               "WANDB_API_KEY": "0" * 40, "PYTHONUNBUFFERED": "1"}
        env.pop("WANDB_MODE", None)

        def pretrain(where, mode):
            cmd = [sys.executable, str(REPO / "pretrain.py"),
                   *tiny_run_args(tmp_path / where, "train.epochs=1", "eval.knn_every=0", f"wandb.mode={mode}")]
            tick = time.monotonic()
            result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
            return result, time.monotonic() - tick

        auto, _ = pretrain("auto", "auto")
        assert auto.returncode == 0, auto.stderr[-2000:]
        assert "did not answer within 5 s; logging offline" in auto.stderr
        assert list((tmp_path / "auto" / "tiny" / "wandb").glob("offline-run-*"))
        online, seconds = pretrain("online", "online")
        assert_user_error(online, "wandb.mode=online but the W&B server http://127.0.0.1")
        assert seconds < 60 and not (tmp_path / "online").exists()  # stopped before writing anything


@pytest.fixture
def tmpfs(tmp_path):
    """mount(size, read_only) -> a fresh tmpfs directory, or None where mounting is not allowed."""
    mounted = []

    def mount(size: str, read_only: bool = False):
        target = tmp_path / f"fs{len(mounted)}"
        target.mkdir()
        options = f"size={size}" + (",ro" if read_only else "")
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)],
                          capture_output=True).returncode != 0:
            return None
        mounted.append(target)
        return target

    yield mount
    for target in mounted:
        subprocess.run(["umount", str(target)], capture_output=True)


def test_disk_full_while_checkpointing_is_an_error_line_and_keeps_the_previous_checkpoint(tmp_path, tmpfs):
    small = tmpfs("700k")  # room for one checkpoint of the tiny model (~470 kB), not for its successor beside it
    root = small if small is not None else tmp_path
    args = tiny_run_args(root, "train.epochs=3", "eval.knn_every=0", "run.ckpt_every=1")
    if small is None:  # no tmpfs here: the same failure, simulated at the second checkpoint (a stand-in torch.save)
        stand_in = tmp_path / "sitecustomize.py"
        stand_in.write_text("import torch\nreal, calls = torch.save, []\n"
                            "def save(*a, **k):\n    calls.append(1)\n"
                            "    if len(calls) == 2:\n        raise OSError(28, 'No space left on device')\n"
                            "    return real(*a, **k)\ntorch.save = save\n")
        result = subprocess.run([sys.executable, str(REPO / "pretrain.py"), *args], cwd=REPO, text=True,
                                capture_output=True, env={**os.environ, "PYTHONPATH": f"{tmp_path}:{REPO}"})
    else:
        result = run_entry("pretrain.py", *args)
    assert_user_error(result, "No space left on device")
    last = root / "tiny" / "checkpoints" / "last.pt"
    saved = torch.load(last, weights_only=True)  # the previous checkpoint, whole
    assert saved["epoch"] == 1 and not list(last.parent.glob(".*.tmp"))


def test_a_read_only_run_directory_is_found_before_data_loads(tmp_path, tmpfs):
    read_only = tmpfs("1m", read_only=True)
    if read_only is None:
        if os.geteuid() == 0:
            pytest.skip("needs a read-only directory: mount is not allowed here and root can write anywhere")
        read_only = tmp_path / "ro"
        read_only.mkdir()
        read_only.chmod(0o555)
    result = run_entry("pretrain.py", *tiny_run_args(read_only, "data.name=folder", "data.root=/no/such/archive"))
    assert_user_error(result, "cannot write to run directory")  # not the missing data, which would be found later


def test_files_respect_the_umask(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "pretrain.py"),
                             *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0")], cwd=REPO,
                            capture_output=True, text=True, preexec_fn=lambda: os.umask(0o027))
    assert result.returncode == 0, result.stderr
    for name in ("encoder.pt", "checkpoints/last.pt", "summary.json", "metrics.jsonl", "config.yaml"):
        assert (tmp_path / "tiny" / name).stat().st_mode & 0o777 == 0o640, name  # group-readable, as asked


def test_an_encoder_with_non_finite_weights_is_refused(tmp_path, finished_run):
    state = torch.load(finished_run / "encoder.pt", weights_only=True)
    state["encoder"]["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "encoder.pt")
    result = run_entry("finetune.py", f"checkpoint={tmp_path / 'encoder.pt'}", "eval.mode=knn", "data.name=synthetic",
                       "device=cpu", f"run.dir={tmp_path / 'eval'}")
    assert_user_error(result, "non-finite encoder weights (NaN or inf in layer1.0.conv1.weight)")
    assert not (tmp_path / "eval").exists()


def test_a_folder_without_a_test_split_and_a_late_bad_value_leave_nothing_behind(tmp_path, finished_run):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / "data" / "train" / cls).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (32, 32), (i * 10, 50, 100)).save(tmp_path / "data" / "train" / cls / f"{i}.png")
    no_test = run_entry("finetune.py", f"checkpoint={finished_run}", "eval.mode=knn", "data.name=folder",
                        f"data.root={tmp_path / 'data'}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_size=4",
                        "device=cpu", "wandb.mode=disabled", f"run.dir={tmp_path / 'eval'}")
    assert_user_error(no_test, "has no test split")
    too_big = run_entry("finetune.py", f"checkpoint={finished_run}", "eval.mode=finetune", "eval.label_fraction=0.01",
                        "train.batch_size=100", "data.name=synthetic", "data.val_size=500", "device=cpu",
                        "wandb.mode=disabled", f"run.dir={tmp_path / 'eval'}")
    assert_user_error(too_big, "exceeds the 50 labeled training images")
    assert not (tmp_path / "eval").exists()  # no stray config.yaml


def test_a_null_line_in_metrics_does_not_stop_a_resume(tmp_path):
    assert run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=1", "eval.knn_every=0")).returncode == 0
    metrics = tmp_path / "tiny" / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + "null\n")
    result = run_entry("pretrain.py", *tiny_run_args(tmp_path, "train.epochs=2", "eval.knn_every=0"))
    assert result.returncode == 0, result.stderr
    assert all(isinstance(json.loads(line), dict) for line in metrics.read_text().splitlines())


@pytest.mark.parametrize("spec, fragment", [
    ("- a\n- b\n", "must be a mapping of keys"),
    (b"name: caf\xe9\n", "is not UTF-8 text"),
    ("name: ../../escape\ntitle: t\nrows: [{name: a}]\n", "name '../../escape' may hold only"),
    ("name: t\ntitle: t\ncolumns: [{name: c, evaluation: pretrain, metric: knn/top1}]\nrows: [{name: a}]\n"
     "plot: {column: c, x: train.epoch}\n", "plot.x 'train.epoch' is not a pretraining config key"),
])
def test_reproduce_refuses_bad_specs_with_an_error_line(tmp_path, spec, fragment):
    path = tmp_path / "spec.yaml"
    path.write_bytes(spec if isinstance(spec, bytes) else spec.encode())
    result = run_entry("reproduce.py", str(path), "--render", "--runs-dir", str(tmp_path / "runs"))
    assert_user_error(result, fragment)
    assert not (tmp_path / "runs").exists() and not (tmp_path.parent.parent / "escape").exists()
