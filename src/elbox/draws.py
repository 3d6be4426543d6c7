"""Where an objective's training-time random draws come from (a DDPM's t and noise, a VAE's epsilon).

Outside a trainer, ``randn_like``/``randint``/``multinomial`` are the plain ``torch`` draws from the global RNG.

Inside ``global_batch(seed, rows, total)`` — the trainer opens it around every micro-batch — each draw is made for
the whole *global* batch of ``total`` examples, from a generator seeded by ``seed``, and only this micro-batch's
``rows`` are kept. Every process and every accumulation micro-batch of a step opens it with the same seed and
makes the same sequence of draws, so an example's randomness depends only on (seed, its place in the global batch):
one process with batch B, k processes with B/k each, and B split into micro-batches all draw the same numbers and
so compute the same gradient (up to floating-point rounding). The price is that each micro-batch draws the noise of
the whole global batch, which is small next to one pass of the network.

A draw inside the context must be for the micro-batch's rows (its first dimension is the micro-batch size).

Sampling and evaluation are seeded differently: through a ``torch.Generator`` the caller passes (usually a CPU
one). ``randn_from``/``rand_from`` draw on the generator's device and move the numbers to where the model is, so
one seed gives the same samples on a CPU and on a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class _GlobalBatch:
    seed: int
    rows: Tensor  # int64 positions of this micro-batch's examples in the global batch
    total: int  # the global batch size
    generators: dict[torch.device, torch.Generator] = field(default_factory=dict)

    def generator(self, device: torch.device) -> torch.Generator:
        if device not in self.generators:  # one stream per device, seeded alike on every process
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def keep(self, full: Tensor, n: int) -> Tensor:
        if n != len(self.rows):
            raise ValueError(f"a draw for {n} examples inside a global batch whose micro-batch has {len(self.rows)}")
        return full.index_select(0, self.rows.to(full.device))


_CURRENT: ContextVar[_GlobalBatch | None] = ContextVar("elbox_global_batch", default=None)


@contextlib.contextmanager
def global_batch(seed: int, rows: Tensor, total: int) -> Iterator[None]:
    """Draw for the ``total`` examples of the global batch from ``seed``, keep ``rows`` (see the module doc)."""
    token = _CURRENT.set(_GlobalBatch(int(seed), rows.long(), int(total)))  # rows on the draws' device: no copy
    try:
        yield
    finally:
        _CURRENT.reset(token)


def _like(fn, x: Tensor) -> Tensor:
    """``fn`` (torch.randn or torch.rand) shaped like x (B, ...): from the global RNG outside a trainer, else for the
    whole global batch from its seeded stream, this micro-batch's rows kept."""
    gb = _CURRENT.get()
    if gb is None:
        return fn(x.shape, dtype=x.dtype, device=x.device)
    full = fn((gb.total, *x.shape[1:]), generator=gb.generator(x.device), dtype=x.dtype, device=x.device)
    return gb.keep(full, x.shape[0])


def randn_like(x: Tensor) -> Tensor:
    """Standard normal noise shaped like x (B, ...)."""
    return _like(torch.randn, x)


def rand_like(x: Tensor) -> Tensor:
    """Uniform noise in [0, 1) shaped like x (B, ...)."""
    return _like(torch.rand, x)


def randint(high: int, n: int, device: torch.device) -> Tensor:
    """n integers uniform in [0, high)."""
    gb = _CURRENT.get()
    if gb is None:
        return torch.randint(0, high, (n,), device=device)
    full = torch.randint(0, high, (gb.total,), generator=gb.generator(torch.device(device)), device=device)
    return gb.keep(full, n)


def multinomial(probs: Tensor, n: int) -> Tensor:
    """n indices drawn with replacement with probabilities ``probs`` (on probs' device)."""
    gb = _CURRENT.get()
    if gb is None:
        return torch.multinomial(probs, n, replacement=True)
    full = torch.multinomial(probs, gb.total, replacement=True, generator=gb.generator(probs.device))
    return gb.keep(full, n)


# ------------------------------------------------------------------------- seeded draws for sampling/evaluation
def _from(fn, generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device | str,
          dtype: torch.dtype | None) -> Tensor:
    gen_device = generator.device if generator is not None else torch.device(device)
    # drawn in float32 and then cast: the same numbers on any device and at any precision (up to the cast)
    if gen_device.type == "cpu" and torch.device(device).type == "cuda":
        # into pinned memory and over without waiting: a plain copy from the host waits for all the GPU's queued
        # work, once per sampling step (the host then draws the next step's noise while the GPU runs this one)
        x = fn(shape, generator=generator, dtype=torch.float32, pin_memory=True)
        return x.to(device, non_blocking=True).to(dtype or torch.float32)
    return fn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device=device, dtype=dtype)


def randn_from(generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device | str,
               dtype: torch.dtype | None = None) -> Tensor:
    """Standard normal noise from ``generator`` (any device), on ``device`` as ``dtype``: the same numbers wherever
    it lands."""
    return _from(torch.randn, generator, tuple(shape), device, dtype)


def rand_from(generator: torch.Generator | None, shape: tuple[int, ...], device: torch.device | str,
              dtype: torch.dtype | None = None) -> Tensor:
    """Uniform noise in [0, 1) from ``generator`` (any device), on ``device``."""
    return _from(torch.rand, generator, tuple(shape), device, dtype)
