"""Micro-batches with cached projection gradients (training/micro_batch.py, train.micro_batch): exact where no layer
mixes samples, per-chunk batch norm otherwise, RNG replayed between the two passes, through the real command line."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from training.micro_batch import forward_backward_in_chunks
from losses import nt_xent
from models import SimCLR, create_encoder, projection_head
from tests.conftest import assert_user_error, read_jsonl, run_entry, tiny_run_args


def relative(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def views(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, 3, 32, 32, dtype=torch.float64, generator=g) for _ in range(2))


def test_without_sample_mixing_layers_micro_batches_train_as_the_whole_batch():
    """A ViT with a head without batch norm: three SGD steps in chunks of 2 end where the whole batch of 8 ends."""
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny")
    whole = SimCLR(encoder, projection_head(encoder.feature_dim, 32, 16, hidden_bn=False), 0.2).double()
    chunked = copy.deepcopy(whole)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (whole, chunked)]
    for step in range(3):
        v1, v2 = views(seed=step)
        for model, optimizer in zip((whole, chunked), optimizers):
            optimizer.zero_grad()
            if model is whole:
                loss = model(v1, v2)["loss"]
                loss.backward()
            else:
                chunk_loss = forward_backward_in_chunks(model, model, v1, v2, micro_batch=2)["loss"]
            optimizer.step()
        assert abs(chunk_loss.item() - loss.item()) < 1e-12
    assert max(relative(b, a) for a, b in zip(whole.parameters(), chunked.parameters())) < 1e-12


class _DropoutHead(nn.Sequential):
    """A head with dropout: randomness inside the forward, which both passes of a chunk must draw alike."""

    def __init__(self, dim):
        super().__init__(nn.Dropout(0.3), projection_head(dim, 32, 16))


def _resnet_simclr():
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", width=4)
    return SimCLR(encoder, _DropoutHead(encoder.feature_dim), 0.5).double()


def _per_chunk_reference(model, v1, v2, micro):
    """What micro-batches compute with batch norm: each chunk forwarded with autograd on its own (its own batch
    statistics), projections concatenated, one loss over all of them; the running statistics move once for the step:
    each chunk's update from the step's starting values, averaged over the chunks."""
    from torch.func import functional_call

    start = {name: b.clone() for name, b in model.named_buffers()}
    parts, after = [], []
    for s in range(0, len(v1), micro):
        buffers = {name: b.clone() for name, b in start.items()}  # this chunk's update lands here
        parts.append(functional_call(model, {**dict(model.named_parameters()), **buffers},
                                     (v1[s:s + micro], v2[s:s + micro]), {"project_only": True}))
        after.append(buffers)
    with torch.no_grad():
        for name, b in model.named_buffers():
            b.copy_(start[name] + sum(a[name] - start[name] for a in after) / len(after) if b.is_floating_point()
                    else after[-1][name])  # a counter: each chunk counted the step once
    z1, z2 = torch.cat([p["z1"] for p in parts]), torch.cat([p["z2"] for p in parts])
    loss = nt_xent(z1, z2, model.temperature)
    loss.backward()
    return loss


@pytest.mark.parametrize("compiled", [False, True])
def test_with_batch_norm_chunks_equal_per_chunk_forwards_and_update_statistics_once(compiled):
    reference, ours = _resnet_simclr(), _resnet_simclr()
    v1, v2 = views()
    torch.manual_seed(7)
    expected = _per_chunk_reference(reference, v1, v2, micro=2)
    rng_after = torch.get_rng_state()
    torch.manual_seed(7)
    runner = torch.compile(ours, backend="aot_eager") if compiled else ours
    got = forward_backward_in_chunks(runner, ours, v1, v2, micro_batch=2)["loss"]
    assert abs(got.item() - expected.item()) < 1e-12
    assert max(relative(b.grad, a.grad) for a, b in zip(reference.parameters(), ours.parameters())) < 1e-10
    for (name, a), b in zip(reference.named_buffers(), ours.buffers()):  # the step's update, not one per chunk
        assert torch.equal(a, b) if not a.is_floating_point() else relative(b, a) < 1e-12, name
    assert ours.encoder.bn1.num_batches_tracked == 1  # counted once per step, as without chunks (was 4)
    assert torch.equal(torch.get_rng_state(), rng_after)  # the RNG continues as after one pass
    fresh, whole = _resnet_simclr(), _resnet_simclr()
    whole(v1, v2, project_only=True)  # an ordinary step over the 8 images: its statistics move by one momentum share
    moved = [(m.encoder.bn1.running_var - fresh.encoder.bn1.running_var).norm().item() for m in (ours, whole)]
    assert 0.5 < moved[0] / moved[1] < 2  # 1.00 (4 updates per step, as before, moved it 3.45x as far)


def test_micro_batched_pretraining_through_the_command_line(tmp_path):
    """train.micro_batch equal to the batch is today's step, bit for bit; chunks of 25 train with the online
    classifier, log their metrics and resume like any run; bad values are refused before anything is written."""
    common = ["train.epochs=1", "eval.knn_every=0", "eval.online_linear=true"]
    runs = {name: run_entry("pretrain.py", *tiny_run_args(tmp_path, *common, f"train.micro_batch={m}",
                                                          f"run.name={name}"))
            for name, m in (("whole", 0), ("same", 100), ("chunks", 25))}
    assert all(r.returncode == 0 for r in runs.values()), [r.stderr[-2000:] for r in runs.values()]
    encoders = {n: torch.load(tmp_path / n / "encoder.pt", weights_only=True)["encoder"] for n in runs}
    assert all(torch.equal(encoders["same"][k], encoders["whole"][k]) for k in encoders["whole"])
    records = read_jsonl(tmp_path / "chunks" / "metrics.jsonl")
    assert all(r["train/views_per_s"] > 0 and 0 <= r["online/train_top1"] <= 100 for r in records if "train/loss" in r)
    summary = json.loads((tmp_path / "chunks" / "summary.json").read_text())
    assert summary["status"] == "finished" and 0 <= summary["online/test_top1"] <= 100
    for bad, fragment in (("30", "must divide the per-process batch of 100"), ("200", "must divide"),
                          ("-1", "train.micro_batch=-1 is out of range")):
        result = run_entry("pretrain.py", *tiny_run_args(tmp_path, f"train.micro_batch={bad}", "run.name=bad"))
        assert_user_error(result, fragment)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("loss_name", ["ntxent", "supcon", "dclw"])
def test_micro_batches_stay_exact_with_small_views_and_every_loss(loss_name):
    """Multi-crop (two 16-pixel views per image besides the two global ones) with each loss: chunks of 2 give the
    loss and gradients of the whole batch of 8 (a ViT, whose layers mix no samples; fp64)."""
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny")
    model = SimCLR(encoder, projection_head(encoder.feature_dim, 32, 16, hidden_bn=False), 0.2,
                   loss_name=loss_name).double()
    chunked = copy.deepcopy(model)
    v1, v2 = views()
    local = torch.randn(2 * 8, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3, 0])
    loss = model(v1, v2, labels, local_views=local)["loss"]
    loss.backward()
    out = forward_backward_in_chunks(chunked, chunked, v1, v2, micro_batch=2, labels=labels, local=local)
    assert abs(out["loss"].item() - loss.item()) < 1e-12 and out["z_local"].shape == (16, 16)
    # fp64 rounding: largest (~8e-10, measured) on the parameters with the smallest gradients
    assert max(relative(b.grad, a.grad) for a, b in zip(model.parameters(), chunked.parameters())) < 1e-8
