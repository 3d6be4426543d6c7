"""Samplers for diffusion models: plain functions that follow the papers' algorithms line by line.

- ``ancestral_sample``: Ho et al. 2020, Algorithm 2.
- ``ddim_sample``: Song, Meng, Ermon 2021, eq. 12, with any number of steps and any eta.

Both are seeded through a ``torch.Generator`` and draw their noise in the same order (x_T first, then one draw per
step but the last), so DDIM with eta = 1 over all T steps reproduces ancestral sampling with Sigma = beta-tilde
draw for draw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
from torch import Tensor, nn

from elbox.draws import randn_from
from elbox.errors import UserError

if TYPE_CHECKING:  # only for annotations: the diffusion (objectives/) imports the samplers, not the other way
    from elbox.objectives.diffusion import GaussianDiffusion

Progress = Callable[[int, int], None]


def ancestral_sample(
    diffusion: GaussianDiffusion,
    net: nn.Module,
    shape: tuple[int, ...],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_denoised: bool = True,
    progress: Progress | None = None,
) -> Tensor:
    """DDPM Algorithm 2: x_T ~ N(0, I); for t = T..1: x_{t-1} = mu_theta(x_t, t) + sigma_t z, z ~ N(0, I) if t > 1."""
    with torch.no_grad():
        device = torch.device(device)
        x = randn_from(generator, shape, device, dtype)
        T = diffusion.num_timesteps
        for i in reversed(range(T)):
            t = torch.full((), i, device=device)  # one t for the batch; a fill, not a host copy
            out = diffusion.p_mean_variance(net, x, t, clip_denoised=clip_denoised)
            if i > 0:
                x = out["mean"] + torch.exp(0.5 * out["log_variance"]) * randn_from(generator, shape, device, dtype)
            else:
                x = out["mean"]  # the last step returns the mean (no noise at t = 1)
            if progress is not None:
                progress(T - i, T)
        return x


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """The sub-sequence tau of timestep indices DDIM visits, evenly spaced over [0, T-1], in decreasing order."""
    if not 1 <= steps <= num_timesteps:
        raise UserError(f"sampling steps={steps} is not allowed; use 1 <= steps <= T={num_timesteps}")
    tau = np.unique(np.linspace(0, num_timesteps - 1, steps).round().astype(np.int64))
    return [int(i) for i in tau[::-1]]


def ddim_sample(
    diffusion: GaussianDiffusion,
    net: nn.Module,
    shape: tuple[int, ...],
    *,
    steps: int | None = None,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    clip_denoised: bool = True,
    progress: Progress | None = None,
) -> Tensor:
    """DDIM (Song et al. eq. 12) over the sub-sequence tau:

    x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev - sigma^2) eps_hat + sigma z,
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)   (eq. 16).

    eta = 0 is the deterministic DDIM; eta = 1 with all T steps is DDPM ancestral sampling with Sigma = beta-tilde.
    """
    with torch.no_grad():
        if eta < 0:
            raise UserError(f"eta={eta} is not allowed; use eta >= 0 (0: deterministic DDIM, 1: DDPM-like)")
        device = torch.device(device)
        T = diffusion.num_timesteps
        tau = ddim_timesteps(T, steps or T)
        abar = diffusion.alphas_cumprod.to(device)
        x = randn_from(generator, shape, device, dtype)
        for k, i in enumerate(tau):
            t = torch.full((), i, device=device)  # one t for the batch; a fill, not a host copy
            out = diffusion.p_mean_variance(net, x, t, clip_denoised=clip_denoised)
            x0_hat = out["pred_x_start"]
            eps_hat = diffusion.predict_noise_from_start(x, t, x0_hat)
            abar_t = abar[i]
            abar_prev = abar[tau[k + 1]] if k + 1 < len(tau) else torch.ones((), dtype=abar.dtype, device=device)
            sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar_t)) * torch.sqrt(1 - abar_t / abar_prev)
            direction = torch.sqrt((1 - abar_prev - sigma**2).clamp(min=0.0))
            x = abar_prev.sqrt().to(x.dtype) * x0_hat + direction.to(x.dtype) * eps_hat
            if k + 1 < len(tau):
                x = x + sigma.to(x.dtype) * randn_from(generator, shape, device, dtype)
            if progress is not None:
                progress(k + 1, len(tau))
        return x
