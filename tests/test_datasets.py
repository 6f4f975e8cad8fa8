"""Datasets beyond CIFAR-10: CIFAR-100 and STL-10 readers on small files written in their official formats (no
download), image folders of any size with an unlabeled/ directory, encoders built for the image size, and the
transfer protocol (pretrained on one dataset, evaluated on another)."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import finetune as finetune_entry
import pretrain as pretrain_entry
from augment import image_statistics
from core.errors import UserError
from data import load_source, split_train_val
from tests.conftest import assert_user_error, assert_user_error_here, run_entry

TINY = ["device=cpu", "model.width=4", "model.proj_dim=16", "train.epochs=1", "train.log_every=1", "eval.knn_k=5",
        "eval.plots=false", "wandb.mode=disabled", "optim.warmup_epochs=0"]


def cifar_batch(images: np.ndarray, labels: list, key: bytes) -> dict:
    """A batch dict as the official python CIFAR files hold it: byte-string keys, uint8 data [N, 3072]."""
    return {b"batch_label": b"testing batch", key: labels, b"data": images.reshape(len(images), -1),
            b"filenames": [f"img{i}.png".encode() for i in range(len(images))]}


def write_cifar100(root, n_train=40, n_test=20, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    splits = {}
    for name, n in (("train", n_train), ("test", n_test)):
        images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        labels = [i % classes for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({**cifar_batch(images, labels, b"fine_labels"), b"coarse_labels": [0] * n}, f, protocol=2)
        splits[name] = (images, labels)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(classes)],
                     b"coarse_label_names": [b"all"]}, f, protocol=2)
    return splits


def test_cifar100_and_cifar10_read_from_their_official_python_files(tmp_path):
    splits = write_cifar100(tmp_path)
    data = load_source("cifar100", str(tmp_path), download=False)
    assert data.classes == ["c0", "c1", "c2", "c3"] and data.train_images.shape == (40, 3, 32, 32)
    assert torch.equal(data.train_images, torch.from_numpy(splits["train"][0]))  # CHW rows as stored
    assert data.test_labels.tolist() == splits["test"][1]
    rng = np.random.default_rng(1)
    folder = tmp_path / "c10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, (6, 3, 32, 32), dtype=np.uint8)
        batches.append(images)
        with open(folder / name, "wb") as f:
            pickle.dump(cifar_batch(images, list(range(6)), b"labels"), f, protocol=2)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"k{i}".encode() for i in range(10)]}, f, protocol=2)
    c10 = load_source("cifar10", str(tmp_path / "c10"))
    assert c10.train_images.shape == (30, 3, 32, 32) and torch.equal(c10.test_images, torch.from_numpy(batches[-1]))
    assert c10.classes[0] == "k0"


class Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_cifar_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    write_cifar100(tmp_path)
    marker = tmp_path / "payload-ran"
    with open(tmp_path / "cifar-100-python" / "train", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": [0], b"x": Payload(marker)}, f,
                    protocol=2)
    result = run_entry("pretrain.py", "data.name=cifar100", f"data.root={tmp_path}", "data.download=false",
                       f"run.dir={tmp_path / 'runs'}", *TINY)
    assert_user_error(result, "holds more than arrays of numbers, lists, numbers and strings (it asks for posix.system)")
    assert not marker.exists() and not (tmp_path / "runs").exists()


def crafted_object_array(slots: int) -> bytes:
    """125 bytes asking numpy for an object array of ``slots`` entries filled from an empty list: read by a plain
    unpickler, 10^8 slots took 763 MiB (or crashed the interpreter) and 2^31 a MemoryError traceback."""
    count = b"J" + slots.to_bytes(4, "little", signed=True) if slots < 2 ** 31 else b"\x8a\x05" + slots.to_bytes(5, "little")
    return (b"\x80\x03cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nK\x00\x85C\x01b\x87R(K\x01" + count +
            b"\x85cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R(K\x03X\x01\x00\x00\x00|NNNJ\xff\xff\xff\xffJ\xff"
            b"\xff\xff\xffK?tb\x89]tb.")


def test_a_pickle_cannot_make_the_reader_allocate_more_than_the_file_holds(tmp_path):
    """Object arrays, shapes the data does not fill and arrays built by calling numpy.ndarray are refused with one
    line, before any memory is taken; the official files' uint8 arrays (protocol 2) still load (test above)."""
    from data.formats import read_pickle

    cases = {"objects_1e8": crafted_object_array(10 ** 8), "objects_2e31": crafted_object_array(2 ** 31)}
    small = pickle.dumps({b"data": np.zeros((2, 4), np.uint8)}, protocol=2)
    assert b"K\x02K\x04\x86" in small  # the shape (2, 4), made (10^8, 4) with its 8 bytes of data
    cases["short_data"] = small.replace(b"K\x02K\x04\x86", b"J\x00\xe1\xf5\x05K\x04\x86")
    cases["ndarray_called"] = (b"\x80\x02cnumpy\nndarray\nJ\x00\xe1\xf5\x05\x85\x85R.")
    for name, payload in cases.items():
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(UserError) as err:
            read_pickle(tmp_path / name)
        assert "so it was not loaded" in str(err.value) or "cannot read" in str(err.value), name
        assert {"objects_1e8": "dtype object", "objects_2e31": "dtype object", "ndarray_called": "takes no arguments",
                "short_data": "[100000000, 4] and uint8 (400000000 bytes) from 8 bytes"}[name] in str(err.value)


def test_cifar_labels_that_do_not_fit_the_images_or_the_classes_are_refused(tmp_path):
    write_cifar100(tmp_path)
    train = tmp_path / "cifar-100-python" / "train"
    for labels, fragment in (([0] * 39, "holds 40 images but 39 labels"),
                             ([0] * 39 + [4], "training labels run from 0 to 4, outside 0..3 for the 4 classes"),
                             ([0] * 39 + [-1], "training labels run from -1 to 0")):
        images = np.zeros((40, 3, 32, 32), np.uint8)
        with open(train, "wb") as f:
            pickle.dump(cifar_batch(images, labels, b"fine_labels"), f, protocol=2)
        with pytest.raises(UserError, match=fragment.replace("..", r"\.\.")):
            load_source("cifar100", str(tmp_path))


def write_stl10(root, per_class=4, test_per_class=2, unlabeled=50, seed=0):
    """stl10_binary as STL-10 ships it: uint8 images of 3 x 96 x 96 stored column-major, labels 1..10."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    images = {}
    for name, n in (("train", 10 * per_class), ("test", 10 * test_per_class), ("unlabeled", unlabeled)):
        hwc = rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8)  # [N, C, H, W] as we expect them back
        hwc.transpose(0, 1, 3, 2).tofile(folder / f"{name}_X.bin")  # column-major on disk
        images[name] = hwc
        if name != "unlabeled":
            (np.arange(n) % 10 + 1).astype(np.uint8).tofile(folder / f"{name}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"s{i}" for i in range(10)) + "\n")
    return images


def test_stl10_reads_its_binary_files_with_the_unlabeled_split(tmp_path):
    images = write_stl10(tmp_path)
    data = load_source("stl10", str(tmp_path), unlabeled=True)
    assert torch.equal(data.train_images, torch.from_numpy(images["train"]))  # column-major undone
    assert torch.equal(data.unlabeled_images, torch.from_numpy(images["unlabeled"]))
    assert data.train_labels.tolist()[:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0] and data.classes[-1] == "s9"
    assert not len(load_source("stl10", str(tmp_path)).unlabeled_images)  # read only when asked


def write_folder(root, size, classes=12, per_class=6, test_per_class=2, unlabeled=0, odd=None):
    rng = np.random.default_rng(size)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c in range(classes):
            (root / split / f"class{c:02d}").mkdir(parents=True)
            base = rng.integers(0, 256, 3)
            for i in range(n):
                pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c:02d}" / f"{i}.png")
    for i in range(unlabeled):  # any nesting below unlabeled/
        folder = root / "unlabeled" / f"shard{i % 3}" / "deeper"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")
    if odd:
        Image.fromarray(np.zeros((odd, odd, 3), np.uint8)).save(root / "train" / "class00" / "odd.png")
    return root


def folder_args(root, tmp_path, name, *extra):
    return ["data.name=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_size=24",
            "train.batch_size=24", f"run.dir={tmp_path / 'runs'}", f"run.name={name}", *TINY, *extra]


def test_a_64px_folder_of_12_classes_pretrains_evaluates_and_exports(tmp_path, capsys):
    """ResNet (CIFAR stem below 96 px) and ViT (patch 8 at 64 px: 64 tokens), each pretrained on 64x64 images,
    recorded at that size in encoder.pt with the statistics of its training images, evaluated three ways, exported."""
    import export as export_entry

    root = write_folder(tmp_path / "f64", 64)
    for arch in ("resnet18", "vit_tiny"):
        width = ["model.width=null"] if arch == "vit_tiny" else []
        summary = pretrain_entry.main(folder_args(root, tmp_path, arch, f"model.arch={arch}", *width))
        assert summary["status"] == "finished"
        encoder = torch.load(tmp_path / "runs" / arch / "encoder.pt", weights_only=True)
        assert encoder["arch"]["image_size"] == 64 and len(encoder["classes"]) == 12
        if arch == "resnet18":
            assert encoder["arch"]["stem"] == "cifar"
        data = load_source("folder", str(root), cache_dir=str(tmp_path / "cache"))
        train_idx, _ = split_train_val(data.train_labels, 24)
        assert encoder["mean"] == pytest.approx(list(image_statistics(data.train_images[train_idx])[0]), abs=1e-5)
    for mode in ("knn", "linear", "finetune"):
        record = finetune_entry.main([f"checkpoint={tmp_path / 'runs' / 'resnet18'}", f"eval.mode={mode}",
                                      "data.name=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                                      "data.val_size=24", "probe.epochs=2", "probe.wd_grid=[0.0]", "eval.knn_k=5",
                                      "train.batch_size=16", "train.epochs=1", "device=cpu", "wandb.mode=disabled",
                                      f"run.dir={tmp_path / 'runs'}", f"run.name=eval-{mode}"])
        assert record["data/image_size"] == 64 and record["data/resized_from"] is None
        assert 0 <= record["test/top1"] <= 100 and len(record["test/per_class"]) == 12
    out = tmp_path / "vit64.onnx"
    export_entry.main([f"checkpoint={tmp_path / 'runs' / 'vit_tiny'}", "format=onnx", f"out={out}",
                       "data.name=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert json.loads(out.with_name("vit64.onnx.json").read_text())["input"].startswith("uint8 [N, 3, 64, 64]")
    capsys.readouterr()


def test_a_96px_folder_pretrains_on_its_unlabeled_images_and_evaluates_on_its_labeled_ones(tmp_path, capsys):
    root = write_folder(tmp_path / "f96", 96, classes=4, per_class=8, unlabeled=30)
    pretrain_entry.main(folder_args(root, tmp_path, "u", "data.unlabeled=true", "data.val_size=8"))
    shown = capsys.readouterr().out
    assert "data: 54 train / 8 val images (3, 96, 96)" in shown  # 24 labeled + 30 unlabeled; val from the labeled
    encoder = torch.load(tmp_path / "runs" / "u" / "encoder.pt", weights_only=True)
    assert encoder["arch"]["stem"] == "imagenet" and encoder["arch"]["image_size"] == 96
    record = finetune_entry.main([f"checkpoint={tmp_path / 'runs' / 'u'}", "eval.mode=knn", "data.name=folder",
                                  f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_size=8",
                                  "eval.knn_k=5", "device=cpu", "wandb.mode=disabled",
                                  f"run.dir={tmp_path / 'runs'}"])
    assert record["data/train_images"] == 24 and record["data/test_images"] == 8


def test_stl10_pretraining_with_its_unlabeled_split(tmp_path, capsys):
    write_stl10(tmp_path / "stl")
    pretrain_entry.main(["data.name=stl10", f"data.root={tmp_path / 'stl'}", "data.download=false",
                         "data.unlabeled=true", "data.val_size=10", "train.batch_size=40",
                         f"run.dir={tmp_path / 'runs'}", "run.name=stl", *TINY])
    assert "data: 80 train / 10 val images (3, 96, 96)" in capsys.readouterr().out  # 30 labeled + 50 unlabeled


def test_transfer_evaluation_resizes_to_the_encoders_size_and_says_so(tmp_path, pretrained_run, capsys):
    """An encoder pretrained on 32x32 images (CIFAR-shaped) evaluated on a 64x64 dataset: the SimCLR paper's
    transfer protocol; the evaluation images are resized to what the encoder was trained at."""
    root = write_folder(tmp_path / "f64", 64, classes=3)
    record = finetune_entry.main([f"checkpoint={pretrained_run}", "eval.mode=linear", "data.name=folder",
                                  f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_size=6",
                                  "probe.epochs=2", "probe.wd_grid=[0.0]", "device=cpu", "wandb.mode=disabled",
                                  f"run.dir={tmp_path / 'runs'}", "run.name=transfer"])
    assert "resized from 64x64 to 32x32" in capsys.readouterr().out
    saved = json.loads((tmp_path / "runs" / "transfer" / "results.json").read_text())
    assert saved["data/image_size"] == 32 and saved["data/resized_from"] == 64 == record["data/resized_from"]
    assert len(saved["test/per_class"]) == 3  # the evaluation dataset's classes, a new head


def test_bad_dataset_requests_are_one_error_line_and_write_nothing(tmp_path, capsys):
    mixed = write_folder(tmp_path / "mixed", 64, classes=2, per_class=2, test_per_class=1, odd=48)
    no_unlabeled = write_folder(tmp_path / "plain", 32, classes=2, per_class=4)
    (no_unlabeled / "unlabeled" / "empty").mkdir(parents=True)
    cases = [
        (folder_args(mixed, tmp_path, "a"), "images differ in size: "),
        (folder_args(no_unlabeled, tmp_path, "b", "data.unlabeled=true", "data.val_size=2", "train.batch_size=4"),
         "has no images under unlabeled/"),
        (["data.name=synthetic", "data.unlabeled=true", f"run.dir={tmp_path / 'runs'}", *TINY],
         "data.name=synthetic '~/.cache/simclr/cifar10' has no unlabeled images"),
        (["data.name=synthetic", "data.image_size=100", "model.arch=vit_tiny", "model.width=null", "data.val_size=100",
          f"run.dir={tmp_path / 'runs'}", *TINY[2:]], "vit_tiny takes images whose size divides into 8-pixel patches"),
        (["data.name=synthetic", "data.unlabeled=true", "eval.online_linear=true", f"run.dir={tmp_path / 'runs'}",
          *TINY], "eval.online_linear trains on labeled batches"),
    ]
    for args, fragment in cases:
        assert_user_error_here(capsys, pretrain_entry.main, args, fragment)
    err = capsys.readouterr().err
    assert not (tmp_path / "runs").exists(), err
    result = run_entry("pretrain.py", *folder_args(mixed, tmp_path, "a"))  # once through the real command line
    assert_user_error(result, "give data.image_size=S to resize every image")
    assert "odd.png" in result.stderr and not (tmp_path / "runs").exists()


def test_with_an_image_size_mixed_folders_are_resized_once_and_cached_by_size(tmp_path):
    mixed = write_folder(tmp_path / "mixed", 64, classes=2, per_class=2, test_per_class=1, odd=48)
    a = load_source("folder", str(mixed), cache_dir=str(tmp_path / "c"), image_size=40)
    b = load_source("folder", str(mixed), cache_dir=str(tmp_path / "c"), image_size=56)
    assert a.train_images.shape[1:] == (3, 40, 40) and b.train_images.shape[1:] == (3, 56, 56)
    assert len(list((tmp_path / "c").glob("*.pt"))) == 2  # one cache entry per size


def test_a_dataset_larger_than_the_device_is_refused_before_it_moves():
    from core.device import check_fits

    with pytest.raises(UserError, match="needs 1048576.0 GiB on cpu, more than 50% of the"):
        check_fits(2 ** 50, torch.device("cpu"), "data.name=stl10")
    check_fits(2 ** 20, torch.device("cpu"), "a small one")  # passes
