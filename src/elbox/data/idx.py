"""MNIST and Fashion-MNIST from their original IDX files, gzipped or not, in the layouts users already have.

Looked for under the data root, in this order (the first folder holding both files of the split wins):
``<root>/mnist/``, ``<root>/MNIST/raw/`` (torchvision), ``<root>/MNIST/``, ``<root>/`` — and for Fashion-MNIST
``<root>/fashion-mnist/``, ``<root>/fashion_mnist/``, ``<root>/FashionMNIST/raw/``, ``<root>/FashionMNIST/``,
``<root>/``. Each folder may hold ``train-images-idx3-ubyte`` or ``train-images-idx3-ubyte.gz`` (and so on); the
uncompressed file is preferred. The uncompressed content is checked against its known sha256, which also tells
MNIST from Fashion-MNIST when both sit in a plain ``<root>/``. Downloads go to the first folder of the list.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from elbox.data.dataset import OFFICIAL_SPLIT, Dataset
from elbox.data.download import IDX_CONTENT_SHA256, check_digest, download
from elbox.data.transforms import fit_images
from elbox.errors import UserError

#: (images, labels) file stems of each official split
STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class IdxSet:
    name: str
    title: str
    folders: tuple[str, ...]  # searched under the data root, in order; "" is the root itself
    classes: tuple[str, ...]


MNIST = IdxSet("mnist", "MNIST", ("mnist", "MNIST/raw", "MNIST", ""), tuple("0123456789"))
FASHION_MNIST = IdxSet(
    "fashion-mnist",
    "Fashion-MNIST",
    ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", "FashionMNIST", ""),
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
)


def find_files(root: Path, spec: IdxSet, split: str) -> list[Path] | None:
    """The split's (images, labels) files in the first folder that has both, or None."""
    for folder in spec.folders:
        d = root / folder
        found = []
        for stem in STEMS[split]:
            for name in (stem, stem + ".gz"):
                if (d / name).is_file():
                    found.append(d / name)
                    break
        if len(found) == 2:
            return found
    return None


def _content(path: Path | str, data: bytes) -> bytes:
    """The uncompressed bytes of an IDX file that may be gzipped; ``path`` names it in messages."""
    if not data.startswith(b"\x1f\x8b"):  # the gzip magic; look at content, not at the name
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path}: cannot decompress this gzip file ({e}); it is damaged or truncated: replace it") from e


def parse_idx(path: Path, data: bytes, ndim: int) -> np.ndarray:
    """An IDX array of unsigned bytes with ``ndim`` dimensions (3 for images, 1 for labels)."""
    if len(data) < 4 or data[:3] != b"\x00\x00\x08" or data[3] != ndim:
        what = "images (magic 0x00000803)" if ndim == 3 else "labels (magic 0x00000801)"
        raise UserError(f"{path}: not an IDX file of {what}; got first bytes {data[:4].hex()}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UserError(f"{path}: truncated IDX header ({len(data)} bytes)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    size = math.prod(dims)
    if len(data) != header + size:
        raise UserError(
            f"{path}: the header promises {size} bytes of data for shape {dims}, the file has {len(data) - header}; "
            f"it is truncated or damaged"
        )
    return np.frombuffer(data, dtype=np.uint8, count=size, offset=header).reshape(dims)


def read_idx(path: Path, spec: IdxSet, stem: str, *, verify: bool) -> np.ndarray:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from e
    data = _content(path, raw)
    if verify:
        check_digest(data, str(path), "sha256", IDX_CONTENT_SHA256[spec.name][stem], spec.title, content=True)
    return parse_idx(path, data, 3 if "images" in stem else 1)


def load(
    spec: IdxSet,
    split: str,
    *,
    root: Path,
    image_size: int | None,
    channels: int | None,
    download_allowed: bool | None,
    verify: bool,
) -> Dataset:
    files = find_files(root, spec, split)
    if files is None:
        stems = STEMS[split]
        folders = ", ".join(f"{f}/" if f else "./" for f in spec.folders)
        looked_for = f"no {stems[0]}[.gz] + {stems[1]}[.gz] in {root} under {folders}"

        def check(name: str, path: Path) -> None:
            stem = name.removesuffix(".gz")
            data = _content(name, path.read_bytes())
            check_digest(data, name, "sha256", IDX_CONTENT_SHA256[spec.name][stem], spec.title, content=True)

        names = [s + ".gz" for s in stems]
        download(spec.name, names, root / spec.folders[0], allowed=download_allowed, looked_for=looked_for, check=check)
        files = find_files(root, spec, split)
        assert files is not None
    images = read_idx(files[0], spec, STEMS[split][0], verify=verify)
    labels = read_idx(files[1], spec, STEMS[split][1], verify=verify)
    if len(images) != len(labels):
        raise UserError(f"{files[0]} has {len(images)} images but {files[1]} has {len(labels)} labels; they must match")
    if labels.size and labels.max() >= len(spec.classes):
        raise UserError(f"{files[1]}: label {labels.max()} is out of range 0..{len(spec.classes) - 1}")
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28)
    x, notes = fit_images(x, image_size, channels)
    how = "original IDX files, sha256-verified" if verify else "IDX files, not verified"
    return Dataset(
        data=x,
        labels=torch.from_numpy(labels.astype(np.int64)),
        name=spec.name,
        split=split,
        kind="image",
        description=", ".join([f"{spec.title} ({how}) from {files[0].parent}", *notes]),
        classes=spec.classes,
        split_info=dict(OFFICIAL_SPLIT),
    )
