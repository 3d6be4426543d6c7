"""Checksums of the files elbox knows, their verification, and downloads.

A known file is verified every time it is read (hashing is cheap next to decoding). A download goes to a
temporary file beside its destination, is verified, and only then renamed into place, so an interrupted or
corrupted download never leaves a file that looks complete. Offline, the error names the files and the folder.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from elbox.errors import UserError

# sha256 of the *uncompressed* IDX files. The content is what matters: the original .gz downloads, the gzip -9n
# copies in ../shared/data and gunzipped files (torchvision's <root>/MNIST/raw/) all decompress to these bytes.
# Values from ../shared/data/README.md, which checked them against the original distributions.
IDX_CONTENT_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    },
}

# Digests of whole files: the original downloads (md5, as published with the data sets and checked by
# torchvision) and the copies in ../shared/data (sha256, from its README).
FILE_DIGESTS: dict[str, dict[str, dict[str, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": {"md5": "f68b3c2dcbeaaa9fbdd348bbdeb94873"},
        "train-labels-idx1-ubyte.gz": {"md5": "d53e105ee54ea40749a09fcbcd1e9432"},
        "t10k-images-idx3-ubyte.gz": {"md5": "9fb629c4189551a2d022fa330f9573f3"},
        "t10k-labels-idx1-ubyte.gz": {"md5": "ec29112dd5afa0611ce80d1b7f02629c"},
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": {"md5": "8d4fb7e6c68d591d4c3dfef9ec88bf0d"},
        "train-labels-idx1-ubyte.gz": {"md5": "25c81989df183df01b3e8a0aad5dffbe"},
        "t10k-images-idx3-ubyte.gz": {"md5": "bef4ecab320f06d8554ea6380940ec79"},
        "t10k-labels-idx1-ubyte.gz": {"md5": "bb300cfdad3c16e7a12a480ee83cd310"},
    },
    "cifar10": {
        "cifar-10-python.tar.gz": {"md5": "c58f30108f718f92721af3b95e74349a"},
        "data_batch_1": {"md5": "c99cafc152244af753f735de768cd75f"},
        "data_batch_2": {"md5": "d4bba439e000b95fd0a9bffe97cbabec"},
        "data_batch_3": {"md5": "54ebc095f3ab1f0389bbae665268c751"},
        "data_batch_4": {"md5": "634d18415352ddfa80567beed471001a"},
        "data_batch_5": {"md5": "482c414d41f54cd18b22e5b47cb7c3cb"},
        "test_batch": {"md5": "40351d587109b95175f43aff81a1287e"},
        "cifar10-jpeg.tar.gz": {"sha256": "097287809041e0a666355dfce11470ba1b3f2631fe910d8793c716253f10b297"},
    },
}

# Where the originals can be downloaded from, tried in order (module-level so tests can point them elsewhere).
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
}

#: seconds to wait for a server before calling the machine offline
TIMEOUT_S = 5.0

TITLES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}


def hexdigest(data: bytes, algo: str) -> str:
    return hashlib.new(algo, data).hexdigest()


def _identify(algo: str, digest: str, *, content: bool) -> str:
    """' (it is Fashion-MNIST's train-images-idx3-ubyte)' when a digest belongs to another known file, else ''."""
    if content and algo == "sha256":
        for ds, files in IDX_CONTENT_SHA256.items():
            for name, d in files.items():
                if d == digest:
                    return f" (its content is {TITLES[ds]}'s {name})"
    if not content:
        for ds, files in FILE_DIGESTS.items():
            for name, ds_digests in files.items():
                if ds_digests.get(algo) == digest:
                    return f" (it is {TITLES[ds]}'s {name})"
    return ""


def check_digest(data: bytes, where: str, algo: str, want: str, what: str, *, content: bool = False) -> None:
    """Raise a UserError unless ``data`` hashes to ``want``; ``where`` names the file in the message."""
    got = hexdigest(data, algo)
    if got != want:
        kind = f"{algo} of its uncompressed content" if content else algo
        raise UserError(
            f"{where}: {kind} is {got}, not {what}'s {want}{_identify(algo, got, content=content)}; the file is "
            f"damaged or not the original: delete it (it is downloaded again when online) or load it with "
            f"verify=False (--no-verify) to use it as it is"
        )


def known_digest(dataset: str, name: str) -> tuple[str, str] | None:
    """(algo, hex) of a known file of ``dataset`` called ``name``, or None."""
    d = FILE_DIGESTS.get(dataset, {}).get(name)
    if not d:
        return None
    algo = "sha256" if "sha256" in d else "md5"
    return algo, d[algo]


# ------------------------------------------------------------------------------------------------------- downloads


class _Unreachable(Exception):
    pass


def _fetch(urls: Sequence[str], dest: Path, check: Callable[[Path], None]) -> None:
    """Download the first URL that answers into ``dest``: temp file, verify with ``check``, atomic rename."""
    failures: list[str] = []
    bad_checksum: UserError | None = None
    for url in urls:
        fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "elbox"})
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
                print(f"elbox: downloading {url} to {dest.parent}", file=sys.stderr)
                shutil.copyfileobj(response, out, 1 << 20)
            check(tmp)
            os.replace(tmp, dest)
            return
        except UserError as e:  # downloaded, but not the file we know: try the next mirror
            bad_checksum = UserError(f"downloaded {url}, but {e}")
        except (OSError, ValueError, http.client.HTTPException) as e:  # refused, timed out, 404, cut off
            failures.append(f"{url}: {getattr(e, 'reason', e)}")
        finally:
            tmp.unlink(missing_ok=True)
    if bad_checksum is not None:
        raise bad_checksum
    raise _Unreachable("; ".join(failures))


def download(
    dataset: str,
    names: Sequence[str],
    dest_dir: Path,
    *,
    allowed: bool | None,
    looked_for: str,
    check: Callable[[str, Path], None],
) -> None:
    """Fetch the missing files ``names`` of ``dataset`` into ``dest_dir``, or explain what to put where.

    ``allowed``: True (must download), None (try if online), False (never). ``looked_for`` says, in words, what
    was searched, for the message. ``check(name, path)`` verifies a downloaded file (raises UserError).
    """
    title = TITLES[dataset]
    files = ", ".join(names)
    where = f"put {files} in {dest_dir}"
    if allowed is False:
        raise UserError(f"{title} not found ({looked_for}); {where}, or allow downloading (download=True, --download)")
    created = [p for p in (dest_dir, *dest_dir.parents) if not p.exists()]  # to remove again if nothing comes
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{title} not found ({looked_for}) and {dest_dir} cannot be created ({e.strerror}); {where}") from e
    try:
        _fetch_all(dataset, names, dest_dir, title=title, looked_for=looked_for, where=where, check=check)
    except BaseException:
        for folder in created:  # nothing is left on a path that failed (a mistyped --data-dir, offline)
            try:
                folder.rmdir()
            except OSError:
                break
        raise


def _fetch_all(dataset: str, names: Sequence[str], dest_dir: Path, *, title: str, looked_for: str, where: str,
               check: Callable[[str, Path], None]) -> None:
    for name in names:
        try:
            _fetch([m + name for m in MIRRORS[dataset]], dest_dir / name, lambda p, n=name: check(n, p))
        except _Unreachable as e:
            raise UserError(
                f"{title} not found ({looked_for}) and it cannot be downloaded (offline? {e}); "
                f"download them from {MIRRORS[dataset][0]} and {where}, or point --data-dir / ELBOX_DATA at a folder "
                f"that has them"
            ) from None
        except OSError as e:  # the temporary file could not be created: a read-only folder
            raise UserError(f"cannot write to {dest_dir} ({e.strerror}); {where} or pass a writable --data-dir") from e
