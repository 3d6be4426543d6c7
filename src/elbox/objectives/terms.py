"""The one contract every elbox model obeys.

A VAE and a DDPM are both trained by maximising an evidence lower bound (ELBO). Every objective in elbox returns
its bound as *named, per-example terms in nats*; the training loss, the negative ELBO, bits/dim, the per-timestep
plot and the comparison tables are all reductions of those terms.

- a term of shape (B,) is one number per example (a VAE's ``kl``, a DDPM's ``prior`` L_T);
- a term of shape (B, K) is K numbers per example that add up (a DDPM's ``kl`` has one column per timestep).

Diagnostics that are not part of the bound (an epsilon-MSE, say) go in ``extras``, never in ``terms``: the
negative ELBO is ``sum(terms)`` and nothing else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

LN2 = math.log(2.0)


def bits_per_dim(nats: Tensor | float, dims: int) -> Tensor | float:
    """Bits per dimension of a negative log-likelihood (bound) given in nats: nats / (D ln 2). The only place."""
    return nats / (dims * LN2)


@dataclass
class Terms:
    """Named per-example ELBO terms in nats, and the per-example loss a trainer minimises.

    ``loss`` defaults to the negative ELBO; objectives that train on a surrogate (the DDPM "simple" loss) set it.
    """

    terms: dict[str, Tensor]
    dims: int
    loss: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.terms:
            raise ValueError("Terms needs at least one named term")
        if self.loss is None:
            self.loss = self.nll

    @property
    def batch_size(self) -> int:
        return next(iter(self.terms.values())).shape[0]

    @property
    def nll(self) -> Tensor:
        """Per-example negative ELBO in nats, shape (B,): the sum of every term (and every column of a (B, K) term)."""
        total = None
        for value in self.terms.values():
            v = value if value.dim() == 1 else value.flatten(1).sum(1)
            total = v if total is None else total + v
        return total

    @property
    def bpd(self) -> Tensor:
        """Per-example negative ELBO in bits/dim, shape (B,)."""
        return bits_per_dim(self.nll, self.dims)

    def totals(self) -> dict[str, Tensor]:
        """Each term summed to one number per example, shape (B,) (per-step columns added up)."""
        return {k: (v if v.dim() == 1 else v.flatten(1).sum(1)) for k, v in self.terms.items()}

    def summary(self) -> dict[str, float]:
        """Batch means of the loss, the negative ELBO, bits/dim, every term and every extra, as floats (for logs)."""
        with torch.no_grad():
            out = {"loss": float(self.loss.mean()), "nelbo": float(self.nll.mean()), "bpd": float(self.bpd.mean())}
            out.update({k: float(v.mean()) for k, v in self.totals().items()})
            out.update({k: float(v.mean()) for k, v in self.extras.items()})
        return out

    @staticmethod
    def cat(parts: list["Terms"]) -> "Terms":
        """Concatenate the terms of several batches along the batch axis (for evaluation over a whole data set)."""
        first = parts[0]
        return Terms(
            terms={k: torch.cat([p.terms[k] for p in parts]) for k in first.terms},
            dims=first.dims,
            loss=torch.cat([p.loss for p in parts]),
            extras={k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
        )
