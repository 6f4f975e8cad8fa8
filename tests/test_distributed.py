"""Distributed training, proven on CPU with gloo and 2 processes under torchrun: the gather, DDP with global batch
norm, pretrain.py and finetune.py against one process, elastic restarts, the SLURM script, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import finetune as finetune_entry
from tests.conftest import REPO, assert_user_error, read_jsonl, run_entry, tiny_run_args


TORCHRUN_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}


def torchrun_command(*args, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def torchrun(*args, nproc=2, timeout=300):
    return subprocess.run(torchrun_command(*args, nproc=nproc), cwd=REPO, env={**os.environ, **TORCHRUN_ENV},
                          capture_output=True, text=True, timeout=timeout)


def test_gather_and_ddp_equal_one_process(tmp_path):
    out = tmp_path / "result.json"
    result = torchrun(str(REPO / "tests" / "dist_worker.py"), str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics.pop("world_size") == 2
    gather = {k: v for k, v in metrics.items() if k.startswith("gather/")}
    assert len(gather) == 8 and max(gather.values()) < 1e-10  # loss and gradients, fp64; measured ~1e-16
    grouped = {k: v for k, v in metrics.items() if k.startswith("contrastive/")}
    assert len(grouped) == 12 and max(grouped.values()) < 1e-10, grouped  # SupCon, DCL, DCLW x 2 impls
    for impl in ("reference", "fused"):
        assert metrics[f"ddp/{impl}/grad"] < 1e-10  # fp64, global batch norm, DDP averaging + gather; ~4e-14
        assert metrics[f"ddp/{impl}/running_stats"] < 1e-10
    assert metrics["ddp/train/max_abs_weight_diff"] < 1e-10  # three LARS steps on sharded augmented batches; ~2e-13
    assert metrics["micro/grad"] < 1e-10 and metrics["micro/loss"] < 1e-12  # 2 ranks x chunks of 2 == 1 x 8


def first_loss(run_dir):
    records = read_jsonl((run_dir / "metrics.jsonl"))
    return next(r["train/loss"] for r in records if "train/loss" in r)


def test_pretrain_under_torchrun_matches_one_process(tmp_path):
    """Three pretraining steps (global batch 200, sync batch norm, LARS) with 2 processes and with 1 end with the same
    weights. fp64, because in fp32 the gradient at initialization is itself only accurate to ~1e-3 (measured against
    fp64), so fp32 runs of any two batch layouts drift apart at that level."""
    extra = ("train.log_every=1", "eval.knn_every=0", "train.epochs=1", "train.batch_size=200", "train.precision=fp64")
    result = torchrun(str(REPO / "pretrain.py"), *tiny_run_args(tmp_path / "two", *extra))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout and result.stdout.count("done: ") == 1  # rank 0 alone reports
    single = run_entry("pretrain.py", *tiny_run_args(tmp_path / "one", *extra))
    assert single.returncode == 0, single.stderr
    two = torch.load(tmp_path / "two" / "tiny" / "checkpoints" / "last.pt", weights_only=False)
    one = torch.load(tmp_path / "one" / "tiny" / "checkpoints" / "last.pt", weights_only=False)
    assert two["step"] == one["step"] == 3 and set(two["model"]) == set(one["model"])  # no "module." prefixes
    worst = max((two["model"][k] - v).abs().max().item() for k, v in one["model"].items() if v.is_floating_point())
    assert worst < 1e-5, worst  # measured: ~5e-13
    assert first_loss(tmp_path / "two" / "tiny") == pytest.approx(first_loss(tmp_path / "one" / "tiny"), rel=1e-12)


def test_batch_not_divisible_by_world_size(tmp_path):
    result = torchrun(str(REPO / "pretrain.py"), *tiny_run_args(tmp_path, "train.batch_size=101"))
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr  # each worker exits with status 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: train.batch_size=101 (global) does not divide by the world size 2"]
    assert not (tmp_path / "tiny").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when no GPU is present")
def test_nccl_or_cuda_without_gpus(tmp_path):
    assert_user_error(run_entry("pretrain.py", *tiny_run_args(tmp_path, "run.backend=nccl")), "run.backend=nccl")
    assert_user_error(run_entry("pretrain.py", *tiny_run_args(tmp_path, "device=cuda")), "no CUDA GPU")
    assert not (tmp_path / "tiny").exists()


def worker_pids(agent_pid):
    """{RANK: pid} of the processes torchrun's agent started."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            if ppid != agent_pid:
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except (OSError, ValueError, IndexError):
            continue
        if b"RANK" in env:
            found[int(env[b"RANK"])] = int(entry)
    return found


def test_elastic_restart_after_a_worker_is_killed_resumes_exactly(tmp_path):
    args = ["train.epochs=5", "eval.knn_every=0", "train.log_every=3"]
    reference = torchrun(str(REPO / "pretrain.py"), *tiny_run_args(tmp_path / "whole", *args))
    assert reference.returncode == 0, reference.stderr[-3000:]
    cmd = torchrun_command("--max-restarts", "1", str(REPO / "pretrain.py"), *tiny_run_args(tmp_path / "killed", *args))
    agent = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **TORCHRUN_ENV}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # its own process group: nothing outlives a failed test
    checkpoint = tmp_path / "killed" / "tiny" / "checkpoints" / "last.pt"
    try:
        deadline = time.monotonic() + 240
        while not checkpoint.exists() and time.monotonic() < deadline and agent.poll() is None:
            time.sleep(0.02)
        victim = worker_pids(agent.pid).get(1)
        assert victim is not None, "rank 1 was not found running after the first checkpoint"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = agent.communicate(timeout=300)
    finally:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()
    assert agent.returncode == 0, stderr[-3000:]
    assert "resume: from epoch" in stdout  # the restarted workers continued from the checkpoint
    whole = torch.load(tmp_path / "whole" / "tiny" / "checkpoints" / "last.pt", weights_only=False)
    killed = torch.load(checkpoint, weights_only=False)
    assert killed["step"] == whole["step"] == 30
    for key, value in whole["model"].items():
        assert torch.equal(value, killed["model"][key]), key


def test_finetune_under_torchrun(tmp_path, pretrained_run):
    common = ["data.name=synthetic", "device=cpu", "data.val_size=500", "probe.epochs=3", "train.epochs=1",
              "train.batch_size=100", "eval.knn_k=20", "wandb.mode=disabled", f"checkpoint={pretrained_run}"]
    records = {}
    for mode in ("knn", "linear", "finetune"):
        for procs in (1, 2) if mode != "finetune" else (2,):  # fine-tuning's 1-process run is tested elsewhere
            args = [*common, f"eval.mode={mode}", f"run.dir={tmp_path / f'{mode}{procs}'}", "run.name=eval"]
            if procs == 1:  # the reference: one process, this one, on one thread as each torchrun worker
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    finetune_entry.main(args)
                finally:
                    torch.set_num_threads(threads)
            else:
                result = torchrun(str(REPO / "finetune.py"), *args, nproc=procs)
                assert result.returncode == 0, result.stderr[-3000:]
                assert result.stdout.count("result: ") == 1  # rank 0 alone reports
            records[mode, procs] = json.loads((tmp_path / f"{mode}{procs}" / "eval" / "results.json").read_text())
    for mode in ("knn", "linear"):  # features gathered from both ranks: the same numbers as one process
        assert records[mode, 2]["test/confusion"] == records[mode, 1]["test/confusion"]
    assert records["finetune", 2]["data/train_images"] == 4500 and records["finetune", 2]["finetune/steps"] == 45

