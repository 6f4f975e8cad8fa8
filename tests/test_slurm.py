"""scripts/slurm.sbatch on a real single-node SLURM: Debian's slurmctld and slurmd, started by this module on
127.0.0.1 with auth/none (no munge daemon), a fresh state directory, and stopped by their pids at the end. One job of
a tiny pretraining (2 CPU workers under torchrun, c10d rendezvous) is stopped mid-run by USR1 (what
`--signal=B:USR1@180` sends before the time limit) and later by TERM (preemption), requeues itself each time, resumes,
and ends with an encoder bit-identical to the same job run without interruption."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, read_jsonl, tiny_run_args

PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Slurm:
    """The cluster's environment (SLURM_CONF), and the few commands the test needs."""

    def __init__(self, root: Path, env: dict) -> None:
        self.root, self.env = root, env

    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=True, timeout=60).stdout

    def submit(self, run_dir: Path, name: str, *overrides: str) -> tuple[str, Path]:
        """sbatch scripts/slurm.sbatch of a tiny run on this one node (the script's GPU and node counts overridden);
        returns (job id, its output file)."""
        out = self.root / f"{name}.out"
        job = self.run("sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=1",
                       f"--chdir={REPO}", f"--output={out}", "--open-mode=append", f"--job-name={name}",
                       "--export=ALL,GPUS_PER_NODE=2,OMP_NUM_THREADS=1,PYTHONUNBUFFERED=1,"
                       f"PYTHON={sys.executable},RDZV_PORT={free_port()}",
                       str(REPO / "scripts" / "slurm.sbatch"),
                       *tiny_run_args(run_dir, "train.epochs=3", "train.log_every=1", "eval.knn_every=0",
                                      f"run.name={name}", *overrides)).strip()
        return job, out

    def state(self, job: str) -> str:
        text = self.run("scontrol", "show", "job", job)
        return text.split("JobState=", 1)[1].split()[0]

    def wait(self, job: str, states: tuple[str, ...], timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while (state := self.state(job)) not in states:
            assert time.monotonic() < deadline, f"job {job} still {state}, not {states}"
            time.sleep(0.5)
        return state


def wait_for_line(path: Path, text: str, count: int = 1, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while (path.read_text().count(text) if path.is_file() else 0) < count:
        assert time.monotonic() < deadline, (f"{text!r} x{count} never appeared in {path}:\n"
                                             + (path.read_text()[-3000:] if path.is_file() else "(no file)"))
        time.sleep(0.2)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in BINARIES if shutil.which(b, path=PATH) is None]
    if missing:
        pytest.skip(f"SLURM is not installed here ({', '.join(missing)} missing; .ci/run installs Debian's "
                    "slurmctld, slurmd and slurm-client)")
    root = tmp_path_factory.mktemp("slurm")
    node, user = socket.gethostname().split(".")[0], subprocess.run(["id", "-un"], capture_output=True,
                                                                      text=True).stdout.strip()
    (root / "state").mkdir()
    (root / "spool").mkdir()
    conf = root / "slurm.conf"
    conf.write_text("\n".join([
        "ClusterName=simclrtest", f"SlurmctldHost={node}(127.0.0.1)", f"SlurmctldPort={free_port()}",
        f"SlurmdPort={free_port()}", "AuthType=auth/none", "CredType=cred/none", f"SlurmUser={user}",
        f"SlurmdUser={user}", f"StateSaveLocation={root / 'state'}", f"SlurmdSpoolDir={root / 'spool'}",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}", f"SlurmdPidFile={root / 'slurmd.pid'}",
        f"SlurmctldLogFile={root / 'slurmctld.log'}", f"SlurmdLogFile={root / 'slurmd.log'}",
        "AuthInfo=cred_expire=10",  # how long a requeued job waits to start again (120 s by default)
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none", "ReturnToService=2",
        "SchedulerType=sched/backfill", "SelectType=select/cons_tres", "SelectTypeParameters=CR_CPU",
        "JobCompType=jobcomp/none", "AccountingStorageType=accounting_storage/none", "KillWait=30",
        f"NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN",
        f"PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP", ""]))
    env = {**os.environ, "PATH": PATH, "SLURM_CONF": str(conf)}
    daemons = [subprocess.Popen([shutil.which(name, path=PATH), "-D", *extra, "-f", str(conf)], env=env,
                                stdout=open(root / f"{name}.out", "w"), stderr=subprocess.STDOUT,
                                start_new_session=True)
               for name, extra in (("slurmctld", ["-c"]), ("slurmd", ["-N", node]))]
    cluster = Slurm(root, env)
    try:
        deadline = time.monotonic() + 60
        while "idle" not in subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True,
                                           text=True).stdout:
            assert time.monotonic() < deadline, (root / "slurmctld.out").read_text()[-2000:]
            time.sleep(0.5)
        yield cluster
    finally:
        for daemon in daemons:  # stopped by their own pids
            daemon.send_signal(signal.SIGTERM)
        for daemon in daemons:
            try:
                daemon.wait(20)
            except subprocess.TimeoutExpired:
                daemon.kill()


def test_a_job_signalled_twice_requeues_resumes_and_ends_as_if_never_stopped(slurm, tmp_path):
    straight, straight_out = slurm.submit(tmp_path, "straight")
    cut, cut_out = slurm.submit(tmp_path, "cut")  # runs beside it (one CPU per task)
    for signum, at_step, nth in (("USR1", 5, 1), ("TERM", 12, 2)):
        wait_for_line(cut_out, f"step {at_step} |")
        slurm.run("scancel", f"--signal={signum}", "--batch", cut)  # to the batch script, as SLURM would
        wait_for_line(cut_out, "stopped: SIGTERM at step", nth)  # the workers checkpointed at their step
        slurm.wait(cut, ("PENDING",))  # and the script requeued the job; it starts again after cred_expire
        wait_for_line(cut_out, "resume: from epoch", nth)
    assert slurm.wait(cut, ("COMPLETED", "FAILED")) == "COMPLETED", cut_out.read_text()[-3000:]
    assert slurm.wait(straight, ("COMPLETED", "FAILED")) == "COMPLETED", straight_out.read_text()[-3000:]
    log = cut_out.read_text()
    assert "signal USR1 (time limit near)" in log and "signal TERM (preempted)" in log
    assert "Restarts=2" in slurm.run("scontrol", "show", "job", cut)
    a, b = (torch.load(tmp_path / name / "encoder.pt", weights_only=True)["encoder"] for name in ("straight", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical
    steps = [r["step"] for r in read_jsonl(tmp_path / "cut" / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 18


def test_sbatch_on_two_nodes_launches_torchrun_on_the_first_node_s_endpoint(slurm):
    """With --nodes 2 the script gives every node the launch line that tests/test_distributed.py runs twice on
    loopback; the first node's name comes from the real `scontrol show hostnames`."""
    env = {**slurm.env, "DRY_RUN": "1", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "SLURM_JOB_ID": "977", "GPUS_PER_NODE": "4", "PYTHON": sys.executable}
    words = subprocess.run(["bash", str(REPO / "scripts" / "slurm.sbatch"), "train.epochs=3"], env=env,
                           capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in words[:words.index("srun")]
    assert words[words.index("srun"):] == [
        "srun", "--kill-on-bad-exit=1", sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
        "--nproc-per-node", "4", "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu07:29500", "--rdzv-id", "977",
        "--max-restarts", "3", "pretrain.py", "train.epochs=3"]
