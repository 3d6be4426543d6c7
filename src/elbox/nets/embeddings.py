"""The sinusoidal timestep embedding shared by the U-Net and the MLP denoiser.

Ho et al. (2020), appendix B: "Diffusion time t is specified by adding the Transformer sinusoidal position
embedding into each residual block." The frequencies are those of Vaswani et al. (2017), section 3.5,
PE(t, 2i) = sin(t / max_period^(2i/dim)), with the sines first and the cosines second, as in the DDPM code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Embed timesteps t of shape (B,) (integer or real) as a (B, dim) float32 tensor [sin(t w), cos(t w)].

    The frequencies w_i = max_period^(-i / (dim // 2)) run geometrically from 1 down towards 1 / max_period.
    An odd ``dim`` gets one zero column at the end.
    """
    half = dim // 2
    exponents = torch.arange(half, device=t.device, dtype=torch.float32) / half
    freqs = torch.exp(-math.log(max_period) * exponents)
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
