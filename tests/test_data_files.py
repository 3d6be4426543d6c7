"""elbox.data with real files: the standard sets in ../shared/data, the layouts users have, folders of images,
downloads and every kind of bad input. The user's files are hashed before and after: nothing may change them."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import os
import pickle
import shutil
import tarfile
import threading
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from elbox.data import download as dl
from elbox.data import folder, load_dataset
from elbox.errors import UserError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared() -> Path:
    if not SHARED.is_dir():
        pytest.skip(f"real data not found at {SHARED}")
    return SHARED


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch) -> Path:
    """A private cache per test, outside tmp_path (where the tests keep the "user's" files)."""
    path = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("ELBOX_CACHE", str(path))
    monkeypatch.delenv("ELBOX_DATA", raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    return path


def digest(root: Path) -> dict[str, str]:
    """sha256 of every file under root (or of root itself), by relative path."""
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@contextmanager
def untouched(root: Path):
    """Assert that nothing under root is changed, added or removed by the block (even when it raises)."""
    before = digest(root)
    try:
        yield
    finally:
        assert digest(root) == before


@pytest.fixture(scope="session")
def shared_digest(shared):
    return digest(shared)


@pytest.fixture(scope="session")
def cifar(shared, tmp_path_factory):
    """Both splits of the CIFAR-10 JPEG copy, decoded once for the session (into a session cache)."""
    cache_dir = tmp_path_factory.mktemp("cifar-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ELBOX_CACHE", str(cache_dir))
        return {s: load_dataset("cifar10", s, data_dir=shared) for s in ("train", "test")}, cache_dir


# --------------------------------------------------------------------------------------------- the standard sets


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_sets_official_splits(shared, shared_digest, name):
    train, test = load_dataset(name, "train", data_dir=shared), load_dataset(name, "test", data_dir=shared)
    for ds, n in ((train, 60_000), (test, 10_000)):
        assert len(ds) == n and ds.shape == (1, 28, 28) and ds.data.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64 and ds.labels.shape == (n,) and len(ds.classes) == 10
        assert ds.split_info == {"method": "official"} and "sha256-verified" in ds.description
    if name == "mnist":
        assert train.labels[:5].tolist() == [5, 0, 4, 1, 9] and test.labels[:5].tolist() == [7, 2, 1, 0, 4]
    else:
        assert train.labels.bincount().tolist() == [6000] * 10 and test.labels.bincount().tolist() == [1000] * 10


def test_cifar10_jpeg_copy_official_splits(cifar):
    (splits, _) = cifar
    for split, n in (("train", 50_000), ("test", 10_000)):
        ds = splits[split]
        assert len(ds) == n and ds.shape == (3, 32, 32) and ds.data.dtype == torch.uint8
        assert ds.labels.bincount().tolist() == [n // 10] * 10
        assert ds.labels[:1000].bincount().min() > 50  # classes mixed: any prefix is a fair sample
        assert ds.description.startswith("CIFAR-10 (JPEG q75 copy)") and ds.classes[0] == "airplane"
        assert ds.split_info == {"method": "official"}


def test_cifar10_from_cache_resized_and_grey(cifar, shared, monkeypatch):
    (splits, cache_dir) = cifar
    monkeypatch.setenv("ELBOX_CACHE", str(cache_dir))
    monkeypatch.setattr(folder, "decode_image", None)  # decoding again would fail: the cache must answer
    ds = load_dataset("cifar10", "test", data_dir=shared, image_size=16, channels=1)
    assert ds.shape == (1, 16, 16) and len(ds) == 10_000
    assert torch.equal(load_dataset("cifar10", "test", data_dir=shared).data, splits["test"].data)


# ------------------------------------------------------------------------------------------------ IDX layouts


def _gunzip(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(gzip.decompress(src.read_bytes()))


def test_idx_layouts_gz_plain_and_torchvision(shared, tmp_path):
    ref = {n: load_dataset(n, "test", data_dir=shared) for n in ("mnist", "fashion-mnist")}
    names = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    layouts = {  # data dir -> (data set, where its files go, gzipped?)
        tmp_path / "flat": ("mnist", tmp_path / "flat", True),
        tmp_path / "plain": ("mnist", tmp_path / "plain" / "mnist", False),
        tmp_path / "tv": ("mnist", tmp_path / "tv" / "MNIST" / "raw", False),
        tmp_path / "tvf": ("fashion-mnist", tmp_path / "tvf" / "FashionMNIST" / "raw", False),
    }
    for root, (name, where, gz) in layouts.items():
        for n in names:
            src = shared / name / f"{n}.gz"
            if gz:
                where.mkdir(parents=True, exist_ok=True)
                shutil.copy(src, where / src.name)
            else:
                _gunzip(src, where / n)
        with untouched(root):
            ds = load_dataset(name, "test", data_dir=root)
        assert torch.equal(ds.data, ref[name].data) and torch.equal(ds.labels, ref[name].labels), root
        assert str(where) in ds.description


def test_idx_env_var_is_the_default_dir(shared, monkeypatch):
    monkeypatch.setenv("ELBOX_DATA", str(shared))
    assert len(load_dataset("mnist", "test")) == 10_000


def test_idx_wrong_checksum_names_the_file(shared, tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    shutil.copy(shared / "mnist" / "t10k-images-idx3-ubyte.gz", d)
    labels = bytearray(gzip.decompress((shared / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[8] = 3  # the first label, 7 in MNIST: still a valid file, but not MNIST's
    (d / "t10k-labels-idx1-ubyte").write_bytes(bytes(labels))
    with untouched(tmp_path):
        with pytest.raises(UserError) as e:
            load_dataset("mnist", "test", data_dir=tmp_path)
        assert str(d / "t10k-labels-idx1-ubyte") in str(e.value) and "sha256" in str(e.value) and "MNIST" in str(e.value)
        assert load_dataset("mnist", "test", data_dir=tmp_path, verify=False).labels[0] == 3


def test_idx_of_another_data_set_is_recognised(shared, tmp_path):
    for f in (shared / "fashion-mnist").glob("t10k-*"):
        (tmp_path / "mnist").mkdir(exist_ok=True)
        shutil.copy(f, tmp_path / "mnist" / f.name)
    with untouched(tmp_path), pytest.raises(UserError, match="Fashion-MNIST's t10k-images-idx3-ubyte"):
        load_dataset("mnist", "test", data_dir=tmp_path)


def test_idx_truncated_files(shared, tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    raw = (shared / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    shutil.copy(shared / "mnist" / "t10k-labels-idx1-ubyte.gz", d)
    (d / "t10k-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with untouched(tmp_path):
        with pytest.raises(UserError, match="t10k-images-idx3-ubyte.gz: cannot decompress"):
            load_dataset("mnist", "test", data_dir=tmp_path)
    (d / "t10k-images-idx3-ubyte.gz").unlink()
    (d / "t10k-images-idx3-ubyte").write_bytes(gzip.decompress(raw)[:-100])
    with untouched(tmp_path):
        with pytest.raises(UserError, match="t10k-images-idx3-ubyte: the header promises 7840000 bytes"):
            load_dataset("mnist", "test", data_dir=tmp_path, verify=False)


# ------------------------------------------------------------------------------------------- offline, downloads


@pytest.mark.parametrize("name, files", [("mnist", ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]),
                                         ("cifar10", ["cifar-10-python.tar.gz"])])
def test_missing_data_offline_names_files_and_folder(tmp_path, monkeypatch, name, files):
    monkeypatch.setitem(dl.MIRRORS, name, ("http://127.0.0.1:9/",))  # the discard port: nothing listens
    for download in (True, None):
        with pytest.raises(UserError) as e:
            load_dataset(name, data_dir=tmp_path, download=download)
        msg = str(e.value)
        assert all(f in msg for f in files) and str(tmp_path / name) in msg
        assert "cannot be downloaded" in msg and "\n" not in msg
    with pytest.raises(UserError, match="download=True"):
        load_dataset(name, data_dir=tmp_path, download=False)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # no partial files left behind


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@contextmanager
def serve(directory: Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


def test_download_verifies_then_renames(shared, tmp_path, monkeypatch):
    with serve(shared / "mnist") as url:
        monkeypatch.setitem(dl.MIRRORS, "mnist", ("http://127.0.0.1:9/", url))  # the first mirror is down
        ds = load_dataset("mnist", "test", data_dir=tmp_path / "data")
    assert torch.equal(ds.data, load_dataset("mnist", "test", data_dir=shared).data)
    got = sorted(p.name for p in (tmp_path / "data" / "mnist").iterdir())
    assert got == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]

    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(shared / "mnist" / "t10k-images-idx3-ubyte.gz", bad)
    labels = bytearray(gzip.decompress((shared / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    labels[100] = (labels[100] + 1) % 10
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes(labels)))
    with serve(bad) as url:
        monkeypatch.setitem(dl.MIRRORS, "mnist", (url,))
        with pytest.raises(UserError, match="downloaded .*t10k-labels-idx1-ubyte.gz, but .*sha256"):
            load_dataset("mnist", "test", data_dir=tmp_path / "data2", download=True)
    assert sorted(p.name for p in (tmp_path / "data2" / "mnist").iterdir()) == ["t10k-images-idx3-ubyte.gz"]


# ------------------------------------------------------------------------------------------- CIFAR-10 pickles


def _write_batches(d: Path, images: np.ndarray, labels: np.ndarray, per_batch: int) -> None:
    """CIFAR-10's python layout, as its authors wrote it (a dict with bytes keys), from real images."""
    d.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        sl = slice(k * per_batch, (k + 1) * per_batch)
        batch = {b"batch_label": name.encode(), b"labels": labels[sl].tolist(),
                 b"data": images[sl].reshape(per_batch, -1), b"filenames": [b"x.png"] * per_batch}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))


def test_cifar10_pickle_batches_and_tarball(cifar, tmp_path):
    (splits, _) = cifar
    x, y = splits["test"].data[:24].numpy(), splits["test"].labels[:24].numpy()
    _write_batches(tmp_path / "p" / "cifar-10-batches-py", x, y, per_batch=4)
    with untouched(tmp_path):
        train = load_dataset("cifar10", "train", data_dir=tmp_path / "p", verify=False)
        test = load_dataset("cifar10", "test", data_dir=tmp_path / "p", verify=False)
        assert torch.equal(train.data, torch.from_numpy(x[:20])) and torch.equal(train.labels, torch.from_numpy(y[:20]))
        assert torch.equal(test.data, torch.from_numpy(x[20:])) and "python batches" in test.description
        with pytest.raises(UserError) as e:  # not the official files: their md5 is checked by default
            load_dataset("cifar10", "train", data_dir=tmp_path / "p")
        assert "data_batch_1" in str(e.value) and "c99cafc152244af753f735de768cd75f" in str(e.value)

    (tmp_path / "t" / "cifar10").mkdir(parents=True)
    with tarfile.open(tmp_path / "t" / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "p" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    with untouched(tmp_path):
        ds = load_dataset("cifar10", "train", data_dir=tmp_path / "t", verify=False)
        assert torch.equal(ds.data, train.data) and "python archive" in ds.description
        with pytest.raises(UserError, match="cifar-10-python.tar.gz: md5 .* not CIFAR-10's c58f30108f718f92721af3b95e74349a"):
            load_dataset("cifar10", "train", data_dir=tmp_path / "t")


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # would create a file if the unpickler ran it


def test_cifar10_pickle_cannot_run_code(cifar, tmp_path):
    (splits, _) = cifar
    d = tmp_path / "cifar-10-batches-py"
    _write_batches(d, splits["test"].data[:6].numpy(), splits["test"].labels[:6].numpy(), per_batch=1)
    marker = tmp_path / "pwned"
    (d / "data_batch_2").write_bytes(pickle.dumps({b"data": _Evil(str(marker)), b"labels": [0]}, protocol=2))
    with pytest.raises(UserError, match=r"data_batch_2: not a readable CIFAR-10 python batch .*refusing to load"):
        load_dataset("cifar10", data_dir=tmp_path, verify=False)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- folder:PATH


def _save(img: Image.Image, path: Path, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


@pytest.fixture
def image_folder(cifar, shared, tmp_path) -> Path:
    """Real images in several formats, modes and sizes, nested, with a non-image file among them."""
    (splits, _) = cifar
    rgb = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in splits["test"].data[:2]]
    digit = Image.fromarray(load_dataset("mnist", "test", data_dir=shared).data[0, 0].numpy(), "L")
    emoji = np.load(shared / "twemoji" / "twemoji-64-rgba.npz")["images"][0]
    assert emoji[0, 0, 3] == 0  # a transparent corner
    pal = Image.new("P", (30, 20), 1)
    pal.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    pal.paste(0, (0, 0, 10, 20))  # the left third uses colour 0, which is transparent
    pal.info["transparency"] = 0
    root = tmp_path / "pics"
    _save(rgb[0], root / "a" / "rgb.jpg", quality=90)
    _save(digit, root / "a" / "b" / "grey.png")
    _save(Image.fromarray(emoji, "RGBA"), root / "c" / "emoji.png")
    _save(pal, root / "c" / "pal.png", transparency=0)
    _save(rgb[1], root / "d.webp", lossless=True)
    (root / "notes.txt").write_text("not an image")
    return root


def test_folder_mixed_sizes_need_an_image_size(image_folder):
    with untouched(image_folder), pytest.raises(UserError) as e:
        load_dataset(f"folder:{image_folder}")
    msg = str(e.value)
    assert "grey.png is 28x28" in msg and "rgb.jpg is 32x32" in msg and "--image-size" in msg


def test_folder_formats_modes_and_transparency(image_folder, cifar):
    (splits, _) = cifar
    with untouched(image_folder):
        tree = folder.decode_tree(image_folder, image_size=32, channels=None, skip_bad=False)
        train, test = (load_dataset(f"folder:{image_folder}", s, image_size=32) for s in ("train", "test"))
    assert tree.paths == ["a/b/grey.png", "a/rgb.jpg", "c/emoji.png", "c/pal.png", "d.webp"]
    assert tree.images.shape == (5, 3, 32, 32) and tree.ignored == 1 and tree.labels is None
    assert len(train) + len(test) == 5 and train.shape == (3, 32, 32) and "1 non-image files ignored" in train.description
    assert np.array_equal(tree.images[4], splits["test"].data[1].numpy())  # lossless WebP at its own size: exact
    assert (tree.images[0][0] == tree.images[0][1]).all()  # grey became RGB by replication
    corner, _ = folder.decode_image(image_folder / "c" / "emoji.png", image_size=None, channels=None)
    assert corner.shape == (64, 64, 3) and (corner[0, 0] == 255).all()  # transparent: the white background
    assert (tree.images[2][:, 0, 0] >= 240).all()  # still near-white after resizing to 32x32
    pal = tree.images[3]  # 30x20 -> center crop 20x20 (x 5..25) -> 32x32; x < 10 was transparent
    assert (pal[:, :, 0] == 255).all() and tuple(pal[:, 16, 31]) == (200, 30, 30)
    grey = load_dataset(f"folder:{image_folder}", "train", image_size=16, channels=1)
    assert grey.shape == (1, 16, 16)


def test_folder_archives_match_the_folder(image_folder, tmp_path):
    ref = folder.decode_tree(image_folder, image_size=24, channels=None, skip_bad=False)
    tgz, zp = tmp_path / "pics.tar.gz", tmp_path / "pics.zip"
    with tarfile.open(tgz, "w:gz") as tf:
        tf.add(image_folder, arcname="pics")
    with zipfile.ZipFile(zp, "w") as zf:
        for p in sorted(image_folder.rglob("*")):
            zf.write(p, p.relative_to(image_folder).as_posix())
    for archive in (tgz, zp):
        with untouched(archive):
            tree = folder.decode_tree(archive, image_size=24, channels=None, skip_bad=False)
        assert np.array_equal(tree.images, ref.images) and tree.ignored == 1
        assert [p.split("/")[-1] for p in tree.paths] == [p.split("/")[-1] for p in ref.paths]
        assert len(load_dataset(f"folder:{archive}", "train", image_size=24)) >= 3


def _spread(cifar_test) -> list[int]:
    """Indices of 40 test images, 4 of each class."""
    return [i for c in range(10) for i in torch.nonzero(cifar_test.labels == c).squeeze(1)[:4].tolist()]


def _class_tree(root: Path, cifar_test, with_split: bool) -> None:
    for k, i in enumerate(_spread(cifar_test)):
        img = Image.fromarray(cifar_test.data[i].permute(1, 2, 0).numpy())
        cls = cifar_test.classes[int(cifar_test.labels[i])]
        split = ("train/" if k % 4 else "test/") if with_split else ""
        _save(img, root / f"{split}{cls}" / f"{i:04d}.png")


def test_folder_class_folders_and_official_split(cifar, tmp_path):
    (splits, _) = cifar
    _class_tree(tmp_path / "top" / "pets", splits["test"], with_split=True)
    with tarfile.open(tmp_path / "pets.tar", "w") as tf:
        tf.add(tmp_path / "top", arcname=".")
    for src in (tmp_path / "top" / "pets", tmp_path / "pets.tar"):
        train, test = (load_dataset(f"folder:{src}", s) for s in ("train", "test"))
        assert len(train) == 30 and len(test) == 10 and train.split_info == {"method": "official"}
        assert train.classes == tuple(sorted(splits["test"].classes))  # sorted folder names
        assert sorted(train.classes[int(c)] for c in test.labels) == sorted(splits["test"].classes)
        for ds in (train, test):  # each image carries the label of its folder
            for x, c in zip(ds.data, ds.labels):
                i = next(i for i in _spread(splits["test"]) if torch.equal(splits["test"].data[i], x))
                assert train.classes[int(c)] == splits["test"].classes[int(splits["test"].labels[i])]


def test_folder_seeded_split_is_stable_and_disjoint(cifar, tmp_path):
    (splits, _) = cifar
    _class_tree(tmp_path / "flat", splits["test"], with_split=False)
    src = f"folder:{tmp_path / 'flat'}"
    train, test = load_dataset(src, "train", seed=4), load_dataset(src, "test", seed=4)
    assert len(train) + len(test) == 40 and len(test) >= 1 and train.split_info["method"] == "seeded"
    rows = {bytes(x.numpy().ravel()) for x in torch.cat([train.data, test.data])}
    assert len(rows) == 40  # disjoint, and together all of them
    assert torch.equal(load_dataset(src, "test", seed=4).data, test.data)
    assert train.labels is not None and train.classes is not None


def test_folder_empty_and_non_image(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=f"no PNG, JPEG or WebP images in {tmp_path / 'empty'}"):
        load_dataset(f"folder:{tmp_path / 'empty'}")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "notes.txt").write_text("hello")
    with untouched(tmp_path / "text"), pytest.raises(UserError, match=r"no PNG, JPEG or WebP images .*1 other file"):
        load_dataset(f"folder:{tmp_path / 'text'}")
    with pytest.raises(UserError, match="notes.txt is not a folder or an archive"):
        load_dataset(f"folder:{tmp_path / 'text' / 'notes.txt'}")
    with pytest.raises(UserError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")
    bad = tmp_path / "fake"
    bad.mkdir()
    (bad / "a.png").write_text("this is text, not a PNG")
    Image.new("RGB", (8, 8)).save(bad / "b.png", format="GIF")  # a GIF with a PNG's name
    with untouched(bad), pytest.raises(UserError, match=f"{bad / 'a.png'}: not a PNG, JPEG or WebP image"):
        load_dataset(f"folder:{bad}")
    (bad / "a.png").unlink()
    with untouched(bad), pytest.raises(UserError, match="b.png: not a PNG, JPEG or WebP"):
        load_dataset(f"folder:{bad}")


def test_folder_corrupt_and_truncated_images(image_folder):
    jpeg = (image_folder / "a" / "rgb.jpg").read_bytes()
    (image_folder / "a" / "trunc.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    with untouched(image_folder), pytest.raises(UserError) as e:
        load_dataset(f"folder:{image_folder}", image_size=32)
    assert str(image_folder / "a" / "trunc.jpg") in str(e.value) and "truncated" in str(e.value).lower()
    assert "--skip-bad" in str(e.value)
    (image_folder / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    with untouched(image_folder):
        with pytest.raises(UserError) as e:  # both unreadable files, in one message
            load_dataset(f"folder:{image_folder}", image_size=32)
        assert str(e.value).startswith("cannot read 2 image file(s): ")
        assert str(image_folder / "a" / "bad.png") in str(e.value) and str(image_folder / "a" / "trunc.jpg") in str(e.value)
        train = load_dataset(f"folder:{image_folder}", "train", image_size=32, skip_bad=True)
        test = load_dataset(f"folder:{image_folder}", "test", image_size=32, skip_bad=True)
    assert train.skipped == ("a/bad.png", "a/trunc.jpg") and "2 unreadable skipped" in train.description
    assert len(train) + len(test) == 5


def test_folder_cache_is_used_and_invalidated(image_folder, monkeypatch, cache_dir):
    real, decoded = folder.decode_image, []

    def counting_decode(*args, **kwargs):
        decoded.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(folder, "decode_image", counting_decode)
    first = load_dataset(f"folder:{image_folder}", "train", image_size=16)
    assert decoded and list((cache_dir / "decoded").glob("*.npz"))
    decoded.clear()
    assert torch.equal(load_dataset(f"folder:{image_folder}", "train", image_size=16).data, first.data)
    assert decoded == []  # the cache answered
    img = image_folder / "d.webp"
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))  # the user touched a file
    assert torch.equal(load_dataset(f"folder:{image_folder}", "train", image_size=16).data, first.data)
    assert decoded  # a stale cache is not used: the folder was decoded again


def test_shared_data_unchanged(shared, shared_digest):
    assert digest(shared) == shared_digest
