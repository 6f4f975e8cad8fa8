"""The benchmark scripts run on a CPU and print well-formed JSON lines (their figures are not asserted: speed is
measured by the scripts, not by tests)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, read_jsonl


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


def run_report(out, archive, decoded_cache, *args, **popen):
    cmd = ["bench/gpu_report.sh", str(out), "--tiny", "--cache-dir", str(decoded_cache), *args]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the GPU machine does not set it
    env.update(PYTHON=sys.executable, DATA=str(archive))
    if popen:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **popen)
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)


def test_gpu_report_tiny_run_on_cpu(archive, decoded_cache, tmp_path):
    """bench/gpu_report.sh end to end with CPU-sized stages, every stage: each starts, ends and leaves its lines in
    report.jsonl; the pretrainings' curves, speeds and protocol rows; at most 8 files (figures are not asserted)."""
    out = tmp_path / "out"
    result = run_report(out, archive, decoded_cache, "--stages", "data_cost", "tests", "kobak-e100", "loss", "step",
                        "lightly-e200", "speedrun", "profile", "micro_batch")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_jsonl(out / "report.jsonl")
    assert result.stdout.splitlines() == [json.dumps(r) for r in rows]  # shown as written
    names = ["data_cost", "tests", "kobak-e100", "loss", "step", "lightly-e200", "speedrun", "profile", "micro_batch"]
    assert [r["stage"] for r in rows if r["what"] == "report/plan"] == names
    assert all(r["fits"] for r in rows if r["what"] == "report/plan")
    assert sorted(r["stage"] for r in rows if r["what"] == "report/stage_end") == sorted(names)
    by_what = {r["what"]: r for r in rows}
    assert by_what["tests/gpu"]["figure"] == 0
    assert by_what["data_cost/skipped"]["reason"].startswith("airbench94 trains on CUDA only")
    assert {"loss/fused/time", "loss/reference/time", "profile/step_ms", "memory/micro_batch_over_whole"} <= set(by_what)
    for stage in ("kobak-e100", "lightly-e200", "speedrun"):
        pretraining = by_what[f"{stage}/pretrain"]
        assert pretraining["status"] == "finished" and pretraining["figure"] > 0 and pretraining["epochs_done"] == 2
        curve = [r for r in rows if r["what"] == f"{stage}/curve"]
        assert [r["epoch"] for r in curve] == [0, 1, 2] and all("knn/top1" in r for r in curve)
        assert read_jsonl(out / f"{stage}_metrics.jsonl")  # the copied metrics
    knn10 = by_what["kobak-e100/knn10"]
    assert knn10["published"] == 83.2 and knn10["difference"] == round(knn10["figure"] - 83.2, 2)
    assert by_what["lightly-e200/knn200_max"]["published"] == 84.8 and 0 < by_what["lightly-e200/knn200"]["figure"]
    check_step_rows([r for r in rows if r.get("stage") == "step" and r["what"].startswith(("step/", "stage/"))])
    micro = [r for r in rows if r.get("stage") == "micro_batch" and r["what"].startswith("memory/peak")]
    assert len(micro) == 2 and all(r["figure"] > 0 for r in micro)
    files = {p.name for p in out.iterdir()}
    assert files == {"report.jsonl", "log.txt", "kobak-e100_metrics.jsonl", "lightly-e200_metrics.jsonl",
                     "speedrun_metrics.jsonl", "profile.txt"} and by_what["report/files"]["figure"] == len(files)


def test_gpu_report_killed_in_a_stage_keeps_every_finished_line(archive, decoded_cache, tmp_path):
    """The device command's time limit kills everything at once: what finished before must be in OUTDIR, whole."""
    out = tmp_path / "out"
    proc = run_report(out, archive, decoded_cache, "--stages", "tests", "kobak-e100", start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and '"kobak-e100/curve", "epoch": 1' not in _text(out / "report.jsonl"):
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the orchestrator and the pretraining it runs, mid-stage
        proc.wait()
    rows = read_jsonl(out / "report.jsonl")  # every line whole and parseable
    whats = [r["what"] for r in rows]
    assert "tests/gpu" in whats and {"what": "report/stage_end", "stage": "tests"}.items() <= next(
        r for r in rows if r.get("stage") == "tests" and r["what"] == "report/stage_end").items()
    assert whats[-1] == "kobak-e100/curve" and "kobak-e100/pretrain" not in whats  # cut inside the pretraining
    assert [r["epoch"] for r in read_jsonl(out / "kobak-e100_metrics.jsonl") if "knn/top1" in r][:2] == [0, 1]


def _text(path):
    return path.read_text() if path.is_file() else ""


def test_gpu_report_plan_and_skips():
    """The plan as main() runs it (a background stage beside the next one), and a stage that cannot fit is skipped
    with its reason, not started."""
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_report

    stages = {s.name: s for s in gpu_report.STAGES}
    default = [stages[name] for name in gpu_report.DEFAULT_STAGES]
    assert [(r["stage"], r["starts_at_s"], r["fits"]) for r in gpu_report.plan(default, 530)] == [
        ("data_cost", 0, True), ("tests", 0, True), ("kobak-e100", 100, True), ("loss", 370, True),
        ("step", 400, True)]
    assert sum(s.estimate_s for s in default if not s.background) <= 530
    assert [(r["stage"], r["fits"]) for r in gpu_report.plan(default, 300)] == [
        ("data_cost", True), ("tests", True), ("kobak-e100", False), ("loss", True), ("step", True)]


def test_gpu_report_skips_what_does_not_fit(tmp_path, capsys):
    sys.path.insert(0, str(REPO / "bench"))
    import gpu_report

    assert gpu_report.main([str(tmp_path), "--tiny", "--budget-s", "0"]) == 0
    rows = read_jsonl(tmp_path / "report.jsonl")
    skipped = [r for r in rows if r["what"] == "report/skipped"]
    assert [r["stage"] for r in skipped] == gpu_report.DEFAULT_STAGES
    assert all("s of the budget left" in r["reason"] for r in skipped)
    assert not any(r["what"] == "report/stage_start" for r in rows)


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


def test_make_gpu_carry_in_a_fresh_clone(archive, tmp_path):
    """`make gpu-carry` from a clone with no virtual environment: one pinned wheel per package the GPU image lacks,
    the archive, the size printed and under the device tool's 64 MiB."""
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    # As from a shell: under `make test` the outer make's level and flags would make this one print its directory.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    result = subprocess.run(["make", "gpu-carry", f"SHARED={archive.parents[1]}"], cwd=clone, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (clone / ".venv").exists()
    pins = next(line for line in (clone / "Makefile").read_text().splitlines() if line.startswith("CARRY_WHEELS"))
    wanted = {pin.split("==")[0].replace("-", "_").lower(): pin.split("==")[1] for pin in pins.split(":=")[1].split()}
    wheels = sorted(p.name for p in (clone / ".whl").iterdir())
    assert {w.split("-")[0].lower(): w.split("-")[1] for w in wheels} == wanted and len(wheels) == len(wanted)
    assert not {"pytorch_lightning", "torchmetrics", "lightning_utilities", "torch", "numpy"} & set(wanted)
    size_line = result.stdout.strip().splitlines()[-1]
    assert "carried in all" in size_line
    carried = sum(p.stat().st_size for d in (".whl", ".gpu") for p in (clone / d).iterdir())
    assert (clone / ".gpu" / archive.name).is_file() and carried < 64 * 2 ** 20
