"""Checkpoint files as units: atomic writes, safe loading, strict state loading, encoders from either file."""
import os

import pytest
import torch

from core.errors import UserError
from core.files import atomic_save, atomic_write
from rundir.checkpoint import last_checkpoint, load_file, load_strict, read_encoder


def test_a_failed_atomic_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "state.pt"
    atomic_save({"x": torch.ones(3)}, path)
    with pytest.raises(Exception):
        atomic_save({"x": lambda: 0}, path)  # not serializable: fails before anything replaces the file
    assert torch.equal(load_file(path)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_atomic_write_respects_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        atomic_write(tmp_path / "private", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "private").stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("content, fragment", [
    (b"not a checkpoint", "is not a readable checkpoint"),
    (None, "does not exist"),
])
def test_load_file_refuses_what_is_not_a_checkpoint(tmp_path, content, fragment):
    path = tmp_path / "f.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=fragment):
        load_file(path)


def test_load_strict_names_missing_unexpected_and_mismatched_keys():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    state = {"0.weight": torch.zeros(3, 2), "0.bias": torch.zeros(4), "2.weight": torch.zeros(1, 3)}
    with pytest.raises(UserError) as err:
        load_strict(model, state, "this file")
    message = str(err.value)
    assert "missing keys [1.bias, 1.weight]" in message and "unexpected keys [2.weight]" in message
    assert "shape mismatch in [0.bias]" in message and message.startswith("this file does not fit the model")


def test_an_encoder_reads_the_same_from_encoder_pt_and_last_pt(pretrained_run):
    from_encoder, from_last = read_encoder(str(pretrained_run / "encoder.pt")), read_encoder(str(
        last_checkpoint(pretrained_run)))
    assert from_encoder.state.keys() == from_last.state.keys()
    assert all(torch.equal(from_encoder.state[k], from_last.state[k]) for k in from_encoder.state)
    assert (from_encoder.arch, from_encoder.width, from_encoder.run_name) == ("resnet18", 4, "tiny")
    assert read_encoder(str(pretrained_run)).path == pretrained_run / "encoder.pt"  # the directory: encoder.pt first
