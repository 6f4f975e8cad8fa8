"""The benchmark scripts run on a CPU and print well-formed JSON lines (their figures are not asserted: speed is
measured by the scripts, not by tests)."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def test_parity_harness_runs_both_pipelines_and_summarizes(archive, decoded_cache, tmp_path):
    out = tmp_path / "parity.jsonl"
    result = subprocess.run([sys.executable, "bench/parity.py", "--device", "cpu", "--quick", "--epochs", "1",
                             "--train-images", "500", "--val-images", "200", "--width", "4", "--batch", "100",
                             "--seeds", "0", "1", "--workers", "0", "--data", str(archive), "--cache-dir",
                             str(decoded_cache), "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert rows == [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["what"], r.get("seed")) for r in rows] == [
        ("parity/knn_init", 0), ("parity/knn_ours", 0), ("parity/knn_classic", 0),
        ("parity/knn_init", 1), ("parity/knn_ours", 1), ("parity/knn_classic", 1), ("parity/summary", None)]
    assert all(0 < r["figure"] <= 100 and r["train_images"] == 500 and r["val_images"] == 200 for r in rows[:-1])
    ours = [r["figure"] for r in rows if r["what"] == "parity/knn_ours"]
    summary = rows[-1]
    assert summary["ours_mean"] == pytest.approx(sum(ours) / 2, abs=1e-3)
    assert summary["within_spread"] == (abs(summary["difference"]) <= 2 * summary["pooled_std"])


def test_gpu_accuracy_script_tiny_run_on_cpu(archive, decoded_cache, tmp_path):
    """bench/gpu_accuracy.sh end to end with --tiny: every stage runs and reports (figures are not asserted)."""
    out = tmp_path / "out"
    result = subprocess.run(["bash", "bench/gpu_accuracy.sh", str(out), "--tiny", "--cache-dir", str(decoded_cache)],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "PYTHON": sys.executable, "DATA": str(archive)})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {r["what"]: r for r in map(json.loads, (out / "accuracy.jsonl").read_text().splitlines())}
    assert set(rows) == {"accuracy/kobak-e100/pretrain", "accuracy/kobak-e100/knn10", "accuracy/kobak-e100/linear",
                         "accuracy/lightly-e200/pretrain", "accuracy/lightly-e200/knn200_max",
                         "accuracy/lightly-e200/knn200"}
    assert rows["accuracy/kobak-e100/pretrain"]["status"] == "finished"
    assert rows["accuracy/kobak-e100/knn10"]["published"] == 83.2 and 0 < rows["accuracy/kobak-e100/knn10"]["figure"]
    lightly = rows["accuracy/lightly-e200/pretrain"]
    assert rows["accuracy/lightly-e200/knn200_max"]["figure"] == max(v for _, v in lightly["knn_test_curve"])
    assert rows["accuracy/lightly-e200/knn200"]["figure"] == lightly["knn_test_curve"][-1][1]  # same kNN, same encoder
    (cost,) = map(json.loads, (out / "data_cost.jsonl").read_text().splitlines())
    assert cost["what"] == "data_cost/skipped" and "CUDA" in cost["reason"] and cost["shape"] == [10000, 3, 32, 32]
    assert {p.name for p in out.iterdir()} >= {"accuracy.jsonl", "data_cost.jsonl", "kobak-e100_metrics.jsonl",
                                               "lightly-e200_metrics.jsonl", "log.txt"}


def test_gpu_speed_script_tiny_run_on_cpu(tmp_path):
    """bench/gpu_speed.sh's plumbing with CPU-sized stages: every stage runs and leaves its JSON lines; its step stage
    is `bench/step.py --device cpu --quick`, whose MFU and ratios are checked here too."""
    result = subprocess.run(["bench/gpu_speed.sh", str(tmp_path), "--tiny"], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "speed.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in rows} == {"tests", "step", "loss", "pretrain"}
    assert all(r["status"] == 0 for r in rows), [r for r in rows if r["status"]]
    whats = {r["what"] for r in rows}
    assert {"loss/fused/time", "loss/reference/time", "pretrain/views_per_s"} <= whats
    assert next(r for r in rows if r["what"] == "pretrain/views_per_s")["figure"] > 0
    assert (tmp_path / "step.log").is_file() and (tmp_path / "pretrain.log").is_file()
    check_step_rows([r for r in rows if r["stage"] == "step"])


def check_step_rows(rows: list[dict]) -> None:
    """bench/step.py --device cpu --quick: views/s, FLOPs, MFU, the DataLoader baseline and the peers, with ratios
    that are the quotients of the figures."""
    whats = [r["what"] for r in rows]
    assert whats == ["step/ours", "step/model_gflop_per_view", "step/mfu", "stage/augment", "stage/forward_backward",
                     "stage/loss", "stage/optimizer", "step/dataloader_baseline", "step/speedup_vs_dataloader",
                     "step/peer_lightly", "step/speedup_vs_lightly", "step/peer_dkobak", "step/speedup_vs_dkobak"] \
        or (importlib.util.find_spec("lightly") is None and "step/speedup_vs_lightly" not in whats)
    by_what = {r["what"]: r for r in rows}
    assert all(r["shape"] == [32, 3, 32, 32] and r["device"].startswith("cpu") for r in rows)
    assert all(r["figure"] > 0 for r in rows if "skipped" not in r)
    ours, base = by_what["step/ours"]["ms"], by_what["step/dataloader_baseline"]["ms"]
    assert abs(by_what["step/speedup_vs_dataloader"]["figure"] - base / ours) < 1e-2 * base / ours + 1e-3
    # FLOPs counted by torch.utils.flop_counter: ResNet-18 at width 8 is 1/64 of width 64's ~3.3 GFLOP per view
    assert 0.045 < by_what["step/model_gflop_per_view"]["figure"] < 0.06
    mfu = by_what["step/mfu"]
    assert mfu["peak_source"].startswith("measured") and mfu["peak_tflops"] > 0
    expected = 100 * by_what["step/model_gflop_per_view"]["figure"] * 1e9 * by_what["step/ours"]["figure"] / (
        mfu["peak_tflops"] * 1e12)
    assert abs(mfu["figure"] - expected) < 0.05 * expected + 0.01
    for peer in ("lightly", "dkobak"):
        row = by_what[f"step/peer_{peer}"]
        if "skipped" in row:  # only when the package is missing, and then it says so
            assert peer == "lightly" and importlib.util.find_spec("lightly") is None and "not installed" in row["skipped"]
            continue
        ratio = by_what[f"step/speedup_vs_{peer}"]["figure"]
        assert abs(ratio - row["ms"] / ours) < 1e-2 * ratio + 1e-3
