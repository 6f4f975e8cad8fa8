"""Device and numeric precision from config values."""
from __future__ import annotations

import contextlib

import torch

from core.errors import UserError


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda'/'cuda:N' must exist; anything else is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device={name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device={name!r} asked for CUDA, but no CUDA GPU is available here; use device=cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"device={name!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif device.type != "cpu":
        raise UserError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N")
    return device


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """'auto' -> bf16 on CUDA, fp32 on CPU (CPU bf16 autocast is slow and changes results). 'fp64' runs the whole
    model in double precision: slow, for exactness checks such as 1 process == N processes."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}[precision]


def check_fits(nbytes: int, device: torch.device, what: str, share: float = 0.5) -> None:
    """A UserError when ``nbytes`` of data would take more than ``share`` of the memory ``device`` has free (GPU: free
    device memory; CPU: available RAM), leaving the rest for the model and its activations."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration):
            return  # no way to tell here: let the allocation decide
    if nbytes > share * free:
        raise UserError(f"{what} needs {nbytes / 2 ** 30:.1f} GiB on {device}, more than {share:.0%} of the "
                        f"{free / 2 ** 30:.1f} GiB free there: use data.train_limit, a smaller data.image_size, "
                        "leave data.unlabeled off, or a device with more memory")


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass when dtype is below fp32; a no-op context otherwise."""
    if dtype in (torch.float32, torch.float64):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
