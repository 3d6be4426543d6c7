"""elbox.data without data files: the registry, digits, transforms, toy2d densities and the in-memory loader."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from elbox.data import (
    DATASETS,
    DEFAULT_DATASET,
    Dataset,
    InMemoryLoader,
    from_model,
    known_names,
    load_dataset,
    to_model,
    toy2d,
)
from elbox.errors import UserError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ELBOX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ELBOX_DATA", raising=False)


# ------------------------------------------------------------------------------------------- registry and digits


def test_registry_names():
    assert DEFAULT_DATASET == "digits" and DEFAULT_DATASET in DATASETS
    names = known_names()
    for n in ("mnist", "fashion-mnist", "cifar10", "toy2d:8gaussians", "toy2d:moons", "toy2d:swissroll", "toy2d:checkerboard"):
        assert n in names
    assert names[-1] == "folder:PATH"


def test_digits_default_values_and_seeded_split():
    from sklearn.datasets import load_digits

    train, test = load_dataset(DEFAULT_DATASET, "train"), load_dataset(DEFAULT_DATASET, "test")
    assert isinstance(train, Dataset) and train.kind == "image" and train.shape == (1, 8, 8)
    assert train.data.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert len(train) + len(test) == 1797
    assert 0.07 < len(test) / 1797 < 0.13
    assert train.split_info["method"] == "seeded" and "seed 0" in train.description
    # the values are round(v * 255 / 16) of scikit-learn's 0..16 images, and the two splits partition them
    digits = load_digits()
    ref = {bytes(np.rint(im * 255 / 16).astype(np.uint8).ravel()) for im in digits.images}
    got = [bytes(x.numpy().ravel()) for x in torch.cat([train.data, test.data])]
    assert set(got) == ref
    # the copy elbox ships is scikit-learn's, image for image and label for label, in the same order
    from elbox.data import embedded

    images, labels = embedded._digits()
    assert np.array_equal(images[:, 0], np.rint(digits.images * 255 / 16).astype(np.uint8))
    assert np.array_equal(labels, digits.target)
    assert int(train.data.max()) == 255
    # same seed, same split; another seed, another split
    assert torch.equal(load_dataset("digits", "test").data, test.data)
    other = load_dataset("digits", "test", seed=1)
    assert not (len(other) == len(test) and torch.equal(other.data, test.data))


def test_digits_resized_and_converted():
    ds = load_dataset("digits", image_size=16, channels=3)
    assert ds.shape == (3, 16, 16) and ds.data.dtype == torch.uint8
    assert torch.equal(ds.data[:, 0], ds.data[:, 2])  # grey replicated
    assert "resized to 16x16" in ds.description and "converted to 3 channels" in ds.description


def test_unknown_name_lists_known_ones():
    with pytest.raises(UserError) as e:
        load_dataset("mnsit")
    msg = str(e.value)
    assert "'mnsit'" in msg and "did you mean 'mnist'" in msg
    for n in ("digits", "cifar10", "toy2d:moons", "folder:PATH"):
        assert n in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="toy2d:swissroll"):
        load_dataset("toy2d:spiral")


def test_bad_options():
    with pytest.raises(UserError, match="split 'val'"):
        load_dataset("digits", "val")
    with pytest.raises(UserError, match="channels must be 1"):
        load_dataset("digits", channels=4)
    with pytest.raises(UserError, match="image size"):
        load_dataset("digits", image_size=0)
    with pytest.raises(UserError, match="vector data"):
        load_dataset("toy2d:moons", image_size=32)
    with pytest.raises(UserError, match="no known density"):
        load_dataset("digits").log_density(torch.zeros(1, 2))


def test_a_path_without_folder_prefix_gets_a_hint(tmp_path):
    with pytest.raises(UserError, match=f"folder:{tmp_path}"):
        load_dataset(str(tmp_path))


# ------------------------------------------------------------------------------------------------------ transforms


def test_to_model_and_back_round_trips_every_uint8_value():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    for data_range, lo, hi in (("symmetric", -1.0, 1.0), ("unit", 0.0, 1.0)):
        y = to_model(x, data_range)
        assert y.dtype == torch.float32 and y.min() == lo and y.max() == hi
        assert torch.equal(from_model(y, data_range), x)
    assert torch.allclose(to_model(x, "symmetric"), x.float() / 127.5 - 1)


def test_binary_is_a_seeded_bernoulli_draw():
    x = torch.full((2000, 1, 4, 4), 64, dtype=torch.uint8)
    a = to_model(x, "binary", generator=torch.Generator().manual_seed(0))
    b = to_model(x, "binary", generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and set(a.unique().tolist()) <= {0.0, 1.0}
    assert abs(a.mean().item() - 64 / 255) < 0.01
    assert torch.equal(to_model(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), "binary"), torch.tensor([[[[0.0, 1.0]]]]))


def test_from_model_clamps_and_vectors_pass_through():
    assert from_model(torch.tensor([-3.0, -1.0, 0.0, 1.0, 7.0]), "symmetric").tolist() == [0, 0, 128, 255, 255]
    assert from_model(torch.tensor([-0.5, 0.5, 2.0]), "unit").tolist() == [0, 128, 255]
    v = torch.randn(5, 2)
    assert to_model(v, "symmetric") is v
    with pytest.raises(UserError, match="data range"):
        to_model(v, "minus-one-to-one")


# ----------------------------------------------------------------------------------------------------------- toy2d


def _grid(lo: float, hi: float, h: float) -> tuple[torch.Tensor, float]:
    c = torch.arange(lo + h / 2, hi, h, dtype=torch.float64)  # cell midpoints
    xx, yy = torch.meshgrid(c, c, indexing="ij")
    return torch.stack([xx.ravel(), yy.ravel()], -1), h * h


@pytest.mark.parametrize("name", toy2d.NAMES)
def test_toy2d_density_integrates_to_one_and_matches_samples(name):
    train, test = load_dataset(f"toy2d:{name}"), load_dataset(f"toy2d:{name}", "test")
    assert train.kind == "vector" and train.shape == (2,) and len(train) == 50_000 and len(test) == 10_000
    assert train.data.dtype == torch.float32
    grid, area = _grid(-5.0, 5.0, 0.0625)  # the midpoint rule is spectrally accurate for h << sigma = 0.2
    logp = train.log_density(grid)
    p = logp.exp()
    assert logp.dtype == torch.float64
    assert abs(p.sum().item() * area - 1.0) < 2e-3
    # E_p[log p] (the negative entropy) from the grid vs the mean log-density of the samples
    neg_entropy = (p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum().item() * area
    lp = test.log_density(test.data)
    assert torch.isfinite(lp).all()
    se = lp.std().item() / math.sqrt(len(lp))
    assert abs(lp.mean().item() - neg_entropy) < max(4 * se, 1e-3), (lp.mean().item(), neg_entropy)


def test_toy2d_is_seeded():
    a, b = load_dataset("toy2d:moons"), load_dataset("toy2d:moons")
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, load_dataset("toy2d:moons", seed=1).data)
    assert not torch.equal(a.data[:100], load_dataset("toy2d:moons", "test").data[:100])


def test_eight_gaussians_matches_torch_distributions():
    d = torch.distributions
    mix = d.MixtureSameFamily(
        d.Categorical(torch.ones(8, dtype=torch.float64)),
        d.Independent(d.Normal(toy2d._eight_centres(), torch.full((8, 2), toy2d.SIGMA_8G, dtype=torch.float64)), 1),
    )
    x = torch.randn(500, 2, dtype=torch.float64) * 3
    assert torch.allclose(toy2d.log_prob("8gaussians", x), mix.log_prob(x), atol=1e-10)


def test_checkerboard_density_is_exact():
    x = torch.tensor([[0.5, 0.5], [2.5, 0.5], [-3.5, -3.5], [4.5, 0.0], [-1.0, -1.0]])
    lp = toy2d.log_prob("checkerboard", x)
    assert lp[0] == -math.log(32) and lp[2] == -math.log(32) and lp[4] == -math.log(32)
    assert lp[1] == -math.inf and lp[3] == -math.inf
    assert (load_dataset("toy2d:checkerboard").log_density(load_dataset("toy2d:checkerboard").data) == -math.log(32)).all()


@pytest.mark.parametrize("name", ["moons", "swissroll"])
def test_curve_quadrature_has_converged(name):
    x = load_dataset(f"toy2d:{name}", "test").data[:2000]
    fine = toy2d.gaussian_mixture_log_prob(x, *toy2d._quadrature(name, 4), toy2d.SIGMA_CURVE)
    assert (toy2d.log_prob(name, x) - fine).abs().max() < 1e-6
    far = torch.tensor([[0.0, 30.0]])  # far from the curve: finite, very negative
    assert torch.isfinite(toy2d.log_prob(name, far)).all() and toy2d.log_prob(name, far).item() < -1000


# ---------------------------------------------------------------------------------------------------------- loader


def _images(n: int = 103) -> torch.Tensor:
    x = torch.arange(n * 3 * 4 * 5, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, 3, 4, 5)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)  # each image names itself
    return x


def _ids(batch: torch.Tensor) -> list[int]:
    return batch[:, 0, 0, 0].tolist()


def test_loader_epoch_covers_every_example_once():
    x = _images(103)
    loader = InMemoryLoader(x, 10, drop_last=False, seed=3)
    assert len(loader) == 11
    batches = list(loader)
    assert [len(b) for b in batches] == [10] * 10 + [3]
    assert sorted(sum((_ids(b) for b in batches), [])) == list(range(103))
    assert batches[0].dtype == torch.uint8 and loader.epoch == 1 and loader.position == 0
    dropped = InMemoryLoader(x, 10, drop_last=True)
    assert len(dropped) == 10 and all(len(b) == 10 for b in dropped)
    ordered = InMemoryLoader(x, 10, shuffle=False, drop_last=False)
    assert sum((_ids(b) for b in ordered), []) == list(range(103))


def test_loader_order_is_a_pure_function_of_seed_and_epoch():
    x = _images()
    a, b = InMemoryLoader(x, 8, seed=5), InMemoryLoader(x, 8, seed=5)
    epochs_a = [[_ids(t) for t in a] for _ in range(3)]
    assert epochs_a == [[_ids(t) for t in b] for _ in range(3)]
    assert epochs_a[0] != epochs_a[1]
    c = InMemoryLoader(x, 8, seed=5)
    c.set_epoch(2)
    assert [_ids(t) for t in c] == epochs_a[2]
    assert [_ids(t) for t in InMemoryLoader(x, 8, seed=6)] != epochs_a[0]


@pytest.mark.parametrize("drop_last", [True, False])
def test_loader_shards_are_disjoint_and_equal(drop_last):
    x, world = _images(103), 4
    loaders = [InMemoryLoader(x, 5, seed=1, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    for epoch in range(2):
        shards = [loader.epoch_indices(epoch).tolist() for loader in loaders]
        assert len({len(s) for s in shards}) == 1
        flat = sum(shards, [])
        if drop_last:
            assert len(flat) == 100 and len(set(flat)) == 100  # disjoint; 3 dropped
        else:
            assert len(flat) == 104 and set(flat) == set(range(103))  # every example; 1 padded by wrapping
        assert sum((_ids(b) for b in loaders[0]), []) == shards[0]  # what rank 0 iterates is its shard


def test_loader_resume_is_exact_with_flips():
    x, labels = _images(50), torch.arange(50)
    ref = InMemoryLoader(x, 7, seed=9, hflip=True, labels=labels)
    stream = [(a.clone(), y.clone()) for _ in range(3) for a, y in ref]
    for stop in (0, 3, 6, 7, 10, 13):  # 7 batches per epoch: 6 is an epoch's last batch
        run = InMemoryLoader(x, 7, seed=9, hflip=True, labels=labels)
        it = run.forever()
        for _ in range(stop + 1):
            next(it)
        state = run.state_dict()
        resumed = InMemoryLoader(x, 7, seed=0, hflip=True, labels=labels)
        resumed.load_state_dict(state)  # the seed comes from the state
        rest = resumed.forever()
        for want in stream[stop + 1 : stop + 9]:
            got = next(rest)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_loader_flips_are_horizontal_and_seeded():
    x, labels = _images(64), torch.arange(64)
    loader = InMemoryLoader(x, 64, seed=2, hflip=True, labels=labels)
    flipped = 0
    for xb, yb in loader:
        for img, i in zip(xb, yb):
            if torch.equal(img, x[i]):
                continue
            assert torch.equal(img, x[i].flip(-1))
            flipped += 1
    assert 16 < flipped < 48
    again = InMemoryLoader(x, 64, seed=2, hflip=True)
    assert torch.equal(next(iter(again)), next(iter(InMemoryLoader(x, 64, seed=2, hflip=True))))
    assert not torch.equal(next(iter(again)), next(iter(InMemoryLoader(x, 64, seed=2, hflip=True))))  # next epoch


def test_loader_labels_follow_examples_and_vectors_work():
    ds = load_dataset("toy2d:8gaussians", "test")
    loader = InMemoryLoader(ds.data, 256, labels=ds.labels, seed=0)
    xb, yb = next(iter(loader))
    assert xb.dtype == torch.float32 and xb.shape == (256, 2) and yb.shape == (256,)
    centres = toy2d._eight_centres().float()
    assert ((xb - centres[yb]).norm(dim=1) < 6 * toy2d.SIGMA_8G).all()
    with pytest.raises(UserError, match="flips apply to images"):
        InMemoryLoader(ds.data, 256, hflip=True)


def test_loader_bad_settings():
    x = _images(20)
    with pytest.raises(UserError, match="at most 20"):
        InMemoryLoader(x, 32)
    with pytest.raises(UserError, match="at most 5"):
        InMemoryLoader(x, 8, world_size=4, rank=1)
    state = InMemoryLoader(x, 4).state_dict()
    with pytest.raises(UserError, match="batch_size=4"):
        InMemoryLoader(x, 5).load_state_dict(state)
