"""Readers of the official on-disk formats: CIFAR-10 / CIFAR-100 (python pickles, as torchvision downloads them) and
STL-10 (binary arrays). Loading never runs code from the files: the pickles go through an unpickler that builds
NumPy arrays of numbers or bytes, lists, dicts, numbers and strings, refuses every other global a file may name, and
takes no more memory for an array than the file holds for it.

Layouts (``root`` is data.root):
    root/cifar-10-batches-py/  data_batch_1..5, test_batch (b"data" uint8 [N, 3072], b"labels"), batches.meta
    root/cifar-100-python/     train, test (b"data", b"fine_labels"), meta (b"fine_label_names")
    root/stl10_binary/         {train,test,unlabeled}_X.bin (uint8, 3 x 96 x 96 per image, column-major),
                               {train,test}_y.bin (uint8, labels 1..10), class_names.txt
"""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Tuple

import numpy as np
import torch

from core.errors import UserError

CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
STL10_DIR = "stl10_binary"


MAX_ARRAY_BYTES = 1 << 30  # the largest array a data pickle may hold (CIFAR-100's train: 154 MB)


class _NdarrayType:
    """What a pickle gets for ``numpy.ndarray``: accepted as _reconstruct's subtype, but not callable, so that a file
    cannot allocate an array of a shape it chooses by calling the class itself."""


def _reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
    """numpy's pickle hook for an empty array whose contents BUILD sets; only the (0,)-shaped one numpy writes."""
    if subtype is not _NdarrayType or tuple(shape) != (0,):
        raise pickle.UnpicklingError(f"an array built as {shape!r} of {subtype!r}")
    return np.ndarray((0,), dtype=np.dtype(dtype))


def _dtype(*args: Any) -> np.dtype:
    dtype = np.dtype(*args)
    if dtype.hasobject:
        raise pickle.UnpicklingError("an array of Python objects (dtype object)")
    return dtype


def _scalar(dtype: Any, data: Any = None) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a NumPy scalar of Python objects")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _check_array_state(state: Any) -> None:
    """An ndarray's __setstate__ argument, (version, shape, dtype, is_fortran, raw bytes), allowed only for numeric or
    byte dtypes and raw data of exactly the array's size, at most MAX_ARRAY_BYTES: the array then takes no more
    memory than the file holds."""
    if not (isinstance(state, tuple) and len(state) == 5 and isinstance(state[2], np.dtype)):
        raise pickle.UnpicklingError("an array with an unusual state")
    _, shape, dtype, _, raw = state
    if dtype.hasobject or not isinstance(raw, bytes):
        raise pickle.UnpicklingError("an array of Python objects (dtype object)")
    if not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"an array of shape {shape!r}")
    size = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size > MAX_ARRAY_BYTES or size != len(raw):
        raise pickle.UnpicklingError(f"an array of shape {list(shape)} and {dtype} ({size} bytes) from {len(raw)} "
                                     f"bytes of data (at most {MAX_ARRAY_BYTES} are read)")


class _ArraysOnly(pickle._Unpickler):  # the Python unpickler: its BUILD can be checked (a few opcodes per batch file)
    """An unpickler for data files: NumPy arrays of numbers or bytes (and the dtypes and scalars they are made of) and
    builtin containers, numbers and strings (``_codecs.encode``: how protocol-2 pickles written by Python 3 spell byte
    strings). Any other global is refused before it is looked up, so a crafted file's payload never runs, and an
    array's memory is bounded by its data in the file (no object arrays, no shapes the data does not fill)."""

    GLOBALS = {**{(module, name): hook for module in ("numpy.core.multiarray", "numpy._core.multiarray")
                  for name, hook in (("_reconstruct", _reconstruct), ("scalar", _scalar))},
               ("numpy", "ndarray"): _NdarrayType, ("numpy", "dtype"): _dtype, ("_codecs", "encode"): None}
    dispatch = dict(pickle._Unpickler.dispatch)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name}")
        return self.GLOBALS[(module, name)] or super().find_class(module, name)

    def load_build(self) -> None:
        state, target = self.stack[-1], self.stack[-2]
        if isinstance(target, np.ndarray):
            _check_array_state(state)
        elif not isinstance(target, np.dtype):
            raise pickle.UnpicklingError(f"the state of a {type(target).__name__}")
        super().load_build()
        if isinstance(target, np.dtype) and target.hasobject:
            raise pickle.UnpicklingError("an array of Python objects (dtype object)")

    dispatch[pickle.BUILD[0]] = load_build


def read_pickle(path: Path) -> dict:
    """A CIFAR pickle (written by Python 2: byte-string keys) as a dict, or a UserError naming what it asked for."""
    try:
        with open(path, "rb") as f:
            value = _ArraysOnly(f, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise UserError(f"{str(path)!r} holds more than arrays of numbers, lists, numbers and strings (it asks for "
                        f"{err}), so it was not loaded") from None
    except (OSError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError, MemoryError,
            OverflowError, RecursionError) as err:  # whatever a damaged stream makes the unpickler raise: one line
        raise UserError(f"cannot read {str(path)!r} ({type(err).__name__}: {err}); download it again") from None
    if not isinstance(value, dict):
        raise UserError(f"{str(path)!r} is not a CIFAR batch file (it holds a {type(value).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in value.items()}


def _cifar_batch(path: Path, label_key: str) -> Tuple[torch.Tensor, torch.Tensor]:
    batch = read_pickle(path)
    if "data" not in batch or label_key not in batch:
        raise UserError(f"{str(path)!r} lacks the 'data' or '{label_key}' entry of a CIFAR batch file")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{str(path)!r}: 'data' is {list(data.shape)}, not [N, 3072]")
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    try:
        labels = torch.as_tensor(np.asarray(batch[label_key], dtype=np.int64).reshape(-1))
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{str(path)!r}: '{label_key}' is not a list of integer labels") from None
    if len(labels) != len(images):
        raise UserError(f"{str(path)!r} holds {len(images)} images but {len(labels)} labels")
    return images, labels


def read_cifar(root: Path, name: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """(train images uint8 [N, 3, 32, 32], train labels, test images, test labels, class names) of CIFAR-10 or
    CIFAR-100 (its 100 fine labels) under ``root``."""
    folder = root / CIFAR_DIRS[name]
    if name == "cifar10":
        train = [_cifar_batch(folder / f"data_batch_{i}", "labels") for i in range(1, 6)]
        test = _cifar_batch(folder / "test_batch", "labels")
        classes = read_pickle(folder / "batches.meta").get("label_names")
    else:
        train = [_cifar_batch(folder / "train", "fine_labels")]
        test = _cifar_batch(folder / "test", "fine_labels")
        classes = read_pickle(folder / "meta").get("fine_label_names")
    if not isinstance(classes, list):
        raise UserError(f"{str(folder)!r}: its meta file names no classes")
    names = [c.decode() if isinstance(c, bytes) else str(c) for c in classes]
    for split, (_, labels) in (("training", (None, torch.cat([t[1] for t in train]))), ("test", test)):
        if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= len(names)):
            raise UserError(f"{str(folder)!r}: its {split} labels run from {int(labels.min())} to {int(labels.max())}"
                            f", outside 0..{len(names) - 1} for the {len(names)} classes its meta file names")
    return (torch.cat([t[0] for t in train]), torch.cat([t[1] for t in train]), *test, names)


def _stl_images(path: Path) -> torch.Tensor:
    if not path.is_file():
        raise UserError(f"{str(path)!r} is missing: an STL-10 copy holds stl10_binary/*_X.bin")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size % (3 * 96 * 96):
        raise UserError(f"{str(path)!r} is {raw.size} bytes, not a whole number of 3 x 96 x 96 images")
    # stored column-major: each channel is 96 columns of 96 pixels
    return torch.from_numpy(raw.reshape(-1, 3, 96, 96)).transpose(2, 3).contiguous()


def _stl_labels(path: Path, count: int) -> torch.Tensor:
    labels = torch.from_numpy(np.fromfile(path, dtype=np.uint8).astype(np.int64)) - 1  # 1..10 on disk
    if len(labels) != count or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
        raise UserError(f"{str(path)!r} holds {len(labels)} labels for {count} images, or labels outside 1..10")
    return labels


def read_stl10(root: Path, unlabeled: bool) -> dict:
    """STL-10's train (5,000 labeled), test (8,000) and, when asked, unlabeled (100,000) images, uint8 96x96."""
    folder = root / STL10_DIR
    train, test = _stl_images(folder / "train_X.bin"), _stl_images(folder / "test_X.bin")
    names_file = folder / "class_names.txt"
    classes = names_file.read_text().split() if names_file.is_file() else [f"class{i}" for i in range(10)]
    return {"train_images": train, "train_labels": _stl_labels(folder / "train_y.bin", len(train)),
            "test_images": test, "test_labels": _stl_labels(folder / "test_y.bin", len(test)), "classes": classes,
            "unlabeled_images": _stl_images(folder / "unlabeled_X.bin") if unlabeled
            else torch.zeros(0, 3, 96, 96, dtype=torch.uint8)}
