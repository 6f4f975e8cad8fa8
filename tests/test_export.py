"""export.py: TorchScript, ONNX and safetensors exports of encoders and classifiers equal the eager model on CIFAR-10
test images (checked here independently of export.py's own check), damage is detected, bad input refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import export as export_entry
from tests.conftest import assert_user_error, assert_user_error_here, run_entry
from engine.checkpoint import EncoderFile, read_classifier, read_trained
from engine.export import build_deployable, load_export, max_relative_error, metadata, read_metadata, write_export
from models import create_encoder

TOLERANCE = 1e-4


def _args(run, fmt, out, archive, cache, *extra):
    return [f"checkpoint={run}", f"format={fmt}", f"out={out}", "data.name=folder", f"data.root={archive}",
            f"data.cache_dir={cache}", "check_images=300", *extra]


def test_classifier_pt_holds_the_evaluated_classifier(evaluated_run):
    """The linear probe's standardization is folded into one head; the rebuilt model scores test as results.json."""
    from data import load_source

    record = json.loads((evaluated_run / "results.json").read_text())
    classifier = read_classifier(str(evaluated_run))
    assert classifier.classes == [f"class{i}" for i in range(10)] and classifier.encoder.arch == "resnet18"
    data = load_source("synthetic", "")
    with torch.no_grad():
        logits = build_deployable(classifier.encoder, classifier.head)(data.test_images)
    top1 = 100 * (logits.argmax(1) == data.test_labels).float().mean().item()
    assert top1 == pytest.approx(record["test/top1"], abs=0.11)  # one image of 1,000 may sit on a tie


@pytest.mark.real_data
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "safetensors"])
def test_exports_equal_the_eager_classifier_on_cifar10_test_images(fmt, evaluated_run, archive, decoded_cache,
                                                                   tmp_path, capsys):
    out = tmp_path / f"model.{fmt}"
    export_entry.main(_args(evaluated_run, fmt, out, archive, decoded_cache))
    assert "exported: classifier resnet18" in capsys.readouterr().out
    record = json.loads(out.with_name(out.name + ".json").read_text())
    assert record["kind"] == "classifier" and record["input"].startswith("uint8 [N, 3, 32, 32]")
    assert record["max_relative_error"] <= TOLERANCE and record["checked_images"] == 300
    assert read_metadata(out, fmt)["classes"] == [f"class{i}" for i in range(10)]
    # independently of export.py: the runtime's own loader, real test images, batch sizes the trace never saw
    from data import load_source

    images = load_source("folder", str(archive), cache_dir=str(decoded_cache)).test_images[:300]
    encoder, classifier = read_trained(str(evaluated_run))
    eager = build_deployable(encoder, classifier.head)
    if fmt == "torchscript":
        loaded = torch.jit.load(str(out))
        run = lambda x: loaded(x)  # noqa: E731
    elif fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run(None, {"images": x.numpy().astype(np.uint8)})[0])  # noqa: E731
    else:
        from safetensors.torch import load_file

        weights = load_file(str(out))
        assert set(weights) == set(eager.state_dict())  # weights only; the metadata rebuilds the module
        run = load_export(out, fmt)
    with torch.no_grad():
        for batch in (images[:1], images[1:8], images[8:300]):
            got, expected = run(batch), eager(batch)
            assert got.shape == (len(batch), 10)
            assert (got - expected).abs().max().item() <= TOLERANCE * expected.abs().max().item()


@pytest.mark.real_data
def test_a_damaged_export_is_detected(evaluated_run, archive, decoded_cache, tmp_path, capsys):
    out = tmp_path / "model.onnx"
    args = _args(evaluated_run, "onnx", out, archive, decoded_cache)
    export_entry.main(args)
    export_entry.main([*args, "check_only=true"])
    assert "checked:" in capsys.readouterr().out
    pristine = out.read_bytes()
    data = bytearray(pristine)
    data[len(data) // 2] ^= 0xFF  # any one byte: the recorded SHA-256 catches it
    out.write_bytes(bytes(data))
    assert_user_error_here(capsys, export_entry.main, [*args, "check_only=true"],
                           "was changed or damaged since it was exported")
    out.with_name(out.name + ".json").unlink()  # without the record, the outputs give away damaged weights
    out.write_bytes(_with_damaged_weights(pristine))
    assert_user_error_here(capsys, export_entry.main, [*args, "check_only=true"], "differs from the eager model")


def _with_damaged_weights(onnx_bytes: bytes) -> bytes:
    """The file with the exponent byte of every 4th float of its largest weight tensor flipped."""
    import onnx

    model = onnx.load_from_string(onnx_bytes)
    raw = max((t.raw_data for t in model.graph.initializer), key=len)
    start = onnx_bytes.find(raw)
    assert start > 0 and len(raw) > 64
    damaged = bytearray(onnx_bytes)
    for i in range(start + 3, start + len(raw), 16):
        damaged[i] ^= 0x40
    return bytes(damaged)


def test_an_export_beyond_the_tolerance_is_not_written(pretrained_run, tmp_path):
    out = tmp_path / "enc.onnx"  # through the real command line once: the exit status and the error line
    result = run_entry("export.py", f"checkpoint={pretrained_run}", "format=onnx", f"out={out}", "data.name=synthetic",
                       "tolerance=1e-15", "check_images=64")
    assert_user_error(result, "differs from the eager model by")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_vit_encoder_exports_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    encoder = create_encoder("vit_tiny")
    source = EncoderFile(encoder.state_dict(), "vit_tiny", None, tmp_path / "encoder.pt", "vit", "imagenet")
    model = build_deployable(source)
    images = torch.randint(0, 256, (9, 3, 32, 32), dtype=torch.uint8)
    for fmt in ("torchscript", "onnx"):
        path = tmp_path / f"vit.{fmt}"
        write_export(model, fmt, path, images[:2], metadata(source, None, fmt))
        assert max_relative_error(load_export(path, fmt), model, images, batch_sizes=(1, 5)) <= TOLERANCE


def test_bad_export_requests_are_refused_and_nothing_is_overwritten(evaluated_run, tmp_path, capsys):
    existing = tmp_path / "taken.onnx"
    existing.write_text("keep me")
    base = [f"checkpoint={evaluated_run}", "data.name=synthetic"]
    cases = [
        ([*base, "format=tflite", f"out={tmp_path / 'a'}"], "format='tflite' is not one of torchscript, onnx"),
        ([*base, "format=onnx", f"out={existing}"], "already exists; choose another path"),
        ([f"checkpoint={tmp_path / 'nowhere'}", "format=onnx", f"out={tmp_path / 'b'}"], "does not exist"),
        ([*base, "format=onnx"], "checkpoint= and out= are required"),
        ([*base, "format=onnx", f"out={tmp_path / 'missing'}", "check_only=true"], "nothing to check"),
        ([*base, "format=onnx", f"out={tmp_path / 'no' / 'dir.onnx'}"], "does not exist"),
    ]
    for args, fragment in cases:
        assert_user_error_here(capsys, export_entry.main, args, fragment)
    assert existing.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.onnx"]
