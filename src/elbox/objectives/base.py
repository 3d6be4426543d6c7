"""The base class of every elbox model: a module trained by maximising an ELBO.

An ``ELBOModel`` owns its networks (pure ``nn.Module``s that know nothing of noise schedules or priors) and its
objective's fixed buffers. It answers three questions, all in the model's own data range (see
``elbox.data.transforms``), with one signature each for every model:

- ``losses(x, *, step)``: a stochastic estimate of the training objective, as ``Terms`` (the trainer reduces
  ``.loss``; ``step`` is the optimizer step, for schedules such as a KL warm-up);
- ``bound(x, *, generator=None)``: the full negative ELBO on x, as ``Terms`` in nats (evaluation; its random draws
  come from ``generator``);
- ``sample(n, *, generator=None, **sampler_options)``: n samples; ``sampler_options`` lists the options it takes.

and says what else it can do, so that callers (the API, evaluation, the trainer's outputs) never ask which kind of
model they hold: ``sample_modes`` (what ``elbox sample --mode`` may draw), ``sampler_options``, ``per_step_terms``
(whether its bound has a per-timestep sequence), ``draws_images`` (whether samples are images to show as a grid)
and ``has_iwae`` (whether ``iwae_bound`` estimates log p(x) by importance sampling).

Every model is built from ``(config, data_shape)``; both are stored in its checkpoint, so a run can be rebuilt
from disk without the command that made it.
"""

from __future__ import annotations

import contextlib
import numbers
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from elbox.errors import UserError
from elbox.objectives.terms import Terms

_MADE_IN_RANGE: ContextVar[bool] = ContextVar("elbox_batches_made_in_range", default=False)


@contextlib.contextmanager
def batches_made_in_range() -> Iterator[None]:
    """Inside, a model takes its batches' values on trust: for a caller that made them in range (the trainer: images
    through ``to_model``, vector data checked whole at set-up). A check reads the batch back, which on a GPU waits
    for the device."""
    token = _MADE_IN_RANGE.set(True)
    try:
        yield
    finally:
        _MADE_IN_RANGE.reset(token)


def range_taken_on_trust() -> bool:
    """Whether ``batches_made_in_range`` is open."""
    return _MADE_IN_RANGE.get()


_LOSS_ONLY: ContextVar[bool] = ContextVar("elbox_loss_only", default=False)


@contextlib.contextmanager
def loss_only() -> Iterator[None]:
    """Inside, ``losses`` may leave out the bound's terms where its loss does not need them (``Terms.has_bound`` is
    then False): for a caller that reads only the loss, such as the trainer at a step whose metrics are not logged.
    A DDPM trained on the simple loss then skips the L_t it would only report (the issue-13 "extra terms computed
    only when logged"); a model whose loss is its bound computes the bound anyway."""
    token = _LOSS_ONLY.set(True)
    try:
        yield
    finally:
        _LOSS_ONLY.reset(token)


def bound_wanted() -> bool:
    """Whether ``losses`` must return the bound's terms (``loss_only`` is not open)."""
    return not _LOSS_ONLY.get()


class ELBOModel(nn.Module):
    #: registry name, e.g. "ddpm" or "vae"
    kind: ClassVar[str]
    #: what ``elbox sample --mode`` can draw: "prior" always; a model with an encoder also "reconstruct", ...
    sample_modes: ClassVar[tuple[str, ...]] = ("prior",)
    #: the keyword options ``sample`` takes besides ``generator`` (a DDPM: its sampler, steps, eta)
    sampler_options: ClassVar[tuple[str, ...]] = ()
    #: whether ``bound`` returns a per-timestep sequence (``Terms.steps``)
    per_step_terms: ClassVar[bool] = False
    #: whether ``iwae_bound`` (an importance-weighted estimate of log p(x)) exists
    has_iwae: ClassVar[bool] = False

    def __init__(self, config: Any, data_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.config = config
        self.data_shape = tuple(int(d) for d in data_shape)
        if not 1 <= len(self.data_shape) <= 3 or any(d < 1 for d in self.data_shape) or self.dims > 2**26:
            raise UserError(f"data shape {self.data_shape} is not allowed: 1 to 3 positive sizes, at most 2^26 numbers")

    @classmethod
    def resolve_config(cls, config: Any, data_kind: str) -> Any:
        """The config with every "from the data" choice made, given what the training data is ("8bit" images or
        "continuous" values); the trainer calls it before building the model and saves the result."""
        return config

    def initialize(self, x: Tensor) -> None:
        """Called by the trainer once, before the first step of a new run (not on a resume), with a batch of
        training data in the model's range: a model built on another trained model loads it here. A value the
        config left to be measured is measured here, and ``self.config`` then holds it (the trainer rewrites the
        run's config.toml with it, so that file states every value the run used)."""

    @property
    def data_range(self) -> str:
        """How uint8 data maps into this model: "symmetric" ([-1, 1]), "unit" ([0, 1]) or "binary" ({0, 1})."""
        raise NotImplementedError

    @property
    def draws_images(self) -> bool:
        """Whether samples are images (C, H, W) in ``data_range``, to be shown as a grid (else: vectors)."""
        return len(self.data_shape) == 3

    @property
    def discrete(self) -> bool:
        """Whether the bound is on a discrete probability (8-bit or binary data): then its bits/dim are comparable
        across models. Otherwise it bounds a density of continuous values, whose "bits/dim" can be negative."""
        return True

    @property
    def dims(self) -> int:
        """D, the number of data dimensions per example (for bits/dim)."""
        d = 1
        for s in self.data_shape:
            d *= s
        return d

    def losses(self, x: Tensor, *, step: int) -> Terms:
        """The training objective on a batch; ``step`` is the optimizer step (for schedules such as KL warm-up)."""
        raise NotImplementedError

    def bound(self, x: Tensor, *, generator: torch.Generator | None = None) -> Terms:
        raise NotImplementedError

    def sample(self, n: int, *, generator: torch.Generator | None = None, **sampler_options: Any) -> Tensor:
        raise NotImplementedError

    def iwae_bound(self, x: Tensor, k: int, *, generator: torch.Generator | None = None,
                   progress: Callable[[int], None] | None = None) -> Tensor:
        """log p(x) estimated with k importance samples, shape (B,); only for models with ``has_iwae``.
        ``progress(n)``, if given, is called as each chunk of n importance samples is done."""
        raise UserError(f"this {self.kind} has no importance-weighted likelihood estimate; use its bound (--metric bpd)")

    @property
    def iwae_passes(self) -> int:
        """Network passes one importance sample of ``iwae_bound`` costs per example (a VAE: one decoder pass; a
        diffusion model: a whole trajectory), so a caller can say what K costs before it starts."""
        return 1

    def check_batch(self, x: Any) -> None:
        """A clear error for anything but a float batch (B, *data_shape): the user-facing verbs call it first."""
        if not (isinstance(x, Tensor) and x.is_floating_point() and tuple(x.shape[1:]) == self.data_shape
                and x.dim() == len(self.data_shape) + 1):
            got = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else f"a {type(x).__name__}"
            want = ", ".join(str(d) for d in ("B", *self.data_shape))
            raise UserError(f"this {self.kind} takes a float batch of shape ({want}) in its data range "
                            f"'{self.data_range}' (elbox.data.transforms.to_model(images, model.data_range) makes one "
                            f"from uint8 images); got {got}")
        weight = next(self.parameters(), None)
        if weight is None:
            return
        if x.device != weight.device:
            raise UserError(f"this {self.kind} is on {weight.device}, the batch on {x.device}; move one to the other "
                            f"(x.to('{weight.device}'))")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise UserError(f"this {self.kind}'s weights are {weight.dtype}, the batch is {x.dtype}; convert the batch "
                            f"(x.to({weight.dtype})) or run under torch.autocast for mixed precision")

    def check_values(self, x: Tensor) -> None:
        """Raise UserError if x's values cannot be data of this model (outside its likelihood's range, off the
        8-bit grid of a discrete likelihood). It reads x back, which on a GPU waits for the device. By default
        nothing: a density on all of R takes any values."""

    def check_input(self, x: Any) -> None:
        """What every verb checks first: ``check_batch`` (shape, type, device; nothing read back), then
        ``check_values``, unless ``batches_made_in_range`` says the caller made the batch in range itself."""
        self.check_batch(x)
        if not range_taken_on_trust():
            self.check_values(x)

    def check_count(self, n: Any) -> int:
        """``n`` as an int >= 0 (a numpy or torch integer too), or a clear error."""
        count = n
        if isinstance(n, Tensor) and n.numel() == 1 and not (n.is_floating_point() or n.is_complex()):
            count = n.item()
        if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
            raise UserError(f"cannot draw {n!r} samples; give a whole number >= 0")
        return int(count)

    def check_sampler_options(self, options: dict[str, Any]) -> None:
        """A clear error for a sampling option this model does not take."""
        unknown = sorted(set(options) - set(self.sampler_options))
        if unknown:
            takes = ", ".join(self.sampler_options) or "none"
            raise UserError(f"this {self.kind} does not take the sampling option(s) {', '.join(unknown)} (it takes: {takes})")
