"""The benchmark scripts run on a CPU and print well-formed JSON lines (their figures are not asserted: speed is
measured by the scripts, not by tests)."""
import json
import subprocess
import sys

from tests.conftest import REPO


def test_step_benchmark_quick_cpu_run_prints_the_ratio_to_the_dataloader_baseline():
    out = subprocess.run([sys.executable, "bench/step.py", "--device", "cpu", "--quick", "--steps", "2",
                          "--warmup", "1"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    whats = [r["what"] for r in rows]
    assert whats == ["step/ours", "stage/augment", "stage/forward_backward", "stage/loss", "stage/optimizer",
                     "step/dataloader_baseline", "step/speedup_vs_dataloader"]
    by_what = {r["what"]: r for r in rows}
    assert all(r["figure"] > 0 and r["shape"] == [32, 3, 32, 32] and r["device"].startswith("cpu") for r in rows)
    ours, base = by_what["step/ours"]["ms"], by_what["step/dataloader_baseline"]["ms"]
    assert abs(by_what["step/speedup_vs_dataloader"]["figure"] - base / ours) < 1e-2 * base / ours + 1e-3
