"""CIFAR-10, from whichever form the user has; lossless forms are preferred.

Looked for in ``<root>/``, ``<root>/cifar10/`` and ``<root>/cifar-10/``, in this order of preference:

1. ``cifar-10-batches-py/`` with ``data_batch_1..5`` and ``test_batch`` (the python pickle batches);
2. ``cifar-10-python.tar.gz``, the original download, read without unpacking;
3. ``cifar10-jpeg.tar.gz`` (the JPEG q75 copy in ../shared/data) or another archive named ``cifar10*``
   (.tar, .tar.gz, .tgz, .zip) of ``train/<class>/*`` + ``test/<class>/*`` images;
4. a folder ``train/<class>/`` + ``test/<class>/`` of images (class folders named as CIFAR-10's classes).

The pickle batches are read with an unpickler that refuses every global except the few numpy functions that
rebuild an array, so a hostile file cannot run code. Known files are checked against their md5/sha256.
Downloads fetch ``cifar-10-python.tar.gz`` into ``<root>/cifar10/``.
"""

from __future__ import annotations

import codecs
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from elbox.data import cache, folder
from elbox.data.dataset import OFFICIAL_SPLIT, Dataset
from elbox.data.download import check_digest, download, known_digest
from elbox.data.transforms import fit_images
from elbox.errors import UserError

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BATCHES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
BATCH_DIR = "cifar-10-batches-py"
TARBALL = "cifar-10-python.tar.gz"
JPEG_TAR = "cifar10-jpeg.tar.gz"
FOLDERS = ("", "cifar10", "cifar-10")


def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for core in ("numpy.core", "numpy._core"):  # pickles name whichever module the writer's numpy had
        allowed[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    allowed[("_codecs", "encode")] = codecs.encode  # how protocol-2 pickles written by Python 3 store bytes
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses any other global (no code runs)."""

    ALLOWED = _numpy_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR-10 batch holds only arrays") from None


def parse_batch(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 3, 32, 32) uint8, labels (N,) int64) from one pickled CIFAR-10 batch."""
    try:
        d = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except Exception as e:  # damaged pickles raise many kinds of errors
        raise UserError(f"{where}: not a readable CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict):
        raise UserError(f"{where}: not a CIFAR-10 python batch (holds a {type(d).__name__}, not a dict)")
    d = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise UserError(f"{where}: not a CIFAR-10 python batch (keys {sorted(map(str, d))}; want 'data' and 'labels')")
    x, y = np.asarray(d["data"]), np.asarray(d["labels"])
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.shape != (len(x),):
        raise UserError(f"{where}: 'data' must be uint8 (N, 3072) with N labels, got {x.dtype} {x.shape} and {y.shape} labels")
    if len(y) and (y.min() < 0 or y.max() >= len(CLASSES)):
        raise UserError(f"{where}: labels must be in 0..9, found {y.min()}..{y.max()}")
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _verify(data: bytes, name: str, where: str) -> None:
    known = known_digest("cifar10", name)
    if known is not None:
        check_digest(data, where, known[0], known[1], "CIFAR-10")


def _read_pickle_dir(d: Path, split: str, verify: bool) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in BATCHES[split]:
        path = d / name
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UserError(f"cannot read {path}: {e.strerror}") from e
        if verify:
            _verify(data, name, str(path))
        x, y = parse_batch(data, str(path))
        xs.append(x)
        ys.append(y)
    return np.concatenate(xs), np.concatenate(ys)


def _read_tarball(path: Path, verify: bool) -> dict[str, np.ndarray]:
    """Both splits of cifar-10-python.tar.gz, read in memory (cached by the file's size and mtime)."""
    key = {"kind": "cifar10-tarball", "path": str(path.resolve()), "fingerprint": cache.file_fingerprint(path),
           "verify": verify}
    hit = cache.load(key)
    if hit is not None:
        return hit
    raw = path.read_bytes()
    if verify:
        _verify(raw, TARBALL, str(path))
    out: dict[str, np.ndarray] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(raw), mode="r:*") as tf:
            members = {Path(m.name).name: m for m in tf if m.isfile()}
            for split, names in BATCHES.items():
                xs, ys = [], []
                for name in names:
                    if name not in members:
                        raise UserError(f"{path}: has no {BATCH_DIR}/{name}; it is not CIFAR-10's python archive")
                    data = tf.extractfile(members[name]).read()  # type: ignore[union-attr]
                    if verify:
                        _verify(data, name, f"{name} in {path}")
                    x, y = parse_batch(data, f"{name} in {path}")
                    xs.append(x)
                    ys.append(y)
                out[f"{split}_x"], out[f"{split}_y"] = np.concatenate(xs), np.concatenate(ys)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise UserError(f"{path}: cannot read this archive ({type(e).__name__}: {e}); it is damaged or truncated") from e
    cache.store(key, out)
    return out


def find_source(root: Path, split: str) -> tuple[str, Path] | None:
    """(kind, path) of the best CIFAR-10 source under root: kind is "pickle", "tarball" or "images"."""
    candidates = [root / f for f in FOLDERS]
    for d in candidates:
        if all((d / BATCH_DIR / b).is_file() for b in BATCHES[split]):
            return "pickle", d / BATCH_DIR
    for d in candidates:
        if (d / TARBALL).is_file():
            return "tarball", d / TARBALL
    for d in candidates:
        if (d / JPEG_TAR).is_file():
            return "images", d / JPEG_TAR
        if d.is_dir():
            for p in sorted(d.glob("cifar10*")):
                if p.is_file() and folder.is_archive(p):
                    return "images", p
    for d in candidates:
        if (d / "train" / CLASSES[0]).is_dir() and (d / "test" / CLASSES[0]).is_dir():
            return "images", d
    return None


def load(
    split: str,
    *,
    root: Path,
    image_size: int | None,
    channels: int | None,
    download_allowed: bool | None,
    skip_bad: bool,
    verify: bool,
) -> Dataset:
    source = find_source(root, split)
    if source is None:
        looked_for = (
            f"no {BATCH_DIR}/, {TARBALL}, {JPEG_TAR} or train/+test/ class folders in {root}, {root}/cifar10 "
            f"or {root}/cifar-10"
        )

        def check(name: str, path: Path) -> None:
            _verify(path.read_bytes(), name, name)

        download("cifar10", [TARBALL], root / "cifar10", allowed=download_allowed, looked_for=looked_for, check=check)
        source = find_source(root, split)
        assert source is not None
    kind, path = source
    skipped: tuple[str, ...] = ()
    checked = "md5-verified" if verify else "not verified"
    if kind == "pickle":
        x, y = _read_pickle_dir(path, split, verify)
        description = f"CIFAR-10 (original python batches, {checked}) from {path}"
    elif kind == "tarball":
        arrays = _read_tarball(path, verify)
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        description = f"CIFAR-10 (original python archive, {checked}) from {path}"
    else:
        x, y, skipped, description = _read_images(path, split, skip_bad=skip_bad, verify=verify)
    data, notes = fit_images(torch.from_numpy(np.ascontiguousarray(x)), image_size, channels)
    return Dataset(
        data=data,
        labels=torch.from_numpy(np.ascontiguousarray(y)),
        name="cifar10",
        split=split,
        kind="image",
        description=", ".join([description, *notes]),
        classes=CLASSES,
        skipped=skipped,
        split_info=dict(OFFICIAL_SPLIT),
    )


def _read_images(path: Path, split: str, *, skip_bad: bool, verify: bool):
    """A split of CIFAR-10 from an archive or folder of train/<class>/ + test/<class>/ images, at 32x32 RGB."""
    is_jpeg_copy = path.name == JPEG_TAR

    def check(p: Path) -> None:
        _verify(p.read_bytes(), JPEG_TAR, str(p))

    tree = folder.decode_tree(path, image_size=None, channels=3, skip_bad=skip_bad, class_order=CLASSES,
                              check=check if (verify and is_jpeg_copy) else None)
    if not (tree.split != "").all() or tree.labels is None:
        raise UserError(f"{path}: CIFAR-10 images must be in train/<class>/ and test/<class>/ folders ({', '.join(CLASSES)})")
    if tree.images.shape[1:] != (3, 32, 32):
        raise UserError(f"{path}: CIFAR-10 images must be 32x32, these are {tree.images.shape[3]}x{tree.images.shape[2]}")
    index, _ = folder.select_split(tree, split, seed=0)  # official split, in a class-mixing order
    if is_jpeg_copy:
        what = "CIFAR-10 (JPEG q75 copy)" if verify else "CIFAR-10 (JPEG q75 copy, not verified)"
    else:
        what = f"CIFAR-10 ({'/'.join(tree.formats)} images)"
    return tree.images[index], tree.labels[index], tuple(tree.skipped), f"{what}, {folder.summary(path, tree)}"
