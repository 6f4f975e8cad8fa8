"""Shared helpers: paths, the CIFAR-10 archive, and running the real entrypoints in a subprocess."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.xz"

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def archive() -> Path:
    if not ARCHIVE.is_file():
        pytest.skip(f"real CIFAR-10 archive not found at {ARCHIVE}")
    return ARCHIVE


@pytest.fixture(scope="session")
def decoded_cache(tmp_path_factory) -> Path:
    """A data.cache_dir shared by every test that reads the archive: it is decoded once per session (~20 s)."""
    return tmp_path_factory.mktemp("decoded")


def read_jsonl(path: Path) -> list:
    """Every JSON line of a file (metrics.jsonl, a benchmark's output): one object per line."""
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_entry(script: str, *args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python <script> args...`` from the repository root and capture its output."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd or REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def tiny_run_args(run_dir: Path, *extra: str) -> list[str]:
    """A pretraining run on synthetic data that takes seconds on a CPU."""
    return ["data.name=synthetic", "device=cpu", "model.width=4", "model.proj_dim=16", "data.val_size=200",
            "data.train_limit=600", "train.batch_size=100", "train.epochs=2", "train.log_every=2",
            "eval.knn_every=1", "eval.knn_k=20", "optim.warmup_epochs=0.5", f"run.dir={run_dir}", "run.name=tiny",
            "wandb.mode=disabled", "eval.plots=false", *extra]


@pytest.fixture(scope="session")
def pretrained_run(tmp_path_factory) -> Path:
    """A tiny finished pretraining run, shared by the tests that evaluate or copy one (read it, do not change it):
    its directory holds encoder.pt, checkpoints/last.pt, summary.json."""
    root = tmp_path_factory.mktemp("pretrained")
    result = run_entry("pretrain.py", *tiny_run_args(root, "train.epochs=1", "eval.knn_every=0"))
    assert result.returncode == 0, result.stderr
    return root / "tiny"


def assert_user_error(result: subprocess.CompletedProcess, fragment: str, status: int = 2) -> None:
    """The bad-input contract: exit status 2 (3 for divergence), the last stderr line `error: ...` naming the
    problem, no traceback."""
    assert result.returncode == status, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("error: ") and fragment in lines[-1], result.stderr
    assert "Traceback" not in result.stderr


def assert_user_error_here(capsys, main, argv: list[str], fragment: str) -> list[str]:
    """The bad-input contract in this process: ``run_cli(main, argv)``, as ``python <entrypoint>`` runs it, exits
    with status 2 and one `error:` line naming the problem (no interpreter start-up per case). Returns the stderr
    lines."""
    from rundir.cli import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2, err
    assert err and err[-1].startswith("error: ") and fragment in err[-1], err
    return err


@pytest.fixture(autouse=True)
def wandb_importable_after_each_test():
    """An entrypoint run in this process with wandb.mode=disabled blocks ``import wandb`` for the rest of the process
    (rundir.tracking.keep_wandb_out, a per-process contract); the next test starts without that block."""
    yield
    if "wandb" in sys.modules and sys.modules["wandb"] is None:
        del sys.modules["wandb"]


@pytest.fixture(scope="session")
def evaluated_run(tmp_path_factory, pretrained_run) -> Path:
    """A linear evaluation (eval.explain=true) of the shared tiny pretraining run: its directory holds classifier.pt
    and gradcam.png (read it, do not change it)."""
    root = tmp_path_factory.mktemp("evaluated")
    result = run_entry("finetune.py", f"checkpoint={pretrained_run}", "eval.mode=linear", "eval.explain=true",
                       "data.name=synthetic", "device=cpu", "data.val_size=200", "probe.epochs=5",
                       "probe.wd_grid=[0.0]", "wandb.mode=disabled", f"run.dir={root}", "run.name=lin")
    assert result.returncode == 0, result.stderr
    assert "explained: gradcam of resnet18 (lin) on 16 test images" in result.stdout
    return root / "lin"
