"""Image sources, each returned as uint8 tensors [N, 3, H, W] with int64 labels.

- ``cifar10``: torchvision's CIFAR10 (``root`` holds ``cifar-10-batches-py``; downloaded when allowed).
- ``folder``: an image-folder directory or a .tar/.tar.gz/.tar.xz archive of one, laid out as
  ``train/<class>/*`` and ``test/<class>/*`` with classes in sorted order; decoded once, then cached.
- ``synthetic``: generated images with learnable class structure, for tests and smoke runs.
"""
from __future__ import annotations

import io
import lzma
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Tuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.cache import cached, source_fingerprint
from core.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz")
LOCAL_COPY_HINT = (
    "point data.root at a local copy: a directory holding cifar-10-batches-py (data.name=cifar10), "
    "or an image-folder directory / .tar.xz archive (data.name=folder data.root=PATH)"
)


@dataclass
class ImageDataset:
    """Labeled train and test images, uint8 [N, 3, H, W] and int64 [N], on the CPU."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]


def load_source(name: str, root: str, *, download: bool = False, cache_dir: str = "") -> ImageDataset:
    """Load a whole labeled dataset by source name (see module docstring)."""
    if name == "cifar10":
        return _load_cifar10(Path(root).expanduser(), download)
    if name == "folder":
        path = Path(root).expanduser()
        key = f"folder-{source_fingerprint(path)}" if path.exists() else ""
        if not key:
            raise UserError(f"data.root {root!r} does not exist; {LOCAL_COPY_HINT}")
        return ImageDataset(**cached(Path(cache_dir).expanduser(), key, lambda: _decode_folder(path).__dict__))
    if name == "synthetic":
        return make_synthetic()
    raise UserError(f"unknown dataset {name!r}; choose cifar10, folder or synthetic")


def _load_cifar10(root: Path, download: bool) -> ImageDataset:
    from torchvision.datasets import CIFAR10  # imported here: torchvision's import is slow and other sources skip it

    if not (root / "cifar-10-batches-py").is_dir() and not download:
        raise UserError(f"no CIFAR-10 under {str(root)!r} and data.download=false; {LOCAL_COPY_HINT}")
    try:
        splits = [CIFAR10(str(root), train=train, download=download) for train in (True, False)]
    except (OSError, RuntimeError) as err:  # URLError is an OSError; torchvision raises RuntimeError on bad files
        raise UserError(f"could not load CIFAR-10 from {str(root)!r} ({err}); {LOCAL_COPY_HINT}") from None

    def to_tensors(ds) -> Tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))  # NHWC -> NCHW
        return images, torch.tensor(ds.targets, dtype=torch.int64)

    (tr_x, tr_y), (te_x, te_y) = map(to_tensors, splits)
    return ImageDataset(tr_x, tr_y, te_x, te_y, list(splits[0].classes))


def _decode_folder(path: Path) -> ImageDataset:
    """Decode every image under train/ and test/ of a directory or archive into uint8 tensors."""
    files: dict[str, dict[str, list[Tuple[str, bytes]]]] = {"train": {}, "test": {}}
    for rel, payload in _iter_image_files(path):
        parts = Path(rel).parts
        # Accept an optional top-level folder: [prefix/]split/class/file
        for i in range(len(parts) - 2):
            if parts[i] in files and len(parts) - i == 3:
                files[parts[i]].setdefault(parts[i + 1], []).append((rel, payload))
                break
    if not files["train"]:
        raise UserError(f"{str(path)!r} holds no images under train/<class>/ "
                        "(expected train/<class>/* and test/<class>/*)")
    classes = sorted(files["train"])
    if files["test"] and sorted(files["test"]) != classes:
        raise UserError(f"{str(path)!r}: test classes {sorted(files['test'])} differ from train classes {classes}")
    arrays = {split: _decode_split(files[split], classes) for split in ("train", "test")}
    return ImageDataset(*arrays["train"], *arrays["test"], classes)


def _decode_split(by_class: dict[str, list[Tuple[str, bytes]]], classes: list[str]) -> Tuple[torch.Tensor, ...]:
    images, labels, shape = [], [], None
    for label, cls in enumerate(classes):
        for rel, payload in sorted(by_class.get(cls, [])):
            try:
                with Image.open(io.BytesIO(payload)) as img:
                    array = np.asarray(img.convert("RGB"))
            except (UnidentifiedImageError, OSError, SyntaxError) as err:
                raise UserError(f"cannot decode image {rel!r}: {err}") from None
            if shape is None:
                shape = array.shape
            elif array.shape != shape:
                raise UserError(f"image {rel!r} is {array.shape[1]}x{array.shape[0]}, others are {shape[1]}x{shape[0]}")
            images.append(array)
            labels.append(label)
    if not images:
        return torch.zeros(0, 3, 1, 1, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
    stacked = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return stacked, torch.tensor(labels, dtype=torch.int64)


def _iter_image_files(path: Path) -> Iterator[Tuple[str, bytes]]:
    """(relative path, file bytes) of every image file in a directory or tar archive."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                yield str(file.relative_to(path)), file.read_bytes()
        return
    if not str(path).lower().endswith(ARCHIVE_SUFFIXES):
        raise UserError(f"data.root {str(path)!r} is neither a directory nor a .tar/.tar.gz/.tar.xz archive")
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield member.name, archive.extractfile(member).read()
    except (tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError) as err:
        raise UserError(f"cannot read archive {str(path)!r} (corrupt or truncated?): {err}") from None


SYNTHETIC_TRAIN_PER_CLASS = 500
SYNTHETIC_TEST_PER_CLASS = 100


def make_synthetic(num_classes: int = 10, size: int = 32, seed: int = 1234) -> ImageDataset:
    """Images whose class is a smooth colour pattern, varied per image by shift, contrast and noise.

    Small (5,000 train / 1,000 test) and quick to make; fixed seed, so the same dataset in every run.
    """
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, 4, 4, generator=g)
    templates = torch.nn.functional.interpolate(templates, size=(size, size), mode="bicubic", align_corners=False)

    def draw(per_class: int) -> Tuple[torch.Tensor, torch.Tensor]:
        labels = torch.arange(num_classes).repeat_interleave(per_class)
        n = labels.numel()
        images = templates[labels]
        shifts = torch.randint(-6, 7, (n, 2), generator=g)
        rows = (torch.arange(size)[None, :] - shifts[:, :1]) % size  # [n, size]
        cols = (torch.arange(size)[None, :] - shifts[:, 1:]) % size
        images = images[torch.arange(n)[:, None, None, None], torch.arange(3)[None, :, None, None],
                        rows[:, None, :, None], cols[:, None, None, :]]
        contrast = 0.6 + 0.8 * torch.rand(n, 1, 1, 1, generator=g)
        images = (images - 0.5) * contrast + 0.5 + 0.12 * torch.randn(images.shape, generator=g)
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    train, test = draw(SYNTHETIC_TRAIN_PER_CLASS), draw(SYNTHETIC_TEST_PER_CLASS)
    return ImageDataset(*train, *test, [f"class{i}" for i in range(num_classes)])
