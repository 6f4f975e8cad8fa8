"""Atomic file writes: a reader (or a process killed mid-write) sees the old file or the complete new one."""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch


def atomic_write(path: Union[str, Path], data: Union[bytes, memoryview]) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename it over ``path``.

    The file gets the permissions ``open()`` would give it (0666 minus the umask: teammates can read it if the umask
    says so). On any failure (a full disk is an OSError) the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            tmp.write(data)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.chmod(tmp.name, 0o666 & ~_umask())  # NamedTemporaryFile creates 0600
        os.replace(tmp.name, path)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def remove_stale_temporaries(directory: Union[str, Path]) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves when killed mid-write (``.<name>.*.tmp``) in
    ``directory`` and its subdirectories; call it only while holding the directory (its run lock): then no writer is
    using them. Returns what was removed."""
    removed = []
    for tmp in Path(directory).rglob(".*.tmp") if Path(directory).is_dir() else []:
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; put it straight back
    os.umask(mask)
    return mask


def atomic_save(obj: Any, path: Union[str, Path]) -> None:
    """``torch.save`` atomically. Serialized in memory first: a full disk is then an OSError (ENOSPC), where
    torch.save into the file fails with an opaque RuntimeError."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getbuffer())


def write_text_atomic(path: Union[str, Path], text: str) -> None:
    atomic_write(path, text.encode("utf-8"))


def write_json(path: Union[str, Path], obj: Any) -> None:
    """JSON, indented and key-sorted, written atomically."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
