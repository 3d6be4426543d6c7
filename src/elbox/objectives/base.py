"""The base class of every elbox model: a module trained by maximising an ELBO.

An ``ELBOModel`` owns its networks (pure ``nn.Module``s that know nothing of noise schedules or priors) and its
objective's fixed buffers. It answers three questions, all in the model's own data range (see
``elbox.data.transforms``):

- ``losses(x, step=...)``: a stochastic estimate of the training objective, as ``Terms`` (the trainer reduces ``.loss``);
- ``bound(x)``: the full negative ELBO on x, as ``Terms`` in nats (evaluation: no sampled timesteps);
- ``sample(n)``: n samples from the model.

Every model is built from ``(config, data_shape)``; both are stored in its checkpoint, so a run can be rebuilt
from disk without the command that made it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from elbox.objectives.terms import Terms


class ELBOModel(nn.Module):
    #: registry name, e.g. "ddpm" or "vae"
    kind: ClassVar[str]

    def __init__(self, config: Any, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.config = config
        self.data_shape = tuple(int(d) for d in data_shape)

    @property
    def data_range(self) -> str:
        """How uint8 data maps into this model: "symmetric" ([-1, 1]), "unit" ([0, 1]) or "binary" ({0, 1})."""
        raise NotImplementedError

    @property
    def dims(self) -> int:
        """D, the number of data dimensions per example (for bits/dim)."""
        d = 1
        for s in self.data_shape:
            d *= s
        return d

    def losses(self, x: Tensor, *, step: int = 0) -> Terms:
        """The training objective on a batch; ``step`` is the optimizer step (for schedules such as KL warm-up)."""
        raise NotImplementedError

    def bound(self, x: Tensor) -> Terms:
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError
