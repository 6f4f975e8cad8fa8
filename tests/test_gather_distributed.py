"""The cross-process gather, proven: 2 processes on shards == 1 process on the whole batch (gloo, CPU, torchrun)."""
import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_two_processes_equal_one_for_every_loss_impl(tmp_path):
    out = tmp_path / "result.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(REPO / "tests" / "dist_gather_worker.py"), str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads(out.read_text())
    assert metrics.pop("world_size") == 2
    assert len(metrics) == 8
    for name, rel in metrics.items():
        assert rel < 1e-6, (name, rel)  # fp64: in practice ~1e-16
