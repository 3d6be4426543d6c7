"""Exponential moving average of a model's weights, used for sampling and evaluation by default."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """shadow <- d shadow + (1 - d) param, with d = min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up of d (as in TensorFlow's ExponentialMovingAverage with num_updates) lets short runs benefit from
    an EMA too; with decay 0.9999 (Ho et al.) it reaches the full decay after about 90,000 updates.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.num_updates = 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        with torch.no_grad():
            self.num_updates += 1
            d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
            shadows = list(self.model.parameters())
            params = [p.detach() for p in model.parameters()]
            # one fused call over every tensor (as fused/foreach optimizers do): shadow += (1 - d) (param - shadow)
            torch._foreach_lerp_(shadows, params, 1.0 - d)
            for shadow, buf in zip(self.model.buffers(), model.buffers()):
                shadow.copy_(buf)
