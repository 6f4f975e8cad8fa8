"""Running on a shared cluster: untrusted checkpoints, preemption signals, resumable evaluations, one writer per run,
divergence, resume checks, W&B without network, OS errors. Each through the real command line."""
import json
import os

import pytest
import torch

from tests.conftest import assert_user_error, run_entry, tiny_run_args


class Payload:
    """Unpickling this runs a shell command (what a crafted checkpoint would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A tiny finished pretraining run (its encoder.pt and last.pt are the templates of the crafted files)."""
    root = tmp_path_factory.mktemp("pretrained")
    result = run_entry("pretrain.py", *tiny_run_args(root, "train.epochs=1", "eval.knn_every=0"))
    assert result.returncode == 0, result.stderr
    return root / "tiny"


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
