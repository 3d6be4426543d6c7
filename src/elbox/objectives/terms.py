"""The one contract every elbox model obeys.

A VAE and a DDPM are both trained by maximising an evidence lower bound (ELBO). Every objective in elbox returns
its bound as *named, per-example terms in nats*; the training loss, the negative ELBO, bits/dim, the per-timestep
plot and the comparison tables are all reductions of those terms.

- a term of shape (B,) is one number per example (a VAE's ``kl``, a DDPM's ``prior`` L_T);
- a term of shape (B, K) is K numbers per example that add up (a DDPM's ``kl`` has one column per timestep);
  ``columns`` says what each column is (``"L_3"``), so no reader has to guess it from a name or a shape;
- ``steps`` names, in order, the terms that make up a per-timestep sequence (a DDPM's L_0, L_1 .. L_{T-1}, L_T),
  for the per-step plot and ``elbox evaluate --per-step``.

Terms compose: a model used as a part of another (a DDPM prior inside latent diffusion) hands over its terms
``prefixed("prior")``, and the whole is ``Terms.merge``d from its parts, columns and steps included.

Diagnostics that are not part of the bound (an epsilon-MSE, say) go in ``extras``, never in ``terms``: the
negative ELBO is ``sum(terms)`` and nothing else. ``loss`` is the training surrogate a trainer minimises (its
batch mean), per example, in the unit ``loss_unit`` names; by default it is the negative ELBO in nats.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from elbox.errors import UserError

LN2 = math.log(2.0)


def bits_per_dim(nats: Tensor | float, dims: int) -> Tensor | float:
    """Bits per dimension of a negative log-likelihood (bound) given in nats: nats / (D ln 2). The only place."""
    return nats / (dims * LN2)


#: what each term is, in words a user knows (for messages; a prefix "prior/" is the prior's term of the same name)
TERM_WORDS = {
    "decoder_nll": "the decoder's negative log-likelihood -log p(x|z) (L_0 for a DDPM)",
    "kl": "the KL term",
    "steps": "the diffusion term L_t at the sampled timestep",
    "prior": "the prior term L_T",
    "neg_entropy": "the encoder's negative entropy",
    "log_scale": "the latent scale's log-Jacobian",
}


def term_words(name: str) -> str:
    """``name`` in words: "the KL term", "the latent prior's diffusion term L_t ..." for "prior/steps"."""
    if "/" in name:
        prefix, rest = name.split("/", 1)
        return f"{term_words(rest)} of the {'latent prior' if prefix == 'prior' else prefix}"
    return TERM_WORDS.get(name, f"the term {name!r}")


def log_mean_exp_in_chunks(log_weights, k: int, chunk: int, progress=None) -> Tensor:
    """log 1/k sum_i w_i from ``log_weights(n)`` -> (n, B) log-weights, called ``chunk`` at a time: the
    importance-weighted estimate of Burda et al. 2016, eq. 8, in bounded memory. ``progress(n)``, if given, is
    called after each chunk with the number of importance samples it held."""
    if int(k) != k or k < 1:
        raise UserError(f"the number of importance samples k must be an integer >= 1; got {k}")
    if int(chunk) != chunk or chunk < 1:
        raise UserError(f"chunk must be an integer >= 1; got {chunk}")
    total = None
    for done in range(0, int(k), int(chunk)):  # a bounded loop: ceil(k / chunk) calls, whatever the arithmetic
        part = torch.logsumexp(log_weights(min(chunk, k - done)).double(), dim=0)
        total = part if total is None else torch.logaddexp(total, part)
        if progress is not None:
            progress(min(chunk, k - done))
    return total - math.log(k)


@dataclass
class Terms:
    """Named per-example ELBO terms in nats, and the per-example loss a trainer minimises.

    ``loss`` defaults to the negative ELBO (in nats); objectives that train on a surrogate (the DDPM "simple"
    loss) set it and say its unit in ``loss_unit``.
    """

    terms: dict[str, Tensor]
    dims: int
    loss: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)
    columns: dict[str, tuple[str, ...]] = field(default_factory=dict)  # labels of the columns of (B, K) terms
    steps: tuple[str, ...] = ()  # the terms that, in order, make the per-timestep sequence (L_0 .. L_T)
    loss_unit: str = "nats"

    def __post_init__(self) -> None:
        if not self.terms and self.loss is None:
            raise ValueError("Terms needs at least one named term, or a loss (a step that computed no bound)")
        for name, labels in self.columns.items():
            value = self.terms[name]
            width = 1 if value.dim() == 1 else value.flatten(1).shape[1]
            if len(labels) != width:
                raise ValueError(f"term {name!r} has {width} column(s) but {len(labels)} label(s)")
        missing = [s for s in self.steps if s not in self.terms]
        if missing:
            raise ValueError(f"steps name terms that do not exist: {missing}")
        if self.loss is None:
            self.loss = self.nll

    @property
    def has_bound(self) -> bool:
        """Whether the bound's terms are here: a training step inside ``base.loss_only`` may hold its loss alone."""
        return bool(self.terms)

    @property
    def batch_size(self) -> int:
        return next(iter(self.terms.values())).shape[0] if self.terms else self.loss.shape[0]

    @property
    def nll(self) -> Tensor:
        """Per-example negative ELBO in nats, shape (B,): the sum of every term (and every column of a (B, K) term)."""
        if not self.terms:
            raise ValueError("these Terms hold a training loss only (computed under loss_only): no bound to sum")
        total = None
        for value in self.totals().values():
            total = value if total is None else total + value
        return total

    @property
    def bpd(self) -> Tensor:
        """Per-example negative ELBO in bits/dim, shape (B,)."""
        return bits_per_dim(self.nll, self.dims)

    def totals(self) -> dict[str, Tensor]:
        """Each term summed to one number per example, shape (B,) (per-step columns added up)."""
        return {k: (v if v.dim() == 1 else v.flatten(1).sum(1)) for k, v in self.terms.items()}

    def labels(self, name: str) -> tuple[str, ...]:
        """What each column of term ``name`` is: its ``columns`` entry, else the name (``name[i]`` for column i)."""
        if name in self.columns:
            return self.columns[name]
        value = self.terms[name]
        width = 1 if value.dim() == 1 else value.flatten(1).shape[1]
        return (name,) if width == 1 else tuple(f"{name}[{i}]" for i in range(width))

    def per_step(self) -> tuple[list[str], Tensor] | None:
        """The per-timestep sequence as (labels, values of shape (B, K)), or None when the model has none."""
        if not self.steps:
            return None
        labels: list[str] = []
        values = []
        for name in self.steps:
            value = self.terms[name]
            values.append(value.unsqueeze(1) if value.dim() == 1 else value.flatten(1))
            labels.extend(self.labels(name))
        return labels, torch.cat(values, dim=1)

    def summary(self) -> dict[str, float]:
        """Batch means of the loss, the negative ELBO, bits/dim, every term and every extra, as floats (for logs);
        the loss and the extras alone where the step computed no bound (``has_bound``)."""
        with torch.no_grad():
            out = {"loss": float(self.loss.mean())}
            if self.has_bound:
                out.update({"nelbo": float(self.nll.mean()), "bpd": float(self.bpd.mean())})
            out.update({k: float(v.mean()) for k, v in self.totals().items()})
            out.update({k: float(v.mean()) for k, v in self.extras.items()})
        return out

    # ---------------------------------------------------------------------------------------- composition
    def prefixed(self, prefix: str) -> "Terms":
        """The same terms under ``prefix/`` (``kl`` -> ``prior/kl``): how a model hands its terms to a larger one."""
        def name(k: str) -> str:
            return f"{prefix}/{k}"

        return Terms(terms={name(k): v for k, v in self.terms.items()}, dims=self.dims, loss=self.loss,
                     extras={name(k): v for k, v in self.extras.items()},
                     columns={name(k): v for k, v in self.columns.items()},
                     steps=tuple(name(s) for s in self.steps), loss_unit=self.loss_unit)

    @staticmethod
    def merge(parts: list["Terms"], *, dims: int, loss: Tensor | None = None, loss_unit: str = "nats") -> "Terms":
        """One ``Terms`` holding every term of ``parts`` (their names must not clash; prefix them first), over
        ``dims`` data dimensions. ``loss`` defaults to the merged negative ELBO."""
        terms: dict[str, Tensor] = {}
        extras: dict[str, Tensor] = {}
        columns: dict[str, tuple[str, ...]] = {}
        steps: tuple[str, ...] = ()
        for part in parts:
            clash = (set(terms) | set(extras)) & (set(part.terms) | set(part.extras))
            if clash:
                raise ValueError(f"terms {sorted(clash)} appear in two parts; prefix one of them")
            terms.update(part.terms)
            extras.update(part.extras)
            columns.update(part.columns)
            steps += part.steps
        return Terms(terms=terms, dims=dims, loss=loss, extras=extras, columns=columns, steps=steps,
                     loss_unit=loss_unit)

    @staticmethod
    def cat(parts: list["Terms"]) -> "Terms":
        """Concatenate the terms of several batches along the batch axis (for evaluation over a whole data set)."""
        first = parts[0]
        return Terms(
            terms={k: torch.cat([p.terms[k] for p in parts]) for k in first.terms},
            dims=first.dims,
            loss=torch.cat([p.loss for p in parts]),
            extras={k: torch.cat([p.extras[k] for p in parts]) for k in first.extras},
            columns=dict(first.columns),
            steps=first.steps,
            loss_unit=first.loss_unit,
        )
