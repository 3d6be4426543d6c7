"""A time-conditioned MLP denoiser for vector data (the 2-D toy distributions).

The vector analogue of the U-Net of Ho et al. (2020), appendix B: the timestep enters through the Transformer
sinusoidal embedding, passed through a small MLP and added to the hidden state before every layer, as the U-Net
adds it inside every residual block. Like every elbox net it knows nothing of noise schedules.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from elbox.errors import UserError
from elbox.nets.embeddings import timestep_embedding


class MLPDenoiser(nn.Module):
    """``forward(x_t, t)``: (B, dim), (B,) -> (B, out_dim), through ``depth`` residual SiLU layers of width ``hidden``.

    h = W_in x;  for each layer: h = h + W_l SiLU(h + e(t));  out = W_out SiLU(h), with W_out zero-initialised so
    the denoiser starts by predicting 0 (as the U-Net's final convolution does).
    """

    def __init__(self, *, dim: int, out_dim: int, hidden: int = 256, depth: int = 3, time_dim: int = 64) -> None:
        super().__init__()
        for name, value in [
            ("dim", dim),
            ("out_dim", out_dim),
            ("hidden", hidden),
            ("depth", depth),
            ("time_dim", time_dim),
        ]:
            if not (isinstance(value, int) and value >= 1):
                raise UserError(f"MLP denoiser {name} {value!r} is not allowed; use a positive integer")
        self.time_dim = time_dim
        self.time_embed = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.inp = nn.Linear(dim, hidden)
        self.layers = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(depth))
        self.out = nn.Linear(hidden, out_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Map x_t (B, dim) and timesteps t (B,) (or a scalar, shared by the batch) to (B, out_dim).

        A scalar t is embedded once, as one row that broadcasts over the batch (a sampler's or a trajectory's step):
        the embedding MLP is about a quarter of the denoiser's multiply-adds at the default sizes (26-29%)."""
        emb = self.time_embed(timestep_embedding(t.reshape(-1), self.time_dim).to(self.inp.weight.dtype))
        h = self.inp(x)
        for layer in self.layers:
            h = h + layer(F.silu(h + emb))
        return self.out(F.silu(h))
