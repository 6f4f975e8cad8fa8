"""Atomic checkpoint files and strict state loading."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from engine.cli import UserError


def atomic_save(obj: Any, file: Path) -> None:
    """``torch.save`` to a temporary file in the same directory, fsync, then rename over ``file``.

    Readers see either the old file or the complete new one, even if this process is killed mid-write.
    """
    file = Path(file)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.NamedTemporaryFile(dir=file.parent, prefix=f".{file.name}.", suffix=".tmp", delete=False)
    try:
        with tmp:
            torch.save(obj, tmp)
            tmp.flush()
            os.fsync(tmp.fileno())
        os.replace(tmp.name, file)
    except BaseException:
        Path(tmp.name).unlink(missing_ok=True)
        raise


def load_file(path: Path, what: str = "checkpoint") -> dict:
    """Read a file written by :func:`atomic_save`; unreadable or foreign files are a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # pickle, zip and torch errors all mean "not a checkpoint"
        raise UserError(f"{str(path)!r} is not a readable {what}: {type(err).__name__}: {err}") from None
    if not isinstance(state, dict):
        raise UserError(f"{str(path)!r} is not a {what} (holds {type(state).__name__})")
    return state


def load_strict(module: nn.Module, state_dict: dict, what: str = "checkpoint") -> None:
    """load_state_dict(strict=True) whose failure names the missing and unexpected keys in one line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or mismatched:
        problems = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch in", mismatched))
        parts = [f"{label} {_few(keys)}" for label, keys in problems if keys]
        raise UserError(f"{what} does not fit the model: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... ({len(keys)} in all)' if len(keys) > limit else ''}]"
