"""The samplers against the papers' algorithms written out again here, step by step, from the same draws.

``ancestral_sample`` is Ho et al.'s Algorithm 2 and ``ddim_sample`` Song et al.'s eq. 12 with sigma from eq. 16.
The reference loops below use the schedule computed independently in numpy and a denoiser whose output is a fixed
function of (x_t, t), and draw their noise from a generator seeded alike, in the order the samplers promise: x_T
first, then one draw per step but the last.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from elbox.errors import UserError
from elbox.objectives.diffusion import GaussianDiffusion
from elbox.samplers import ancestral_sample, ddim_sample

T = 12
SHAPE = (2, 3, 4, 4)  # batch 2, 3 channels: batch and channel sizes differ on purpose


class AffineEps(nn.Module):
    """eps_theta(x_t, t) = 0.3 x_t + 0.01 (t + 1): a fixed, t-dependent 'network'."""

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == () and t.dtype == torch.long  # a sampler step: one t, shared by the batch
        return 0.3 * x_t + 0.01 * (t.to(x_t.dtype) + 1).view(-1, 1, 1, 1)


def schedule():
    betas = np.linspace(1e-4, 0.2, T)  # large betas, so that T = 12 steps go somewhere
    abar = np.cumprod(1 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    return betas, abar, abar_prev


def diffusion(var_type="fixed_small") -> GaussianDiffusion:
    return GaussianDiffusion(schedule()[0], var_type=var_type, loss_type="simple").double()


def x0_from_eps(x, i, eps, abar):
    return (x - math.sqrt(1 - abar[i]) * eps) / math.sqrt(abar[i])


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_ancestral_sampling_is_algorithm_2(var_type):
    betas, abar, abar_prev = schedule()
    beta_tilde = betas * (1 - abar_prev) / (1 - abar)
    sigma2 = beta_tilde.copy() if var_type == "fixed_small" else betas.copy()
    sigma2[0] = beta_tilde[1]  # the t = 1 variance is clipped / beta-tilde_2 (only its log is used, no noise added)
    net = AffineEps()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(SHAPE, generator=g).double()
    for i in reversed(range(T)):
        eps = net(x, torch.tensor(i))
        x0 = x0_from_eps(x, i, eps, abar).clamp(-1, 1)
        # the posterior mean at the predicted x_0 (Ho eq. 7); with no clipping it is eq. 11's mean
        mean = (math.sqrt(abar_prev[i]) * betas[i] / (1 - abar[i]) * x0
                + math.sqrt(1 - betas[i]) * (1 - abar_prev[i]) / (1 - abar[i]) * x)
        x = mean + math.sqrt(sigma2[i]) * torch.randn(SHAPE, generator=g).double() if i > 0 else mean
    progress = []
    got = ancestral_sample(diffusion(var_type), net, SHAPE, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64, progress=lambda k, n: progress.append((k, n)))
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)
    assert progress == [(k, T) for k in range(1, T + 1)]


@pytest.mark.parametrize("steps,eta", [(T, 0.0), (5, 0.0), (5, 0.7), (1, 0.5), (4, 1.0)])
def test_ddim_is_song_et_al_eq_12(steps, eta):
    """x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z,
    sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev)  (eq. 16), over tau evenly spaced."""
    _, abar, _ = schedule()
    tau = sorted({int(round(v)) for v in np.linspace(0, T - 1, steps)}, reverse=True)
    net = AffineEps()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(SHAPE, generator=g).double()
    for k, i in enumerate(tau):
        eps = net(x, torch.tensor(i))
        x0 = x0_from_eps(x, i, eps, abar).clamp(-1, 1)
        eps = (x - math.sqrt(abar[i]) * x0) / math.sqrt(1 - abar[i])  # eps consistent with the clipped x_0
        a_prev = abar[tau[k + 1]] if k + 1 < len(tau) else 1.0
        sigma = eta * math.sqrt((1 - a_prev) / (1 - abar[i])) * math.sqrt(1 - abar[i] / a_prev)
        x = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps
        if k + 1 < len(tau):
            x = x + sigma * torch.randn(SHAPE, generator=g).double()
    gen = torch.Generator().manual_seed(4)
    progress = []
    got = ddim_sample(diffusion(), net, SHAPE, steps=steps, eta=eta, generator=gen, dtype=torch.float64,
                      progress=lambda k, n: progress.append((k, n)))
    torch.testing.assert_close(got, x, rtol=1e-10, atol=1e-10)
    # exactly one draw for x_T and one per step but the last: the generator is where the reference left g
    assert torch.equal(gen.get_state(), g.get_state())
    assert progress == [(k, len(tau)) for k in range(1, len(tau) + 1)]


def test_ddim_defaults_are_deterministic_and_clipped_and_eta_is_checked():
    d, net = diffusion(), AffineEps()
    a = ddim_sample(d, net, SHAPE, steps=4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    b = ddim_sample(d, net, SHAPE, steps=4, eta=0.0, clip_denoised=True, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    c = ddim_sample(d, net, SHAPE, steps=4, eta=0.0, clip_denoised=False, generator=torch.Generator().manual_seed(1),
                    dtype=torch.float64)
    assert not torch.allclose(a, c)  # clipping x_0 matters for this denoiser, so the default is seen
    with pytest.raises(UserError, match=r"eta=-0.5 is not allowed; use eta >= 0 \(0: deterministic DDIM"):
        ddim_sample(d, net, SHAPE, eta=-0.5)
