"""Data sets, held in memory as uint8 images (N, C, H, W) or float vectors (N, D), and the loader that batches them.

``load_dataset(name, split)`` is the one entry point; ``DATASETS`` is the registry of names (plus the pattern
``folder:PATH``). A model sees images only through ``to_model`` (``transforms``), batches come from
``InMemoryLoader`` (``loader``).

Where files live: ``data_dir``, else ``$ELBOX_DATA``, else ``~/.cache/elbox/data`` (``$ELBOX_CACHE`` moves the
cache). ``mnist``/``fashion-mnist`` read IDX files (``idx``), ``cifar10`` the python batches, the original archive
or a tar/folder of per-class images (``cifar``); missing files are downloaded when online and verified.

To add a data set: write ``load(split, ...) -> Dataset`` in a module here and add a ``DatasetSpec`` to DATASETS.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from elbox.data import cifar, embedded, folder, idx, toy2d
from elbox.data.dataset import SPLITS, Dataset, cache_root, data_root
from elbox.data.loader import InMemoryLoader
from elbox.data.transforms import DATA_RANGES, DataRange, from_model, to_model
from elbox.errors import UserError

__all__ = [
    "DATASETS",
    "DATA_RANGES",
    "DEFAULT_DATASET",
    "DataRange",
    "Dataset",
    "DatasetSpec",
    "InMemoryLoader",
    "cache_root",
    "data_root",
    "from_model",
    "known_names",
    "load_dataset",
    "to_model",
]


@dataclass(frozen=True)
class Options:
    """What ``load_dataset`` passes to a data set's loader."""

    split: str
    root: Path
    image_size: int | None
    channels: int | None
    download: bool | None
    skip_bad: bool
    seed: int
    verify: bool


@dataclass(frozen=True)
class DatasetSpec:
    kind: str  # "image" | "vector"
    summary: str
    load: Callable[[Options], Dataset]
    needs_files: bool = False  # read from the data dir (or downloaded)


def _idx(spec: idx.IdxSet) -> Callable[[Options], Dataset]:
    return lambda o: idx.load(spec, o.split, root=o.root, image_size=o.image_size, channels=o.channels,
                              download_allowed=o.download, verify=o.verify)


def _toy(name: str) -> Callable[[Options], Dataset]:
    return lambda o: toy2d.load(name, o.split, seed=o.seed)


DATASETS: dict[str, DatasetSpec] = {
    "digits": DatasetSpec("image", "8x8 handwritten digits (as scikit-learn bundles them), 1,797 images, built "
                                    "in (the default)",
                          lambda o: embedded.load(o.split, image_size=o.image_size, channels=o.channels, seed=o.seed)),
    "mnist": DatasetSpec("image", "MNIST, 60k/10k 28x28 grey", _idx(idx.MNIST), needs_files=True),
    "fashion-mnist": DatasetSpec("image", "Fashion-MNIST, 60k/10k 28x28 grey", _idx(idx.FASHION_MNIST), needs_files=True),
    "cifar10": DatasetSpec(
        "image", "CIFAR-10, 50k/10k 32x32 RGB",
        lambda o: cifar.load(o.split, root=o.root, image_size=o.image_size, channels=o.channels,
                             download_allowed=o.download, skip_bad=o.skip_bad, verify=o.verify),
        needs_files=True,
    ),
    **{f"toy2d:{n}": DatasetSpec("vector", toy2d.SUMMARIES[n], _toy(n)) for n in toy2d.NAMES},
}
DEFAULT_DATASET = "digits"
FOLDER_PREFIX = "folder:"
ALIASES = {"fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar": "cifar10"}


def known_names() -> list[str]:
    """Every name ``load_dataset`` accepts, with the folder pattern last (for help texts and error messages)."""
    return [*DATASETS, FOLDER_PREFIX + "PATH"]


def _unknown(name: str) -> UserError:
    close = difflib.get_close_matches(name.lower(), list(DATASETS), n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    if not close and ("/" in name or os.sep in name or Path(name).expanduser().exists()):
        hint = f"for images in a folder or archive use 'folder:{name}'; "
    return UserError(f"unknown data set {name!r}; {hint}known: {', '.join(known_names())}")


def load_dataset(
    name: str,
    split: str = "train",
    *,
    data_dir: str | os.PathLike[str] | None = None,
    image_size: int | None = None,
    channels: int | None = None,
    download: bool | None = None,
    skip_bad: bool = False,
    seed: int = 0,
    verify: bool = True,
) -> Dataset:
    """One split ("train" or "test") of a data set, in memory.

    ``data_dir``: where standard sets are read from (default ``$ELBOX_DATA``, else ``~/.cache/elbox/data``).
    ``image_size``/``channels``: center-crop+resize and convert images (1 or 3 channels) at load time.
    ``download``: None = fetch missing files if the machine is online, True = must, False = never.
    ``skip_bad``: skip unreadable image files (they are listed in ``Dataset.skipped``) instead of stopping.
    ``seed``: the seeded split of sets without an official one, and the draw of toy2d sets.
    ``verify``: check known files against their checksums (turn off only for files you changed on purpose).
    """
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise UserError(f"image size must be a positive integer, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise UserError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    name = name.strip()
    if name.startswith(FOLDER_PREFIX):
        if name == FOLDER_PREFIX:
            raise UserError("folder: needs a path, e.g. folder:~/pictures or folder:images.tar.gz")
        path = Path(name[len(FOLDER_PREFIX) :]).expanduser()
        return folder.load(path, split, image_size=image_size, channels=channels, skip_bad=skip_bad, seed=int(seed))
    key = ALIASES.get(name.lower(), name.lower())
    spec = DATASETS.get(key)
    if spec is None:
        raise _unknown(name)
    if spec.kind == "vector" and (image_size is not None or channels is not None):
        raise UserError(f"{key} is 2-D vector data; image size and channels do not apply (leave them unset)")
    options = Options(split, data_root(data_dir), image_size, channels, download, skip_bad, int(seed), verify)
    return spec.load(options)
