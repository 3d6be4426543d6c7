"""A data loader for data sets held in memory: index a uint8 tensor, never touch an image in Python.

Each epoch's order is a pure function of (seed, epoch), and each flip of (seed, epoch, batch, rank), so a run
that stops after any batch and is resumed from ``state_dict()`` sees exactly the batches it would have seen.
With several processes each rank takes a disjoint, equal-size shard of the epoch's permutation, as
``torch.utils.data.DistributedSampler`` does (padded by wrapping around when drop_last=False, cut otherwise).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from elbox.data.dataset import derive_seed
from elbox.data.transforms import hflip_
from elbox.errors import UserError


class InMemoryLoader:
    """Batches of ``data`` (on ``device``): ``for batch in loader`` runs the rest of the current epoch.

    Yields ``x`` or, when ``labels`` is given, ``(x, y)``. The whole data set is moved to ``device`` once (small
    data sets fit on a GPU many times over), so a batch is one ``index_select`` there.
    """

    def __init__(
        self,
        data: Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        hflip: bool = False,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        labels: Tensor | None = None,
    ) -> None:
        n = len(data)
        if batch_size < 1:
            raise UserError(f"batch size must be at least 1, got {batch_size}")
        if not (world_size >= 1 and 0 <= rank < world_size):
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if n < world_size:
            raise UserError(f"the data set has {n} examples, fewer than the {world_size} processes; use fewer processes")
        if hflip and data.dim() != 4:
            raise UserError(f"horizontal flips apply to images (N, C, H, W), not to data of shape {tuple(data.shape)}")
        if labels is not None and len(labels) != n:
            raise ValueError(f"{len(labels)} labels for {n} examples")
        self.device = torch.device(device)
        self.data = data.to(self.device)
        self.labels = labels.to(self.device) if labels is not None else None
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last, self.hflip = shuffle, drop_last, hflip
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.num_examples = n
        # examples per rank: equal on every rank (cut the tail, or pad by wrapping around)
        self.per_rank = n // world_size if drop_last else math.ceil(n / world_size)
        self.num_batches = self.per_rank // batch_size if drop_last else math.ceil(self.per_rank / batch_size)
        if self.num_batches == 0:
            raise UserError(
                f"batch size {batch_size} is larger than the {self.per_rank} examples each process gets per epoch; "
                f"use a batch size of at most {self.per_rank}"
            )
        self.epoch = 0
        self.position = 0  # index of the next batch within self.epoch

    def __len__(self) -> int:
        """Batches per epoch (on this rank)."""
        return self.num_batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.position = int(epoch), 0

    # ----------------------------------------------------------------------------------------------- order and flips

    def epoch_indices(self, epoch: int) -> Tensor:
        """This rank's example indices for an epoch, in order (CPU int64); a pure function of (seed, epoch, rank)."""
        n, total = self.num_examples, self.per_rank * self.world_size
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        if total > n:  # pad by wrapping around, so every rank gets as many examples
            order = order.repeat(math.ceil(total / n))
        return order[:total][self.rank :: self.world_size]

    def flip_index(self, epoch: int, batch: int, size: int) -> Tensor:
        """Which images of a batch are flipped (CPU int64); a pure function of (seed, epoch, batch, rank)."""
        g = torch.Generator().manual_seed(derive_seed("hflip", self.seed, epoch, batch, self.rank))
        return (torch.rand(size, generator=g) < 0.5).nonzero().squeeze(1)

    # ------------------------------------------------------------------------------------------------------ iterate

    def __iter__(self) -> Iterator[Any]:
        if self.position >= self.num_batches:  # a state saved after an epoch's last batch
            self.epoch, self.position = self.epoch + 1, 0
        epoch = self.epoch
        index = self._to_device(self.epoch_indices(epoch))
        bs = self.batch_size
        for b in range(self.position, self.num_batches):
            i = index[b * bs : (b + 1) * bs]
            x = self.data.index_select(0, i)
            if self.hflip:
                hflip_(x, self._to_device(self.flip_index(epoch, b, len(i))))  # x is a fresh copy
            self.position = b + 1  # a checkpoint taken while this batch is used resumes at the next one
            yield x if self.labels is None else (x, self.labels.index_select(0, i))
        self.epoch, self.position = epoch + 1, 0

    def _to_device(self, index: Tensor) -> Tensor:
        """A CPU index on the loader's device. To a GPU through pinned memory, without waiting: a plain copy from
        the host waits for everything queued on the device, and the trainer queues a step ahead."""
        if self.device.type == "cuda":
            return index.contiguous().pin_memory().to(self.device, non_blocking=True)  # (a rank's share is strided)
        return index.to(self.device)

    def forever(self) -> Iterator[Any]:
        """Batches across epochs, without end (resumable like ``iter(self)``)."""
        while True:
            yield from self

    # ------------------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "num_examples": self.num_examples,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume exactly at the batch after the one in use when ``state`` was taken (the seed is restored too)."""
        for key in ("batch_size", "world_size", "num_examples"):
            if key in state and int(state[key]) != getattr(self, key):
                raise UserError(
                    f"cannot resume the data order exactly: the checkpoint's loader had {key}={state[key]}, "
                    f"this run has {getattr(self, key)}; use the same {key.replace('_', ' ')} to resume"
                )
        self.seed = int(state.get("seed", self.seed))
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
