"""The ``Dataset`` every loader returns, where data and caches live, and the seeded train/test split.

A data set is held in memory: uint8 images (N, C, H, W) or float32 vectors (N, D), plus optional int64 labels.
Nothing here reads files; the modules beside this one do (``embedded``, ``toy2d``, ``idx``, ``cifar``, ``folder``).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from elbox.errors import UserError

Split = Literal["train", "test"]
SPLITS: tuple[str, ...] = ("train", "test")

#: Share of examples a seeded split puts in "test" (data sets without an official split: digits, folders).
TEST_FRACTION = 0.1


@dataclass
class Dataset:
    """One split of a data set, in memory.

    ``data`` is uint8 (N, C, H, W) for images and float32 (N, D) for vectors (toy2d); ``labels`` is int64 (N,) or
    None. ``description`` says where the data came from (it goes in logs and reports: a JPEG copy of CIFAR-10 must
    never be mistaken for the original). ``split_info`` records how the split was made, so a run can store it.
    """

    data: Tensor = field(repr=False)
    labels: Tensor | None = field(repr=False)
    name: str
    split: str
    kind: Literal["image", "vector"]
    description: str
    classes: tuple[str, ...] | None = None
    #: files that could not be read and were skipped (only with skip_bad=True)
    skipped: tuple[str, ...] = ()
    split_info: dict[str, Any] = field(default_factory=dict)
    _log_density: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        want = torch.uint8 if self.kind == "image" else torch.float32
        ndim = 4 if self.kind == "image" else 2
        if self.data.dtype != want or self.data.dim() != ndim:
            got = f"{self.data.dtype} {tuple(self.data.shape)}"
            raise TypeError(f"{self.kind} data must be {want} with {ndim} dims, got {got}")
        if self.labels is not None and (self.labels.dtype != torch.int64 or self.labels.shape != (len(self.data),)):
            raise TypeError(f"labels must be int64 ({len(self.data)},), got {self.labels.dtype} {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return len(self.data)

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of one example: (C, H, W) or (D,)."""
        return tuple(self.data.shape[1:])

    @property
    def has_density(self) -> bool:
        return self._log_density is not None

    def log_density(self, x: Tensor) -> Tensor:
        """Exact log p(x) of the distribution the data were drawn from, per point, in float64 (toy2d only)."""
        if self._log_density is None:
            raise UserError(f"data set {self.name!r} has no known density; only toy2d:NAME data sets do")
        return self._log_density(x)


# ----------------------------------------------------------------------------------------------- where files live


def cache_root() -> Path:
    """elbox's cache folder: $ELBOX_CACHE, else $XDG_CACHE_HOME/elbox, else ~/.cache/elbox."""
    if os.environ.get("ELBOX_CACHE"):
        return Path(os.environ["ELBOX_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "elbox"


def data_root(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where standard data sets are looked for (and downloaded to): data_dir, else $ELBOX_DATA, else <cache>/data."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    if os.environ.get("ELBOX_DATA"):
        return Path(os.environ["ELBOX_DATA"]).expanduser()
    return cache_root() / "data"


# ------------------------------------------------------------------------------------------------- seeds and splits


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of its parts (same on every machine and torch version)."""
    h = hashlib.blake2b(digest_size=8)
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x00")
    return int.from_bytes(h.digest(), "little") & (2**63 - 1)


def _key_hashes(keys: Sequence[str], salt: str) -> np.ndarray:
    """A 64-bit hash of (salt, key) per key, as uint64."""
    return np.array(
        [int.from_bytes(hashlib.blake2b(f"{salt}/{k}".encode(), digest_size=8).digest(), "little") for k in keys],
        dtype=np.uint64,
    )


def seeded_test_mask(keys: Sequence[str], seed: int, fraction: float = TEST_FRACTION) -> np.ndarray:
    """Which keys fall in the test split of a seeded split: hash(seed, key) < fraction.

    Each example's side depends only on its own key (a file's relative path, an index) and the seed, so the split
    is stored in the data themselves: adding files to a folder never moves an old file from train to test. With
    two or more keys, both sides get at least one (the key with the smallest hash is test, the largest train), so a
    tiny data set still has held-out data.
    """
    hashes = _key_hashes(keys, str(seed))
    test = hashes < np.uint64(int(fraction * 2**64))
    if len(keys) >= 2 and not test.any():
        test[np.argmin(hashes)] = True
    if len(keys) >= 2 and test.all():
        test[np.argmax(hashes)] = False
    return test


def mixed_order(keys: Sequence[str]) -> np.ndarray:
    """A fixed, seed-free permutation of keys (files' relative paths) that mixes classes.

    Folders list images class by class; in this order any prefix of a split (the first 1,000 test images, say)
    is a fair sample of it, as it is for the official orders of MNIST and CIFAR-10's batches.
    """
    return np.argsort(_key_hashes(keys, "order"), kind="stable")


def seeded_split_info(seed: int, fraction: float = TEST_FRACTION) -> dict[str, Any]:
    return {"method": "seeded", "seed": int(seed), "test_fraction": fraction, "key": "blake2b(seed/key)"}


OFFICIAL_SPLIT: dict[str, Any] = {"method": "official"}
