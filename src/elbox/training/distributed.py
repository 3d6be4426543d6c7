"""Process-group setup for torchrun (NCCL on GPUs, gloo on CPUs) and the few collectives the trainer needs.

A single process needs none of it: every helper here is then a plain local operation, so the loop reads the same
with one process or many. Under torchrun (``WORLD_SIZE`` > 1) rank 0 is the only one that touches the run folder;
what it decides (an error, a loaded checkpoint) is sent to the others, so every rank takes the same branch.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from elbox.devices import resolve_device
from elbox.errors import UserError

T = TypeVar("T")


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


def wait_for_all(info: DistInfo) -> None:
    """A barrier: every rank waits until all have arrived. At the end of a run, rank 0 still writes samples and the
    held-out bound while the others are done; a rank that tore its process group down meanwhile could abort in
    gloo's threads ("terminate called without an active exception"), so the ranks leave together."""
    if info.enabled:
        dist.barrier()


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def any_rank(flags: list[bool], info: DistInfo) -> list[bool]:
    """For each flag, whether it is set on any rank: one small all-reduce, so that every rank branches alike."""
    if not info.enabled:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=_collective_device(info))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def any_rank_on_device(flags: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """``any_rank`` for float 0/1 flags that stay on the device: the all-reduce is queued, nothing is read back."""
    if info.enabled:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags


def mean_over_ranks(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Average logged numbers over ranks (every rank has the same keys), so the log describes the global batch."""
    if not info.enabled or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=_collective_device(info))
    dist.all_reduce(t)
    return dict(zip(keys, (t / info.world_size).tolist()))


def gather(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's ``obj``, in rank order (a list of one without torchrun)."""
    if not info.enabled:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def from_main(fn: Callable[[], T], info: DistInfo, *, share: bool = True) -> T | None:
    """Run ``fn`` on rank 0 only and hand its UserError, and with ``share`` its result, to every rank.

    Rank 0 alone reads and writes the run folder, so other nodes need no shared file system, and an error there
    stops every rank with the same message instead of leaving them waiting in the next collective.
    """
    result: Any = None
    error: str | None = None
    if info.is_main:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    if info.enabled:
        box = [result if share else None, error]
        dist.broadcast_object_list(box, src=0)
        result = box[0] if share or not info.is_main else result
        error = box[1]
    if error is not None:
        raise UserError(error)
    return result


def _collective_device(info: DistInfo) -> torch.device:
    return info.device if info.device.type == "cuda" else torch.device("cpu")
