"""Distributed training, proven on CPU with gloo and 2 processes under torchrun: the gather, DDP with global batch
norm, pretrain.py and finetune.py against one process, elastic restarts, two nodes on loopback with the SLURM
script's launch line, bad input."""
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import finetune as finetune_entry
from core.dist import shared_store_restarts_can_hang
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


RESTART_ARGS = ("train.epochs=5", "eval.knn_every=0", "train.log_every=3")  # 30 steps, a checkpoint per epoch


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """The uninterrupted 2-process --standalone run that the restarted and two-node runs must equal: its last.pt."""
    root = tmp_path_factory.mktemp("whole")
    reference = torchrun(str(REPO / "pretrain.py"), *tiny_run_args(root, *RESTART_ARGS))
    assert reference.returncode == 0, reference.stderr[-3000:]
    return torch.load(root / "tiny" / "checkpoints" / "last.pt", weights_only=False)


def assert_same_weights(whole, checkpoint):
    run = torch.load(checkpoint, weights_only=False)
    assert run["step"] == whole["step"] == 30
    for key, value in whole["model"].items():
        assert torch.equal(value, run["model"][key]), key


def run_killing_a_worker(launchers, env, checkpoint, victim, timeout=300):
    """Start the launcher commands (each in its own process group), SIGKILL the worker of global rank ``victim``
    once the first checkpoint exists (None: kill nothing), wait; returns [(returncode, stdout, stderr)]."""
    agents = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # nothing outlives a failed test
              for cmd in launchers]
    try:
        if victim is not None:
            deadline = time.monotonic() + 240
            while not checkpoint.exists() and time.monotonic() < deadline and all(a.poll() is None for a in agents):
                time.sleep(0.02)
            workers = {rank: pid for agent in agents for rank, pid in worker_pids(agent.pid).items()}
            assert victim in workers, f"rank {victim} was not found running after the first checkpoint: {workers}"
            os.kill(workers[victim], signal.SIGKILL)
        outputs = [agent.communicate(timeout=timeout) for agent in agents]
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.wait()
    return [(agent.returncode, out, err) for agent, (out, err) in zip(agents, outputs)]


def test_elastic_restart_after_a_worker_is_killed_resumes_exactly(tmp_path, whole_run):
    cmd = torchrun_command("--max-restarts", "1", str(REPO / "pretrain.py"),
                           *tiny_run_args(tmp_path / "killed", *RESTART_ARGS))
    checkpoint = tmp_path / "killed" / "tiny" / "checkpoints" / "last.pt"
    [(returncode, stdout, stderr)] = run_killing_a_worker([cmd], {**os.environ, **TORCHRUN_ENV}, checkpoint, victim=1)
    assert returncode == 0, stderr[-3000:]
    assert "resume: from epoch" in stdout  # the restarted workers continued from the checkpoint
    assert_same_weights(whole_run, checkpoint)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbatch_launch(*args: str, **env: str) -> tuple[dict, list]:
    """What scripts/slurm.sbatch would run on each node (its DRY_RUN line), as (environment, command after srun)."""
    script_env = {**os.environ, "DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_ID": "4242",
                  "PYTHON": sys.executable, **env}
    printed = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sbatch"), *args], env=script_env,
                             capture_output=True, text=True, check=True, timeout=60).stdout
    words = shlex.split(printed)
    assert words[0] == "env"
    srun = words.index("srun")
    assigned = dict(word.split("=", 1) for word in words[1:srun])
    launcher = words[srun + 1:]
    while launcher[0].startswith("--"):  # srun's own options
        launcher.pop(0)
    return assigned, launcher


def test_sbatch_launch_line_for_two_nodes():
    assigned, launcher = sbatch_launch("--config", "configs/pretrain/cifar10_resnet50.yaml", "run.name=my run",
                                       RDZV_HOST="node17", GPUS_PER_NODE="8")
    assert assigned["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1" and assigned["WANDB_MODE"] == "offline"
    assert launcher == [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "8",
                        "--rdzv-backend", "c10d", "--rdzv-endpoint", "node17:29500", "--rdzv-id", "4242",
                        "--max-restarts", "3", "pretrain.py", "--config", "configs/pretrain/cifar10_resnet50.yaml",
                        "run.name=my run"]


def two_node_launchers(run_dir):
    """The SLURM script's launch line for 2 nodes of 1 worker each, on 127.0.0.1: (environment, [command] x 2)."""
    assigned, launcher = sbatch_launch(*tiny_run_args(run_dir, *RESTART_ARGS), SCRIPT=str(REPO / "pretrain.py"),
                                       RDZV_HOST="127.0.0.1", LOCAL_ADDR="127.0.0.1", RDZV_PORT=str(free_port()),
                                       GPUS_PER_NODE="1", MAX_RESTARTS="1", OMP_NUM_THREADS="1",
                                       WANDB_MODE="disabled")
    assert "--local-addr" in launcher  # traffic stays on loopback
    env = {**os.environ, **TORCHRUN_ENV, **assigned}
    return env, [launcher, launcher]


@pytest.mark.parametrize("victim", [None, 0], ids=["whole", "rank0_killed"])
def test_two_nodes_on_loopback_equal_one_node_even_after_kill_9(tmp_path, whole_run, victim):
    """Two torchrun launchers meeting by c10d rendezvous, as on two SLURM nodes, end bit-identical to a
    2-process --standalone run; with rank 0 (the node hosting the store) killed by SIGKILL after the first
    checkpoint, both nodes restart their workers (--max-restarts 1), resume and still end bit-identical."""
    env, launchers = two_node_launchers(tmp_path)
    checkpoint = tmp_path / "tiny" / "checkpoints" / "last.pt"
    results = run_killing_a_worker(launchers, env, checkpoint, victim)
    assert [code for code, _, _ in results] == [0, 0], "\n".join(err[-2000:] for _, _, err in results)
    stdout = "".join(out for _, out, _ in results)
    assert stdout.count("2 process(es)") == (1 if victim is None else 2)  # rank 0 reports once per attempt
    assert ("resume: from epoch" in stdout) == (victim is not None)
    assert not any("warning: torchrun shares" in err for _, _, err in results)  # the script's store is unshared
    assert_same_weights(whole_run, checkpoint)


def test_shared_store_warning_names_the_multi_node_restart_case():
    base = {"TORCHELASTIC_USE_AGENT_STORE": "True", "GROUP_WORLD_SIZE": "2", "TORCHELASTIC_MAX_RESTARTS": "1"}
    assert shared_store_restarts_can_hang(base)
    assert not shared_store_restarts_can_hang({**base, "TORCHELASTIC_USE_AGENT_STORE": "False"})  # unshared
    assert not shared_store_restarts_can_hang({**base, "GROUP_WORLD_SIZE": "1"})  # one node: attempts agree
    assert not shared_store_restarts_can_hang({**base, "TORCHELASTIC_MAX_RESTARTS": "0"})  # nothing restarts
    assert not shared_store_restarts_can_hang({})  # plain python


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

