"""A cache of decoded arrays under <cache>/decoded/, so a folder or archive of images is decoded once.

An entry is an uncompressed ``.npz`` (numpy arrays only, read with allow_pickle=False) named by a hash of its
key; the key holds the source's path, size and modification time (for a folder: of every file in it) and the
decoding options, so a changed source is simply decoded again. Nothing is ever written beside the user's files;
a cache that cannot be written or read is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from elbox.data.dataset import cache_root

FORMAT_VERSION = 1


def _entry(key: dict[str, Any]) -> tuple[Path, str]:
    text = json.dumps({"version": FORMAT_VERSION, **key}, sort_keys=True)
    return cache_root() / "decoded" / (hashlib.sha256(text.encode()).hexdigest()[:32] + ".npz"), text


def load(key: dict[str, Any]) -> dict[str, np.ndarray] | None:
    path, text = _entry(key)
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["__key__"]) != text:
                return None
            return {k: z[k] for k in z.files if k != "__key__"}
    except (OSError, ValueError, KeyError, EOFError):  # absent, unreadable or stale: decode again
        return None


def store(key: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    path, text = _entry(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, __key__=np.array(text), **arrays)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        pass  # a read-only home: work without the cache


def file_fingerprint(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]
