"""Images from a folder (searched recursively) or an archive (.tar, .tar.gz/.tgz, .tar.bz2, .tar.xz, .zip).

PNG, JPEG and WebP files are decoded with Pillow and converted once, at load time:

- channels: grey images stay grey and colour images become RGB; with ``channels`` given, all are converted to it
  (RGB -> grey by ITU-R 601-2 luma); without it, a set with any colour image becomes RGB;
- transparency (RGBA, LA, palette or grey with a transparent colour) is composited onto a white background;
- EXIF orientation is applied (photos from cameras and phones);
- ``image_size``: center-crop to a square, then resize (bicubic, antialiased) to image_size x image_size.
  Without it every image must already have the same size.

Structure: ``<root>/train/...`` + ``<root>/test/...`` is taken as the official split (under one shared top folder
too); otherwise a seeded split puts ~10% of the files, chosen by a hash of (seed, relative path), in "test".
Within a split, images come in a fixed order that mixes the classes (a hash of the path), not folder by folder.
Images in per-class subfolders get labels (classes in sorted order, or a given order). Files with other
extensions are ignored (and counted); hidden files and ``__MACOSX`` are skipped. A file with an image extension
that cannot be decoded stops the load with its name, or, with ``skip_bad``, is skipped and counted.
The decoded arrays are cached (see ``elbox.data.cache``); the user's files are only ever read.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from elbox.data import cache
from elbox.data.dataset import OFFICIAL_SPLIT, Dataset, mixed_order, seeded_split_info, seeded_test_mask
from elbox.errors import EmptySplit, UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
FORMATS = ("PNG", "JPEG", "WEBP")  # Pillow opens a camera's MPO (JPEG with extra frames) as JPEG too
BACKGROUND = (255, 255, 255)  # what transparent pixels become
SPLIT_DIRS = ("train", "test")
_GREY_16 = ("I;16", "I;16B", "I;16L", "I")


@dataclass
class ImageTree:
    """Every image of a folder or archive, decoded: (N, C, H, W) uint8 in sorted path order."""

    images: np.ndarray
    paths: list[str]  # relative, with "/"
    split: np.ndarray  # per image: "train", "test", or "" when the tree has no official split
    labels: np.ndarray | None  # int64, when images are in per-class folders
    classes: tuple[str, ...] | None
    skipped: list[str]
    ignored: int  # files without an image extension
    formats: tuple[str, ...]  # the image formats found, e.g. ("JPEG",)


# --------------------------------------------------------------------------------------------------- one image


class BadImage(Exception):
    pass


def _to_grey_or_rgb(im: Image.Image) -> tuple[Image.Image, bool]:
    """An "L" or "RGB" image, with any transparency composited onto the background; and whether it is grey."""
    mode = im.mode
    if mode in _GREY_16:  # 16-bit grey PNGs: scale 0..65535 to 0..255
        a = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L"), True
    grey = mode in ("1", "L", "LA", "La")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (*BACKGROUND, 255)), rgba)
    if grey:
        return im.convert("L"), True
    return im.convert("RGB"), False


def decode_image(source: bytes | Path, *, image_size: int | None, channels: int | None) -> tuple[np.ndarray, str]:
    """One image as (H, W) for grey or (H, W, 3) uint8, and its format; raises BadImage."""
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else source
        with Image.open(fp, formats=FORMATS) as im:
            im.load()  # decode now: a truncated or damaged file fails here
            fmt = im.format or "?"
            if "exif" in im.info:  # photos from cameras and phones store their orientation there
                im = ImageOps.exif_transpose(im)
            if im.mode in ("L", "RGB") and "transparency" not in im.info:
                grey = im.mode == "L"  # the common case, without a copy
            else:
                im, grey = _to_grey_or_rgb(im)
            if image_size is not None and im.size != (image_size, image_size):
                w, h = im.size
                s = min(w, h)
                box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
                im = im.resize((image_size, image_size), Image.Resampling.BICUBIC, box=box)
            if channels == 1 and not grey:
                im = im.convert("L")
            elif channels == 3 and grey:
                im = im.convert("RGB")
            return np.asarray(im), fmt
    except UnidentifiedImageError:
        raise BadImage("not a PNG, JPEG or WebP image") from None
    except Exception as e:  # Pillow raises many kinds (OSError, SyntaxError, ValueError, ...) for damaged files
        raise BadImage(f"{type(e).__name__}: {e}") from None


# ------------------------------------------------------------------------------------------------ listing a tree


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _hidden(rel: str) -> bool:
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


def _is_image_name(rel: str) -> bool:
    return rel.lower().endswith(IMAGE_SUFFIXES)


def _list_folder(root: Path) -> tuple[list[str], int]:
    """Relative paths of the image files under root (recursive, following links once), and how many others."""
    images, others, seen = [], 0, set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:  # a link cycle
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__MACOSX"]
        for f in filenames:
            if f.startswith("."):
                continue
            rel = Path(dirpath, f).relative_to(root).as_posix()
            if _is_image_name(rel):
                images.append(rel)
            else:
                others += 1
    return sorted(images), others


def _read_archive(path: Path) -> tuple[dict[str, bytes], int]:
    """{relative path: bytes} of the image members of an archive, and how many other members it has."""
    members: dict[str, bytes] = {}
    others = 0
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    rel = info.filename.removeprefix("./")
                    if info.is_dir() or _hidden(rel):
                        continue
                    if _is_image_name(rel):
                        members[rel] = zf.read(info)
                    else:
                        others += 1
        else:
            with tarfile.open(path, mode="r:*") as tf:
                for m in tf:
                    rel = m.name.removeprefix("./")
                    if not m.isfile() or _hidden(rel):
                        continue
                    if _is_image_name(rel):
                        f = tf.extractfile(m)
                        members[rel] = f.read() if f is not None else b""
                    else:
                        others += 1
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{path}: cannot read this archive ({type(e).__name__}: {e}); it is damaged or truncated") from e
    return members, others


def _structure(paths: Sequence[str], class_order: Sequence[str] | None, where: Path):
    """Split names and labels from the folder structure: (split per path, labels or None, classes or None)."""
    parts = [p.split("/") for p in paths]
    k = 0  # strip top folders shared by every file (an archive's single root folder, say)
    while all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1 and parts[0][k].lower() not in SPLIT_DIRS:
        k += 1
    tops = {p[k].lower() for p in parts}
    if tops == set(SPLIT_DIRS) and all(len(p) > k + 1 for p in parts):
        split = np.array([p[k].lower() for p in parts])
        k += 1
    else:
        split = np.array([""] * len(parts))
    if not all(len(p) > k + 1 for p in parts):  # some images are not in a class folder: no labels
        return split, None, None
    names = [p[k] for p in parts]
    classes = tuple(class_order) if class_order is not None else tuple(sorted(set(names)))
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise UserError(f"{where}: unexpected class folder {unknown[0]!r}; the classes are {', '.join(classes)}")
    return split, np.array([index[n] for n in names], dtype=np.int64), classes


# ------------------------------------------------------------------------------------------------- the whole tree


def _fingerprint(path: Path, listed: list[str]) -> str:
    h = hashlib.sha256()
    for rel in listed:
        st = (path / rel).stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def decode_tree(
    path: Path,
    *,
    image_size: int | None,
    channels: int | None,
    skip_bad: bool,
    class_order: Sequence[str] | None = None,
    check: Callable[[Path], None] | None = None,
) -> ImageTree:
    """Decode every image of a folder or archive (or take it from the cache).

    ``check(path)`` verifies an archive before it is decoded (a checksum); a cached result keeps its verdict, as
    the cache key holds the archive's size and modification time.
    """
    if not path.exists():
        raise UserError(f"{path} does not exist; folder:PATH wants a folder or an archive of images")
    if path.is_dir():
        listed, others = _list_folder(path)
        members: dict[str, bytes] | None = None
        fingerprint = [_fingerprint(path, listed), others]
    elif is_archive(path) or zipfile.is_zipfile(path) or tarfile.is_tarfile(path):
        listed, others, members, fingerprint = [], 0, None, cache.file_fingerprint(path)
    else:
        kind = "a single image" if _is_image_name(path.name) else "not a folder or an archive"
        raise UserError(
            f"{path} is {kind}; folder:PATH wants a folder or an archive ({', '.join(ARCHIVE_SUFFIXES)}) "
            f"of PNG/JPEG/WebP images"
        )
    key = {"kind": "image-tree", "path": str(path.resolve()), "fingerprint": fingerprint, "image_size": image_size,
           "channels": channels, "skip_bad": skip_bad, "class_order": list(class_order) if class_order else None,
           "checked": check is not None}
    hit = cache.load(key)
    if hit is not None:
        return _tree_from_arrays(hit)
    if not path.is_dir():
        if check is not None:
            check(path)
        members, others = _read_archive(path)
        listed = sorted(members)
    if not listed:
        example = "" if not others else f" (it has {others} other file{'s' if others > 1 else ''})"
        raise UserError(f"no PNG, JPEG or WebP images in {path}{example}; folder:PATH wants a folder or archive of images")

    arrays, kept, skipped, reasons, formats = [], [], [], [], set()
    first_size: tuple[str, tuple[int, int]] | None = None
    for rel in listed:
        source = members.pop(rel) if members is not None else path / rel
        where = f"{path}/{rel}" if members is None else f"{rel} in {path}"
        try:
            a, fmt = decode_image(source, image_size=image_size, channels=channels)
        except BadImage as e:
            skipped.append(rel)
            reasons.append(f"{where}: {e}")
            continue
        if first_size is None:
            first_size = (where, a.shape[:2])
        elif a.shape[:2] != first_size[1]:
            (h0, w0), (h1, w1) = first_size[1], a.shape[:2]
            raise UserError(
                f"images differ in size: {first_size[0]} is {w0}x{h0}, {where} is {w1}x{h1}; pass image_size "
                f"(--image-size N) to center-crop and resize them all"
            )
        arrays.append(a)
        kept.append(rel)
        formats.add(fmt)
    if not arrays:
        raise UserError(f"none of the {len(listed)} images in {path} can be read (e.g. {reasons[0]}); nothing to load")
    if skipped and not skip_bad:  # every unreadable file in one message: one round of fixing suffices
        more = f" and {len(reasons) - 3} more" if len(reasons) > 3 else ""
        raise UserError(f"cannot read {len(reasons)} image file(s): {'; '.join(reasons[:3])}{more}; fix or remove "
                        f"them, or skip unreadable files with skip_bad=True (--skip-bad)")

    colour = any(a.ndim == 3 for a in arrays)
    images = np.empty((len(arrays), 3 if colour else 1, *arrays[0].shape[:2]), dtype=np.uint8)
    for i, a in enumerate(arrays):  # (H, W) or (H, W, 3) -> (C, H, W); grey is replicated in a colour set
        images[i] = a.transpose(2, 0, 1) if a.ndim == 3 else a[None]
    split, labels, classes = _structure(kept, class_order, path)
    tree = ImageTree(images, kept, split, labels, classes, skipped, others, tuple(sorted(formats)))
    cache.store(key, _tree_to_arrays(tree))
    return tree


def _tree_to_arrays(t: ImageTree) -> dict[str, np.ndarray]:
    return {
        "images": t.images,
        "paths": np.array(t.paths, dtype=str),
        "split": t.split.astype(str),
        "labels": t.labels if t.labels is not None else np.zeros(0, dtype=np.int64),
        "has_labels": np.array(t.labels is not None),
        "classes": np.array(t.classes or (), dtype=str),
        "skipped": np.array(t.skipped, dtype=str),
        "ignored": np.array(t.ignored),
        "formats": np.array(t.formats, dtype=str),
    }


def _tree_from_arrays(a: dict[str, np.ndarray]) -> ImageTree:
    has_labels = bool(a["has_labels"])
    return ImageTree(
        images=a["images"],
        paths=[str(p) for p in a["paths"]],
        split=a["split"],
        labels=a["labels"] if has_labels else None,
        classes=tuple(str(c) for c in a["classes"]) if has_labels else None,
        skipped=[str(p) for p in a["skipped"]],
        ignored=int(a["ignored"]),
        formats=tuple(str(f) for f in a["formats"]),
    )


# ------------------------------------------------------------------------------------------------- folder:PATH


def select_split(tree: ImageTree, split: str, seed: int) -> tuple[np.ndarray, dict]:
    """Indices of the split's images, in a fixed class-mixing order (``mixed_order``), and how it was made."""
    if (tree.split != "").all():
        index, info = np.flatnonzero(tree.split == split), dict(OFFICIAL_SPLIT)
    else:
        test = seeded_test_mask(tree.paths, seed)
        index, info = np.flatnonzero(test if split == "test" else ~test), seeded_split_info(seed)
    return index[mixed_order([tree.paths[i] for i in index])], info


def summary(path: Path, tree: ImageTree) -> str:
    extra = []
    if tree.skipped:
        extra.append(f"{len(tree.skipped)} unreadable skipped, e.g. {tree.skipped[0]}")
    if tree.ignored:
        extra.append(f"{tree.ignored} non-image files ignored")
    n = len(tree.paths) + len(tree.skipped)
    return f"{n} {'/'.join(tree.formats)} images from {path}" + (f" ({'; '.join(extra)})" if extra else "")


def load(path: Path, split: str, *, image_size: int | None, channels: int | None, skip_bad: bool, seed: int) -> Dataset:
    tree = decode_tree(path, image_size=image_size, channels=channels, skip_bad=skip_bad)
    index, split_info = select_split(tree, split, seed)
    if len(index) == 0:
        how = "the official split" if split_info["method"] == "official" else f"a seeded split (seed {seed}, ~10% test)"
        raise EmptySplit(f"the {split} split of {path} is empty ({len(tree.paths)} images, {how}); add images")
    labels = torch.from_numpy(tree.labels[index]) if tree.labels is not None else None
    h, w = tree.images.shape[-2:]
    how = "official train/test folders" if split_info["method"] == "official" else f"seeded split, seed {seed}"
    return Dataset(
        data=torch.from_numpy(np.ascontiguousarray(tree.images[index])),
        labels=labels,
        name=f"folder:{path}",
        split=split,
        kind="image",
        description=f"{summary(path, tree)}, {tree.images.shape[1]}x{h}x{w}, {how}",
        classes=tree.classes,
        skipped=tuple(tree.skipped),
        split_info=split_info,
    )
