"""Gaussian densities and divergences shared by the VAE and the DDPM, in nats, element-wise."""

from __future__ import annotations

import math

import torch
from torch import Tensor

LOG_2PI = math.log(2.0 * math.pi)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), element-wise, in nats.

    KL = 1/2 (log s2^2/s1^2 + (s1^2 + (m1 - m2)^2) / s2^2 - 1).
    """
    return 0.5 * (logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0)


def standard_normal_kl(mean: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mean, e^logvar) || N(0, 1)) = -1/2 (1 + log s^2 - m^2 - s^2), element-wise (Kingma & Welling, App. B)."""
    return -0.5 * (1.0 + logvar - mean**2 - torch.exp(logvar))


def gaussian_log_prob(x: Tensor, mean: Tensor, logvar: Tensor) -> Tensor:
    """log N(x; mean, e^logvar), element-wise, in nats (a continuous density)."""
    return -0.5 * (LOG_2PI + logvar + (x - mean) ** 2 * torch.exp(-logvar))


def log1mexp(a: Tensor) -> Tensor:
    """log(1 - e^a) for a < 0, accurate over the whole range (Maechler 2012).

    Each branch sees only inputs from its own range, so neither can send a NaN gradient through torch.where.
    """
    near_zero = a > -math.log(2.0)
    a_near = torch.where(near_zero, a, torch.full_like(a, -1.0))
    a_far = torch.where(near_zero, torch.full_like(a, -1.0), a)
    return torch.where(near_zero, torch.log(-torch.expm1(a_near)), torch.log1p(-torch.exp(a_far)))


def log_normal_interval(lo: Tensor, hi: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for lo < hi, with Phi the standard normal CDF; -inf and +inf ends allowed.

    Computed in whichever tail is accurate: for lo > 0 the interval is reflected (Phi(hi) - Phi(lo) =
    Phi(-lo) - Phi(-hi)) so that log_ndtr never has to resolve a difference of two numbers close to one. Computed
    in float64 whatever the inputs' dtype: in float32, log_ndtr's gradient is inaccurate and then non-finite far in
    the tail (|x - mean| / sigma beyond ~10^3, a pixel scale at its floor).
    """
    dtype = lo.dtype
    lo, hi = lo.double(), hi.double()
    flip = lo > 0
    a = torch.where(flip, -hi, lo)
    b = torch.where(flip, -lo, hi)
    log_b = torch.special.log_ndtr(b)
    log_a = torch.special.log_ndtr(a)
    return (log_b + log1mexp(torch.clamp(log_a - log_b, max=-1e-30))).to(dtype)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor, bins: int = 256) -> Tensor:
    """log P(x) of a Gaussian N(mean, e^(2 log_scale)) discretized to ``bins`` levels on [-1, 1], element-wise.

    The data x must lie on the grid {-1 + 2k/(bins-1)}; each level owns the interval of half-width 1/(bins-1)
    around it, and the two edge levels own the tails to -inf and +inf, so the probabilities of all levels sum to
    one (Ho et al. 2020, eq. 13, the L_0 decoder).
    """
    half = 1.0 / (bins - 1)
    inv_std = torch.exp(-log_scale)
    lo = torch.where(x < -1.0 + half / 2, torch.full_like(x, -math.inf), (x - half - mean) * inv_std)
    hi = torch.where(x > 1.0 - half / 2, torch.full_like(x, math.inf), (x + half - mean) * inv_std)
    return log_normal_interval(lo, hi)
