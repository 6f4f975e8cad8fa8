"""export.py: TorchScript, ONNX and safetensors exports of encoders and classifiers equal the eager model on CIFAR-10
test images (checked here independently of export.py's own check), damage is detected, bad input refused."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import export as export_entry
from tests.conftest import assert_user_error, assert_user_error_here, run_entry
from rundir.checkpoint import EncoderFile, read_classifier, read_trained
from deploy.export import build_deployable, load_export, max_relative_error, metadata, read_metadata, write_export
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
        write_export(model, fmt, path, images[:2], metadata(source, None, fmt, image_size=32))
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


def test_export_files_follow_the_umask_and_record_the_image_size(evaluated_run, tmp_path):
    """safetensors used to create its file 0600 under umask 022; the record named 32x32 whatever the encoder."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    for fmt in ("torchscript", "onnx", "safetensors"):
        out = tmp_path / f"model.{fmt}"
        result = subprocess.run([sys.executable, str(REPO / "export.py"), f"checkpoint={evaluated_run}",
                                 f"format={fmt}", f"out={out}", "data.name=synthetic", "check_images=16"],
                                capture_output=True, text=True, preexec_fn=lambda: os.umask(0o022))
        assert result.returncode == 0, result.stderr
        assert oct(out.stat().st_mode & 0o777) == oct(0o644), fmt
    source = read_trained(str(evaluated_run))[0]
    assert metadata(source, None, "onnx", image_size=64)["input"].startswith("uint8 [N, 3, 64, 64]")


def test_an_export_onto_a_full_disk_is_an_error_line_and_leaves_nothing(evaluated_run, tmp_path):
    """torch.jit.save into a full file system aborted the interpreter (a C++ stack, exit -6) and left its temporary
    file filling the disk. A real 64 kB tmpfs where mount is allowed, else a file-size limit (the same write error)."""
    import resource
    import signal
    import subprocess
    import sys

    from tests.conftest import REPO

    target = tmp_path / "small"
    target.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)],
                             capture_output=True).returncode == 0

    def limit():  # without tmpfs: writes past 64 kB fail (EFBIG) instead of filling a disk
        if not mounted:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    try:
        for fmt in ("torchscript", "onnx", "safetensors"):
            result = subprocess.run([sys.executable, str(REPO / "export.py"), f"checkpoint={evaluated_run}",
                                     f"format={fmt}", f"out={target / ('model.' + fmt)}", "data.name=synthetic",
                                     "check_images=16"], capture_output=True, text=True, preexec_fn=limit)
            assert_user_error(result, "No space left on device" if mounted else "File too large")
            assert list(target.iterdir()) == [], fmt  # no export, no temporary file
    finally:
        if mounted:
            subprocess.run(["umount", str(target)], capture_output=True)


def test_a_classifier_with_non_finite_weights_is_neither_exported_nor_explained(evaluated_run, tmp_path, capsys):
    import shutil

    import explain as explain_entry

    broken = tmp_path / "broken"
    shutil.copytree(evaluated_run, broken)
    state = torch.load(broken / "classifier.pt", weights_only=True)
    state["head"]["weight"][0, 0] = float("nan")
    torch.save(state, broken / "classifier.pt")
    fragment = "holds non-finite classifier head weights (NaN or inf in weight)"
    assert_user_error_here(capsys, export_entry.main, [f"checkpoint={broken}", "format=onnx",
                                                       f"out={tmp_path / 'm.onnx'}", "data.name=synthetic"], fragment)
    assert_user_error_here(capsys, explain_entry.main, [f"checkpoint={broken}", "data.name=synthetic", "device=cpu",
                                                        "wandb.mode=disabled", f"out={tmp_path / 'g.png'}"], fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_int8_onnx_is_a_quarter_of_the_file_within_a_point_and_runs_outside_the_project(evaluated_run,
                                                                                       pretrained_run, tmp_path):
    """format=onnx_int8: statically quantized (onnxruntime, calibrated on training images, per-channel weights), a
    dynamic batch, loaded by a bare onnxruntime session in another directory; refused when it strays too far."""
    import subprocess
    import sys

    from data import load_source
    from tests.conftest import REPO

    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    for fmt, out in (("onnx", fp32), ("onnx_int8", int8)):
        result = run_entry("export.py", f"checkpoint={evaluated_run}", f"format={fmt}", f"out={out}",
                           "data.name=synthetic", "check_images=1000")
        assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "int8.onnx.json").read_text())
    assert record["calibration_images"] == 512 and abs(record["top1_drop"]) <= 1.0
    assert int8.stat().st_size < 0.4 * fp32.stat().st_size  # width 4: graph overhead weighs more (width 8 below)
    data = load_source("synthetic", "")
    np.save(tmp_path / "images.npy", data.test_images.numpy())
    script = ("import numpy as np, onnxruntime as ort, sys\n"
              "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
              "x = np.load(sys.argv[2])\n"
              "out = np.concatenate([s.run(None, {'images': x[i:i + b]})[0] for i, b in ((0, 1), (1, 37), (38, 962))])\n"
              "print(' '.join(map(str, out.argmax(1))))")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    tops = {}
    for name, path in (("fp32", fp32), ("int8", int8)):
        ran = subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "images.npy")], cwd=outside,
                             capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"}, timeout=300)
        assert ran.returncode == 0, ran.stderr[-2000:]
        predicted = torch.tensor([int(v) for v in ran.stdout.split()])
        tops[name] = 100 * (predicted == data.test_labels).float().mean().item()
    assert abs(tops["fp32"] - tops["int8"]) <= 1.0
    assert tops["int8"] == pytest.approx(record["top1_int8"], abs=1e-6)  # what export.py measured, independently
    bench = subprocess.run([sys.executable, "bench/onnx_latency.py", str(fp32), str(int8), "--repeats", "2",
                            "--threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=300)
    rows = [json.loads(line) for line in bench.stdout.splitlines()]
    assert [(r["model"], r["shape"][0]) for r in rows] == [("fp32.onnx", 1), ("fp32.onnx", 256), ("int8.onnx", 1),
                                                           ("int8.onnx", 256)] and all(r["figure"] > 0 for r in rows)
    refused = run_entry("export.py", f"checkpoint={pretrained_run}", "format=onnx_int8",
                        f"out={tmp_path / 'enc8.onnx'}", "data.name=synthetic", "min_feature_cosine=1.0")
    assert_user_error(refused, "features have a mean cosine of")
    assert not (tmp_path / "enc8.onnx").exists()


def test_int8_onnx_of_a_width_8_classifier_is_at_most_035x_the_fp32_file(tmp_path):
    """The size claim at the width of the documented CPU encoder (ResNet-18 width 8 + a 10-class head)."""
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", 8)
    source = EncoderFile(encoder.state_dict(), "resnet18", 8, tmp_path / "encoder.pt", "r", "cifar")
    head = torch.nn.Linear(encoder.feature_dim, 10)
    model = build_deployable(source, head.state_dict())
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    meta = metadata(source, [str(i) for i in range(10)], "onnx", image_size=32)
    write_export(model, "onnx", tmp_path / "fp32.onnx", images[:2], meta)
    write_export(model, "onnx_int8", tmp_path / "int8.onnx", images[:2], meta, calibration=images)
    assert (tmp_path / "int8.onnx").stat().st_size <= 0.35 * (tmp_path / "fp32.onnx").stat().st_size
    assert read_metadata(tmp_path / "int8.onnx", "onnx_int8")["classes"] == meta["classes"]


@pytest.mark.parametrize("arch", ["resnet18", "vit_tiny"])
def test_an_encoder_trained_at_48_pixels_is_exported_and_checked_at_48(arch, tmp_path):
    """The export's input and its check follow the size in encoder.pt (the 32-pixel test images resized as the
    evaluation resizes them); both architectures used to be exported or checked at the dataset's 32 pixels."""
    torch.manual_seed(0)
    width = 4 if arch == "resnet18" else None
    encoder = create_encoder(arch, width, 48)
    torch.save({"encoder": encoder.state_dict(), "normalize": "cifar",
                "arch": {"arch": arch, "width": width, "image_size": 48, "stem": "auto"}}, tmp_path / "encoder.pt")
    out = tmp_path / "enc.onnx"
    export_entry.main([f"checkpoint={tmp_path / 'encoder.pt'}", "format=onnx", f"out={out}", "data.name=synthetic",
                       "check_images=20"])
    record = json.loads((tmp_path / "enc.onnx.json").read_text())
    assert record["input"].startswith("uint8 [N, 3, 48, 48]") and record["image_size"] == 48
    assert record["max_relative_error"] <= TOLERANCE and record["checked_per_class"] == [2] * 10
    import onnxruntime

    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[-2:] == [48, 48]


def test_int8_calibration_and_check_images_are_class_balanced_on_a_folder(tmp_path):
    """An image folder lists its images class by class: the first 30 training images of this one are all class00.
    Calibration and check images are drawn class-balanced (and seeded: the same on a second export)."""
    from tests.test_datasets import write_folder

    root = write_folder(tmp_path / "f", 32, classes=3, per_class=40, test_per_class=12)
    torch.manual_seed(0)
    encoder = create_encoder("resnet18", 4, 32)
    torch.save({"encoder": encoder.state_dict(), "normalize": "cifar",
                "arch": {"arch": "resnet18", "width": 4, "image_size": 32}}, tmp_path / "encoder.pt")
    records = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.onnx"
        export_entry.main([f"checkpoint={tmp_path / 'encoder.pt'}", "format=onnx_int8", f"out={out}",
                           "data.name=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                           "calibration_images=30", "check_images=30", "min_feature_cosine=0"])
        records.append(json.loads((tmp_path / f"{name}.onnx.json").read_text()))
    assert records[0]["calibration_per_class"] == [10, 10, 10] and records[0]["checked_per_class"] == [10, 10, 10]
    assert records[0]["feature_cosine_mean"] == records[1]["feature_cosine_mean"]
    assert records[0]["sha256"] == records[1]["sha256"]  # the same calibration images, the same scales
