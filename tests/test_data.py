import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from data import EpochSampler, class_ranks, load_source, make_synthetic, split_labeled, split_train_val
from data.cache import cached
from core.errors import UserError


def make_folder(root, per_class=(6, 3), classes=("b_cls", "a_cls"), size=8):
    """An image-folder tree with JPEG/PNG files whose pixels encode (split, class, index)."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "test"), per_class):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                img = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
                img.save(root / split / c / f"{i:04d}.png")
    return root


def test_folder_directory_and_archive_decode_identically(tmp_path):
    src = make_folder(tmp_path / "src")
    ds = load_source("folder", str(src), cache_dir=str(tmp_path / "cache"))
    assert ds.classes == ["a_cls", "b_cls"]  # sorted folder names give the label ids
    assert ds.train_images.shape == (12, 3, 8, 8) and ds.train_images.dtype == torch.uint8
    assert ds.train_labels.tolist() == [0] * 6 + [1] * 6 and ds.test_images.shape[0] == 6
    expected = torch.from_numpy(np.array(Image.open(src / "train" / "a_cls" / "0000.png"))).permute(2, 0, 1)
    assert torch.equal(ds.train_images[0], expected)
    archive = tmp_path / "data.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(src, arcname="cifar")  # with a top-level folder, which is accepted
    ds2 = load_source("folder", str(archive), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(ds.train_images, ds2.train_images) and torch.equal(ds.test_labels, ds2.test_labels)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # one cache file per source identity


def test_cache_is_used_and_a_corrupt_cache_is_rebuilt(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"x": torch.arange(3)}

    assert torch.equal(cached(tmp_path, "k", build)["x"], torch.arange(3))
    assert torch.equal(cached(tmp_path, "k", build)["x"], torch.arange(3)) and len(calls) == 1
    (tmp_path / "k.pt").write_bytes(b"half-written garbage")
    assert torch.equal(cached(tmp_path, "k", build)["x"], torch.arange(3)) and len(calls) == 2
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_and_corrupt_archives_are_user_errors(tmp_path):
    src = make_folder(tmp_path / "src")
    good = tmp_path / "good.tar.xz"
    with tarfile.open(good, "w:xz") as tar:
        tar.add(src, arcname=".")
    truncated = tmp_path / "truncated.tar.xz"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"\x1f\x8b not really gzip" * 10)
    for path in (truncated, garbage):
        with pytest.raises(UserError, match="cannot read archive"):
            load_source("folder", str(path), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(UserError, match="does not exist"):
        load_source("folder", str(tmp_path / "missing"), cache_dir=str(tmp_path / "cache"))


def test_undecodable_image_names_the_file(tmp_path):
    src = make_folder(tmp_path / "src")
    (src / "train" / "a_cls" / "0001.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match="0001.png"):
        load_source("folder", str(src), cache_dir=str(tmp_path / "cache"))


def test_cifar10_without_a_copy_or_download_says_how_to_fix(tmp_path):
    with pytest.raises(UserError, match="point data.root at a local copy"):
        load_source("cifar10", str(tmp_path), download=False)


def test_validation_split_is_balanced_disjoint_and_deterministic():
    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000)]
    train, val = split_train_val(labels, val_size=200, seed=3)
    assert torch.bincount(labels[val]).tolist() == [20] * 10
    assert len(set(train.tolist()) & set(val.tolist())) == 0 and len(train) + len(val) == 1000
    train2, val2 = split_train_val(labels, val_size=200, seed=3)
    assert torch.equal(val, val2) and torch.equal(train, train2)
    _, val_other = split_train_val(labels, val_size=200, seed=4)
    assert not torch.equal(val, val_other)
    limited, val3 = split_train_val(labels, val_size=200, train_limit=305, seed=3)
    assert torch.equal(val3, val) and len(limited) == 305 and set(limited.tolist()) <= set(train.tolist())
    assert torch.bincount(labels[limited]).min() >= 30


def test_class_ranks_are_per_class_permutations():
    labels = torch.tensor([0, 1, 0, 2, 1, 0])
    ranks = class_ranks(labels, seed=0)
    for c in range(3):
        assert sorted(ranks[labels == c].tolist()) == list(range(int((labels == c).sum())))


def test_sampler_permutes_per_epoch_and_shards_a_global_batch():
    full = EpochSampler(100, 20, seed=1)
    assert full.steps_per_epoch == 5
    epoch0 = torch.cat(list(full.batches(0)))
    assert sorted(epoch0.tolist()) == list(range(100))
    assert not torch.equal(epoch0, torch.cat(list(full.batches(1))))
    assert torch.equal(epoch0, torch.cat(list(EpochSampler(100, 20, seed=1).batches(0))))  # same on every rank
    shards = [list(EpochSampler(100, 20, seed=1, rank=r, world_size=2).batches(0)) for r in range(2)]
    for step, global_batch in enumerate(full.batches(0)):
        assert torch.equal(torch.cat([shards[0][step], shards[1][step]]), global_batch)
    with pytest.raises(ValueError):
        EpochSampler(100, 20, seed=1, world_size=3)


def test_synthetic_is_fixed_and_labeled():
    a, b = make_synthetic(), make_synthetic()
    assert torch.equal(a.train_images, b.train_images)
    assert a.train_images.shape == (5000, 3, 32, 32) and torch.bincount(a.train_labels).tolist() == [500] * 10


def cifar_like_labels():
    return torch.arange(50_000) % 10  # 5,000 per class, like CIFAR-10's training set


def test_label_fractions_are_exact_balanced_nested_and_reproducible():
    labels = cifar_like_labels()
    one, val = split_labeled(labels, 5000, 0.01, seed=0)
    ten, val10 = split_labeled(labels, 5000, 0.1, seed=0)
    full, _ = split_labeled(labels, 5000, 1.0, seed=0)
    assert len(one) == 500 and torch.bincount(labels[one]).tolist() == [50] * 10
    assert len(ten) == 5000 and torch.bincount(labels[ten]).tolist() == [500] * 10
    assert len(full) == 45_000 and torch.equal(val, val10)
    assert set(one.tolist()) <= set(ten.tolist()) <= set(full.tolist())  # nested
    assert not set(ten.tolist()) & set(val.tolist())  # never from the validation split
    assert torch.equal(split_labeled(labels, 5000, 0.01, seed=0)[0], one)  # identical across calls
    other = split_labeled(labels, 5000, 0.01, seed=1)[0]
    assert len(other) == 500 and not torch.equal(other, one)  # the seed picks the subset


def test_selection_within_the_labeled_fraction_uses_no_label_beyond_it():
    labels = cifar_like_labels()
    train, val = split_labeled(labels, 5000, 0.01, seed=0, val_share=0.2)
    assert len(train) == 400 and len(val) == 100  # 500 labels in all: 40 + 10 per class
    assert torch.bincount(labels[train]).tolist() == [40] * 10 and torch.bincount(labels[val]).tolist() == [10] * 10
    everything, _ = split_labeled(labels, 0, 0.01, seed=0)
    assert set(train.tolist()) | set(val.tolist()) == set(everything.tolist())  # exactly the 1% fraction
    assert not set(train.tolist()) & set(val.tolist())
    with pytest.raises(UserError, match="fewer than 2 images of some class"):
        split_labeled(labels, 0, 0.0002, seed=0, val_share=0.2)  # 10 labels: one per class


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.5])
def test_label_fraction_outside_unit_interval_is_a_user_error(fraction):
    with pytest.raises(UserError, match="outside"):
        split_labeled(cifar_like_labels(), 5000, fraction)


def test_balanced_subsets_see_every_class_of_a_split_listed_class_by_class():
    """An image folder's split lists its images class by class: the first 1,000 of 5,000 validation images are two
    classes. The embedding map's images (and an export's check images) are a seeded, class-balanced subset."""
    from data import balanced_subset
    from training.pretraining import embedding_images

    labels = torch.arange(10).repeat_interleave(500)  # [5000], sorted by class
    shown = embedding_images(labels, seed=3)
    assert torch.bincount(labels[shown], minlength=10).tolist() == [100] * 10
    assert torch.equal(shown, embedding_images(labels, seed=3)) and not torch.equal(shown, embedding_images(labels, 4))
    assert torch.bincount(labels[:1000], minlength=10).tolist()[:3] == [500, 500, 0]  # what index order gave
    short = torch.cat([torch.zeros(3, dtype=torch.int64), torch.ones(50, dtype=torch.int64)])
    assert torch.bincount(short[balanced_subset(short, 20)]).tolist() == [3, 10]  # a short class gives all it has
    assert balanced_subset(short, 100).tolist() == list(range(53))
