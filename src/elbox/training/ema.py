"""Exponential moving average of a model's weights, used for sampling and evaluation by default."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class EMA:
    """shadow <- d shadow + (1 - d) param, with d = min(decay, (1 + n) / (10 + n)) after n updates.

    The warm-up of d (as in TensorFlow's ExponentialMovingAverage with num_updates) lets short runs benefit from
    an EMA too; with decay 0.9999 (Ho et al.) it reaches the full decay after about 90,000 updates.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self._counted = 0  # updates counted on the host
        self._on_device: Tensor | None = None  # and those counted on the device since (see ``update``'s skip)
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @property
    def num_updates(self) -> int:
        """Updates made (skipped ones not counted). Reads the device's count back: call it between steps."""
        return self._counted + (int(self._on_device) if self._on_device is not None else 0)

    @num_updates.setter
    def num_updates(self, n: int) -> None:
        self._counted, self._on_device = int(n), None

    def update(self, model: nn.Module, skip: Tensor | None = None) -> None:
        """One update. ``skip`` (a bool tensor on the weights' device) makes it a no-op when true, decided on the
        device: the trainer's update of a step with a NaN/Inf is skipped without the host reading the flag."""
        with torch.no_grad():
            shadows = list(self.model.parameters())
            params = [p.detach() for p in model.parameters()]
            if skip is None:
                self._counted += 1
                d = min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
                # one fused call over every tensor (as fused/foreach optimizers do): shadow += (1 - d) (param - shadow)
                torch._foreach_lerp_(shadows, params, 1.0 - d)
                for shadow, buf in zip(self.model.buffers(), model.buffers()):
                    shadow.copy_(buf)
                return
            # The same update with n, d and the weight 1 - d computed on the device, in float64 as the host does;
            # a skipped update has weight 0 (shadow += 0) and does not count.
            keep = (~skip).to(torch.float64)
            if self._on_device is None:
                self._on_device = torch.zeros((), dtype=torch.float64, device=skip.device)
            self._on_device += keep
            n = self._on_device + self._counted
            d = torch.clamp_max((1.0 + n) / (10.0 + n), self.decay)
            weight = ((1.0 - d) * keep).to(torch.float32)
            step = torch._foreach_sub(params, shadows)
            torch._foreach_mul_(step, weight)
            torch._foreach_add_(shadows, step)
            for shadow, buf in zip(self.model.buffers(), model.buffers()):
                shadow.copy_(torch.where(skip, shadow, buf))
