"""Everything torch.distributed, in one place. Other modules ask this one; none imports torch.distributed.

Without a torchrun environment (WORLD_SIZE unset or 1) every function is the single-process identity.
"""
from __future__ import annotations

import os
import sys
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from core.errors import UserError


def init_from_env(device: torch.device, backend: str = "auto") -> torch.device:
    """Join the process group that torchrun describes (WORLD_SIZE > 1) and return this process's device.

    backend: auto (NCCL on CUDA, gloo on CPU) | nccl | gloo. On CUDA each process takes cuda:LOCAL_RANK. A plain
    `python` launch (no WORLD_SIZE, or 1) stays a single process and nothing is initialized.
    """
    if backend == "nccl" and device.type != "cuda":
        raise UserError("run.backend=nccl needs CUDA GPUs and device=cuda (or auto on a GPU machine); "
                        "use run.backend=gloo or auto on CPUs")
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} GPU(s) on this node; "
                            "use --nproc-per-node <= the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    chosen = backend if backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
    if shared_store_restarts_can_hang(os.environ) and os.environ.get("RANK") == "0":
        print("warning: torchrun shares its rendezvous store between nodes, so a restart after a failure can hang "
              "(on the other nodes it is a membership change that keeps the old attempt's keys); launch with "
              "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, as scripts/slurm.sbatch does", file=sys.stderr, flush=True)
    dist.init_process_group(backend=chosen, store=_attempt_store(), rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]), device_id=device if chosen == "nccl" else None)
    return device


def shared_store_restarts_can_hang(env: dict) -> bool:
    """True for a multi-node torchrun with restarts whose agents share one store (torch's default since 2.4).

    A worker's failure is a restart attempt on its own node (TORCHELASTIC_RESTART_COUNT + 1) but a membership change
    on the others, which restart their workers with the same count (torch 2.14, elastic/agent/server/api.py). Their
    new workers then read the previous attempt's keys: the addresses of dead peers, and the job hangs. With
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 every rendezvous round gets a fresh store on a fresh port instead.
    """
    return (env.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(env.get("GROUP_WORLD_SIZE", "1")) > 1
            and int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0)


def _attempt_store() -> Optional[dist.Store]:
    """A key space of torchrun's agent store for this restart attempt; None outside torchrun (env:// as usual).

    torchrun's agent keeps one store at the same MASTER_PORT across ``--max-restarts`` attempts and torch's env://
    set-up reuses its keys, so a restarted group reads the dead workers' addresses and cannot connect (seen with
    gloo on torch 2.14). A prefix per attempt gives each restart a clean rendezvous on one node; across nodes the
    attempt count can disagree (see shared_store_restarts_can_hang), hence the unshared store there.
    """
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or attempt is None:
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"simclr/attempt_{attempt}", agent_store)


def check_global_batch(batch_size: int) -> None:
    """train.batch_size is the global batch: every rank takes an equal share of it."""
    if batch_size % world_size():
        raise UserError(f"train.batch_size={batch_size} (global) does not divide by the world size {world_size()}")


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_initialized():
        dist.barrier()


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model`` under torchrun (gradients averaged over ranks); the model itself in
    a single process. Checkpoints keep using the unwrapped module."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def shutdown() -> None:
    """Leave the process group (clean exit under torchrun)."""
    if is_initialized():
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on the process that owns side effects (logs, files, W&B)."""
    return rank() == 0


def all_gather_cat(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x [n, ...] along dim 0 in rank order -> [world * n, ...] (no autograd)."""
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum x over ranks, in place; returns x."""
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s picklable ``obj`` on every rank (the identity in a single process)."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of x over ranks, as a new tensor (x is left as is)."""
    return all_reduce_sum(x.clone()) / world_size()
