"""Process-group setup for torchrun: NCCL on GPUs, gloo on CPUs; a single process needs none of it."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from elbox.errors import UserError


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name!r} was asked for but no CUDA GPU is available; use device='cpu' or 'auto'")
        return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"device={name!r} is not known; use cpu, cuda, cuda:N or auto")


def setup(device: str) -> DistInfo:
    """Join the process group torchrun describes (WORLD_SIZE > 1), or run as one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_true(flag: bool, info: DistInfo) -> bool:
    """Whether flag holds on every rank (so that every rank takes the same branch)."""
    if not info.enabled:
        return flag
    t = torch.tensor([0 if flag else 1], device=info.device if info.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return int(t.item()) == 0
