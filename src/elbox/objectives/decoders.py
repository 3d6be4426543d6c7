"""Decoder likelihoods p_theta(x|z) of the VAE, chosen by name from ``DECODERS``.

A decoder network (``elbox.nets.vae_nets``) maps z to raw parameters with ``params_per_dim`` channels per data
channel; a likelihood here turns those parameters into log p(x|z) in nats (element-wise, so the VAE sums it) and
into the decoder's mean (what ``VAE.sample`` and ``VAE.decode`` show). Each likelihood declares the data range it
models, which is what ``VAE.data_range`` reports:

==========================  ===========  ==========================================================================
name                        data range   p(x|z), per dimension
==========================  ===========  ==========================================================================
``bernoulli``               binary       Bernoulli(sigmoid(logit)); data must lie in [0, 1]
``gaussian``                unit         N(mu, sigma^2), a density on R: fixed, learned global or learned per-pixel
                                         sigma (``sigma_mode``); the normalising constant is included, so the
                                         ELBO is a true bound in nats (of a density, not of 8-bit data)
``discretized-gaussian``    symmetric    N(mu, sigma^2) integrated over the 256 bins of the 8-bit grid on [-1, 1],
                                         edge bins taking the tails (Ho et al. 2020, eq. 13)
``discretized-logistic``    symmetric    Logistic(mu, s) integrated over the same bins (Salimans et al. 2017,
                                         PixelCNN++, one mixture component)
==========================  ===========  ==========================================================================

The discretized decoders give a probability mass on 8-bit data, so their negative ELBO in bits/dim is directly
comparable with a DDPM's.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.draws import rand_from, randn_from
from elbox.errors import UserError
from elbox.objectives.gaussian import discretized_gaussian_log_likelihood, gaussian_log_prob, log1mexp

#: the smallest log-scale a learned scale may take (e^-7 ~ 1e-3), so that a decoder on constant pixels (MNIST's
#: border) cannot drive its density to infinity and overflow; the same floor as PixelCNN++'s logistic mixture.
MIN_LOG_SCALE = -7.0

#: the 8-bit grid on [-1, 1]: 256 levels, so neighbouring levels are 2/255 apart
BINS = 256


def check_on_grid(x: Tensor, who: str) -> None:
    """Raise UserError unless x lies on the 8-bit grid of [-1, 1] (k/127.5 - 1, k = 0..255): a discrete likelihood
    of other values is a likelihood of nothing (a [0, 1] image, k/255, is half off this grid, and its bits/dim
    would look plausible). The grid is checked as far as x's precision holds it (bfloat16 cannot: its spacing near
    1 is a level's). One read back of three numbers."""
    if x.numel() == 0:
        return
    u = (x.detach().double() + 1.0) * ((BINS - 1) / 2)  # in levels: whole numbers on the grid
    lo, hi, off = torch.stack([x.detach().min().double(), x.detach().max().double(),
                               (u - u.round()).abs().max()]).tolist()
    tolerance = max(1e-3, torch.finfo(x.dtype).eps * (BINS - 1))  # two ulps near 1, in levels
    if lo >= -1.0 and hi <= 1.0 and off <= tolerance:
        return
    if not all(map(math.isfinite, (lo, hi, off))):
        got = "non-finite values (NaN or Inf)"
    elif lo < -1.0 or hi > 1.0:
        got = f"values in [{lo:g}, {hi:g}]"
    else:
        got = f"values in [{lo:g}, {hi:g}], off the grid by up to {off:.2g} of a level"
    hint = "; a [0, 1] image x (k/255) maps onto it by x * 2 - 1" if lo >= 0.0 and hi <= 1.0 else ""
    raise UserError(f"{who} models 8-bit data on the grid of [-1, 1] (k/127.5 - 1, k = 0..255); got {got}; "
                    f"elbox.data.transforms.to_model(images, 'symmetric') makes such a batch from uint8 images{hint}")


def discretized_logistic_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bins: int = BINS) -> Tensor:
    """log P(x) of a Logistic(mean, e^log_scale) discretized to ``bins`` levels on [-1, 1], element-wise.

    Like ``discretized_gaussian_log_likelihood``: level x owns [x - h, x + h] with h = 1/(bins-1), and the two edge
    levels own the tails, so the probabilities of all levels sum to one. With a = (x - h - mean)/s and
    b = (x + h - mean)/s the interior mass is sigmoid(b) - sigmoid(a) = sigmoid(a) sigmoid(-b) (e^(b-a) - 1),
    whose log is computed without cancellation for every a < b.
    """
    half = 1.0 / (bins - 1)
    inv_scale = torch.exp(-log_scale)
    a = (x - half - mean) * inv_scale
    b = (x + half - mean) * inv_scale
    d = b - a  # = 2h/s > 0
    log_expm1_d = d + log1mexp(-d)  # log(e^d - 1), finite for every d > 0
    interior = -F.softplus(-a) - F.softplus(b) + log_expm1_d
    lowest = -F.softplus(-b)  # log sigmoid(b): the bin (-inf, -1 + h]
    highest = -F.softplus(a)  # log(1 - sigmoid(a)): the bin [1 - h, inf)
    return torch.where(x < -1.0 + half / 2, lowest, torch.where(x > 1.0 - half / 2, highest, interior))


class Likelihood(nn.Module):
    """p_theta(x|z) given the decoder network's raw output ``params`` of shape (N, params_per_dim * C, ...)."""

    name: ClassVar[str]
    #: the data range this likelihood models: "binary", "unit" or "symmetric" (see ``ELBOModel.data_range``)
    data_range: ClassVar[str]
    #: the interval that range maps to, for checks and for clamping means
    low: ClassVar[float]
    high: ClassVar[float]

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    @property
    def params_per_dim(self) -> int:
        return 1

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        """log p(x|z) in nats, element-wise: the shape of x."""
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:
        """The decoder's mean, in the data range; the shape of x."""
        raise NotImplementedError

    def draw(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """One sample x ~ p(x|z) per parameter set (for autoregressive decoding, which feeds samples back)."""
        raise NotImplementedError

    def check_data(self, x: Tensor) -> None:
        """Raise UserError if x lies outside this likelihood's data range (a cheap min/max check)."""
        lo, hi = float(x.min()), float(x.max())
        if lo < self.low or hi > self.high:
            raise UserError(
                f"the {self.name} decoder models data in [{self.low:g}, {self.high:g}] (data range "
                f"'{self.data_range}'); got values in [{lo:g}, {hi:g}]"
            )


class Bernoulli(Likelihood):
    """log p(x|z) = x log p + (1 - x) log(1 - p) with p = sigmoid(logit) (Kingma & Welling 2014, appendix C.1).

    Normalised over x in {0, 1}; values in between are accepted (the usual "continuous" use on grey MNIST) but are
    then not a likelihood of anything, so binarize the data for numbers you report.
    """

    name = "bernoulli"
    data_range = "binary"
    low, high = 0.0, 1.0

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none")

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def draw(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        p = torch.sigmoid(params)
        return (rand_from(generator, p.shape, p.device, p.dtype) < p).to(p.dtype)  # u < p is Bernoulli(p)


class LocationScale(Likelihood):
    """A likelihood with a location (the network's output) and a scale sigma, fixed or learned.

    ``sigma_mode``: "fixed" (sigma = ``sigma``), "learned" (one global log sigma, initialised at log ``sigma``) or
    "learned-pixel" (the network outputs a second channel per data channel: log sigma - log ``sigma``, so a fresh
    network starts near ``sigma``). Learned log-scales are floored at ``MIN_LOG_SCALE``.
    """

    def __init__(self, channels: int, sigma_mode: str, sigma: float) -> None:
        super().__init__(channels)
        self.sigma_mode = sigma_mode
        self.log_sigma0 = math.log(sigma)
        if sigma_mode == "learned":
            self.log_sigma = nn.Parameter(torch.tensor(self.log_sigma0))

    @property
    def params_per_dim(self) -> int:
        return 2 if self.sigma_mode == "learned-pixel" else 1

    def split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        """(location, log sigma) from the network output, both broadcastable to the shape of x."""
        if self.sigma_mode == "learned-pixel":
            loc, raw = params.split(self.channels, dim=1)
            return loc, torch.clamp(raw + self.log_sigma0, min=MIN_LOG_SCALE)
        if self.sigma_mode == "learned":
            return params, torch.clamp(self.log_sigma, min=MIN_LOG_SCALE).to(params.dtype)
        return params, torch.full((), self.log_sigma0, dtype=params.dtype, device=params.device)

    def mean(self, params: Tensor) -> Tensor:
        """The location; the discretized decoders clamp it to [-1, 1], where their edge bins put its mass."""
        return torch.clamp(self.split(params)[0], self.low, self.high)

    def noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        """Standard noise of this family (normal; logistic for the logistic decoder)."""
        return randn_from(generator, like.shape, like.device, like.dtype)

    def draw(self, params: Tensor, generator: torch.Generator | None = None) -> Tensor:
        loc, log_sigma = self.split(params)
        x = loc + torch.exp(log_sigma) * self.noise(loc, generator)
        if self.data_range == "symmetric":  # the discretized decoders: the nearest of the 256 levels
            x = torch.round((torch.clamp(x, -1.0, 1.0) + 1.0) * (BINS - 1) / 2.0) * 2.0 / (BINS - 1) - 1.0
        return x


class Gaussian(LocationScale):
    """log N(x; mu, sigma^2) = -(x - mu)^2 / (2 sigma^2) - 1/2 log(2 pi sigma^2) per dimension.

    Summed over the D dimensions this is -||x - mu||^2 / (2 sigma^2) - D/2 log(2 pi sigma^2) (Kingma & Welling
    2014, appendix C.2): the second term is the normalising constant many implementations drop; keeping it makes
    the ELBO a bound on log p(x) in nats. It is a density, so on 8-bit data it is not comparable with the
    discretized decoders. Images come in [0, 1] ("unit"), but any real data is accepted (vectors, say): the mean
    is the network output itself, unconstrained (``VAE.decode`` clamps it to [0, 1] only for images).
    """

    name = "gaussian"
    data_range = "unit"
    low, high = 0.0, 1.0

    def check_data(self, x: Tensor) -> None:
        """A density on all of R: any finite data will do."""

    def mean(self, params: Tensor) -> Tensor:
        return self.split(params)[0]

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        loc, log_sigma = self.split(params)
        return gaussian_log_prob(x, loc, 2.0 * log_sigma)


class Discretized(LocationScale):
    """A location-scale density integrated over the 8-bit bins of [-1, 1]: its data must lie on that grid."""

    data_range = "symmetric"
    low, high = -1.0, 1.0

    def check_data(self, x: Tensor) -> None:
        check_on_grid(x, f"the {self.name} decoder")


class DiscretizedGaussian(Discretized):
    """The Gaussian integrated over the 8-bit bins of [-1, 1] (``discretized_gaussian_log_likelihood``)."""

    name = "discretized-gaussian"

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        loc, log_sigma = self.split(params)
        return discretized_gaussian_log_likelihood(x, loc, log_sigma.expand_as(x), bins=BINS)


class DiscretizedLogistic(Discretized):
    """The logistic integrated over the 8-bit bins of [-1, 1] (``discretized_logistic_log_likelihood``)."""

    name = "discretized-logistic"

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        loc, log_sigma = self.split(params)
        return discretized_logistic_log_likelihood(x, loc, log_sigma.expand_as(x), bins=BINS)

    def noise(self, like: Tensor, generator: torch.Generator | None) -> Tensor:
        u = rand_from(generator, like.shape, like.device, like.dtype)
        u = u.clamp(1e-6, 1.0 - 1e-6)
        return torch.log(u) - torch.log1p(-u)  # the logistic quantile function


DECODERS: dict[str, type[Likelihood]] = {
    cls.name: cls for cls in (Bernoulli, Gaussian, DiscretizedGaussian, DiscretizedLogistic)
}


def build_likelihood(name: str, channels: int, sigma_mode: str, sigma: float) -> Likelihood:
    """The likelihood registered as ``name`` for data with ``channels`` channels (names are checked by VAEConfig)."""
    cls = DECODERS[name]
    if issubclass(cls, LocationScale):
        return cls(channels, sigma_mode, sigma)
    return cls(channels)
