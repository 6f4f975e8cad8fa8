"""Image sources, each returned as uint8 tensors [N, 3, H, W] with int64 labels (and unlabeled images, when asked).

- ``cifar10``, ``cifar100``: the python version torchvision downloads (``root`` holds ``cifar-10-batches-py`` or
  ``cifar-100-python``; downloaded when allowed), read without unpickling code (``data/formats.py``); CIFAR-100's
  100 fine labels.
- ``stl10``: the binary version (``root/stl10_binary``): 5,000 labeled train, 8,000 test and 100,000 unlabeled
  images of 96x96.
- ``folder``: an image-folder directory or a .tar/.tar.gz/.tar.xz archive of one, laid out as
  ``train/<class>/*`` and ``test/<class>/*`` with classes in sorted order, and optionally ``unlabeled/`` (any
  nesting); decoded once, then cached.
- ``synthetic``: generated images with learnable class structure, for tests and smoke runs.

``image_size`` > 0 makes every image that size (square): folder images are resized once at decode time (the
shorter side to the size, then a centre crop), other sources' tensors are resized on load.
"""
from __future__ import annotations

import io
import lzma
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from core.errors import UserError
from data.cache import cached, source_fingerprint
from data.formats import CIFAR_DIRS, STL10_DIR, read_cifar, read_stl10

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz")
LOCAL_COPY_HINT = (
    "point data.root at a local copy: a directory holding cifar-10-batches-py (data.name=cifar10), "
    "cifar-100-python (cifar100) or stl10_binary (stl10), or an image-folder directory / .tar.xz archive "
    "(data.name=folder data.root=PATH)"
)
SOURCES = ("cifar10", "cifar100", "stl10", "folder", "synthetic")


@dataclass
class ImageDataset:
    """Labeled train and test images, uint8 [N, 3, H, W] and int64 [N], on the CPU."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    unlabeled_images: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 3, 1, 1, dtype=torch.uint8))

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])


def load_source(name: str, root: str, *, download: bool = False, cache_dir: str = "", image_size: int = 0,
                unlabeled: bool = False) -> ImageDataset:
    """Load a whole dataset by source name (see module docstring): labeled train and test, and with ``unlabeled``
    its unlabeled images (STL-10's, a folder's unlabeled/); every image ``image_size`` pixels square when > 0."""
    if name in ("cifar10", "cifar100", "stl10"):
        path = Path(root).expanduser()
        folder = path / (CIFAR_DIRS.get(name) or STL10_DIR)
        if not folder.is_dir():
            _download(name, path, download)
        if name == "stl10":
            dataset = ImageDataset(**read_stl10(path, unlabeled))
        else:
            dataset = ImageDataset(*read_cifar(path, name))
    elif name == "folder":
        path = Path(root).expanduser()
        if not path.exists():
            raise UserError(f"data.root {root!r} does not exist; {LOCAL_COPY_HINT}")
        key = f"folder-{source_fingerprint(path)}" + (f"-s{image_size}" if image_size else "") + \
            ("-u" if unlabeled else "")
        dataset = ImageDataset(**cached(Path(cache_dir).expanduser(), key,
                                        lambda: _decode_folder(path, image_size, unlabeled).__dict__))
    elif name == "synthetic":
        dataset = make_synthetic(size=image_size or 32)
    else:
        raise UserError(f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)}")
    if unlabeled and not len(dataset.unlabeled_images):
        where = "images under unlabeled/ (beside train/ and test/)" if name == "folder" else "unlabeled images"
        raise UserError(f"data.unlabeled=true, but data.name={name} {root!r} has no {where}")
    return resized(dataset, image_size) if image_size and image_size != dataset.image_size else dataset


def _download(name: str, root: Path, allowed: bool) -> None:
    """Fetch a dataset's official archive into ``root`` with torchvision's downloader (checked by its MD5)."""
    label = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "stl10": "STL-10"}[name]
    if not allowed:
        raise UserError(f"no {label} under {str(root)!r} and data.download=false; {LOCAL_COPY_HINT}")
    from torchvision import datasets  # imported here: torchvision's import is slow and other sources skip it
    from torchvision.datasets.utils import download_and_extract_archive

    spec = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100, "stl10": datasets.STL10}[name]
    try:
        download_and_extract_archive(spec.url, str(root), filename=spec.filename, md5=spec.tgz_md5)
    except (OSError, RuntimeError) as err:  # URLError is an OSError; a bad checksum a RuntimeError
        raise UserError(f"could not download {label} into {str(root)!r} ({err}); {LOCAL_COPY_HINT}") from None


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 images [N, 3, H, W] -> uint8 [N, 3, size, size] (antialiased bilinear, rounded back to uint8)."""
    if not len(images):
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    out = [torch.nn.functional.interpolate(images[i:i + 1024].float(), size=(size, size), mode="bilinear",
                                           antialias=True, align_corners=False)
           for i in range(0, len(images), 1024)]
    return torch.cat(out).round_().clamp_(0, 255).to(torch.uint8)


def resized(dataset: ImageDataset, size: int) -> ImageDataset:
    """Every split's images resized to size x size (``resize_images``)."""
    return ImageDataset(resize_images(dataset.train_images, size), dataset.train_labels,
                        resize_images(dataset.test_images, size), dataset.test_labels, dataset.classes,
                        resize_images(dataset.unlabeled_images, size))


def _decode_folder(path: Path, image_size: int = 0, unlabeled: bool = False) -> ImageDataset:
    """Decode every image under train/ and test/ (and unlabeled/, when asked) of a directory or archive."""
    files: dict[str, dict[str, list[Tuple[str, bytes]]]] = {"train": {}, "test": {}, "unlabeled": {}}
    for rel, payload in _iter_image_files(path):
        parts = Path(rel).parts
        # Accept an optional top-level folder: [prefix/]split/class/file, [prefix/]unlabeled/any/depth/file
        for i in range(len(parts) - 1):
            if parts[i] == "unlabeled" and (i == 0 or parts[i - 1] not in ("train", "test")):
                if unlabeled:
                    files["unlabeled"].setdefault("", []).append((rel, payload))
                break
            if parts[i] in ("train", "test") and len(parts) - i == 3:
                files[parts[i]].setdefault(parts[i + 1], []).append((rel, payload))
                break
    if not files["train"]:
        raise UserError(f"{str(path)!r} holds no images under train/<class>/ "
                        "(expected train/<class>/* and test/<class>/*)")
    classes = sorted(files["train"])
    if files["test"] and sorted(files["test"]) != classes:
        raise UserError(f"{str(path)!r}: test classes {sorted(files['test'])} differ from train classes {classes}")
    shape: list = []  # the first image's shape: every split must match it (unless image_size resizes them)
    arrays = {split: _decode_split(files[split], classes if split != "unlabeled" else [""], image_size, shape)
              for split in ("train", "test", "unlabeled")}
    return ImageDataset(*arrays["train"], *arrays["test"], classes, arrays["unlabeled"][0])


def _decode_split(by_class: dict[str, list[Tuple[str, bytes]]], classes: list[str], image_size: int = 0,
                  shape: Optional[list] = None) -> Tuple[torch.Tensor, ...]:
    """uint8 images [N, 3, H, W] and labels of one split; all of one size (``shape`` holds the first one seen, as
    (file, height, width)), or resized to ``image_size`` square when it is given."""
    images, labels = [], []
    shape = [] if shape is None else shape
    for label, cls in enumerate(classes):
        for rel, payload in sorted(by_class.get(cls, [])):
            try:
                with Image.open(io.BytesIO(payload)) as img:
                    rgb = img.convert("RGB")
                    if image_size:
                        rgb = ImageOps.fit(rgb, (image_size, image_size), Image.Resampling.BICUBIC)
                    array = np.asarray(rgb)
            except (UnidentifiedImageError, OSError, SyntaxError) as err:
                raise UserError(f"cannot decode image {rel!r}: {err}") from None
            if not shape:
                shape.append((rel, *array.shape[:2]))
                if array.shape[0] != array.shape[1]:
                    raise UserError(f"image {rel!r} is {array.shape[1]}x{array.shape[0]}, not square; give "
                                    "data.image_size=S to resize every image to S x S")
            elif array.shape[:2] != shape[0][1:]:
                first, h, w = shape[0]
                raise UserError(f"images differ in size: {rel!r} is {array.shape[1]}x{array.shape[0]}, {first!r} is "
                                f"{w}x{h}; give data.image_size=S to resize every image to S x S at decode time")
            images.append(array)
            labels.append(label)
    if not images:
        size = image_size or (shape[0][1] if shape else 1)
        return torch.zeros(0, 3, size, size, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64)
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
