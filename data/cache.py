"""Cache of decoded datasets: one .pt file per source identity, written atomically."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from typing import Callable, Dict

import torch

from core.files import atomic_save

CACHE_FORMAT = 1  # bump when the decoded layout changes, so old caches are ignored


def source_fingerprint(path: Path) -> str:
    """A short hash naming a source's content: file bytes for an archive, (name, size, mtime) for a directory."""
    h = hashlib.sha256(f"v{CACHE_FORMAT}".encode())
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    else:
        for file in sorted(path.rglob("*")):
            if file.is_file():
                stat = file.stat()
                h.update(f"{file.relative_to(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached(cache_dir: Path, key: str, build: Callable[[], Dict[str, object]]) -> Dict[str, object]:
    """Return ``build()``'s result, stored under ``cache_dir/key.pt`` after the first call.

    The file is written to a temporary name and renamed into place, so a killed process never leaves a
    half-written cache; an unreadable cache file is rebuilt.
    """
    file = cache_dir / f"{key}.pt"
    if file.is_file():
        try:
            return torch.load(file, map_location="cpu", weights_only=True)
        except Exception as err:  # any unreadable cache is rebuilt, never trusted
            print(f"data: ignoring unreadable cache {file} ({type(err).__name__}); decoding again", file=sys.stderr)
    value = build()
    try:
        atomic_save(value, file)
    except OSError as err:  # a read-only cache directory costs a re-decode next time, nothing else
        print(f"data: could not write cache {file} ({err})", file=sys.stderr)
    return value
