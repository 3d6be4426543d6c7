"""Held-out evaluation: the full ELBO (bits/dim, per term, per timestep) and the importance-weighted likelihood.

Both are reductions of the models' per-example terms; nats become bits/dim in one place
(``elbox.objectives.terms.bits_per_dim``). Standard errors are over examples (std / sqrt(N)).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from elbox.config import DataConfig
from elbox.data import to_model
from elbox.errors import UserError
from elbox.objectives.base import ELBOModel
from elbox.objectives.terms import Terms, bits_per_dim


@dataclass
class Evaluation:
    metric: str  # "bpd"/"elbo" (the negative ELBO) or "nll" (the IWAE estimate of -log p(x))
    examples: int
    dims: int
    nats: float  # mean per example
    nats_stderr: float
    bpd: float
    bpd_stderr: float
    terms: dict[str, float] = field(default_factory=dict)  # mean nats per example of each named term
    per_step: list[float] | None = None  # a per-timestep sequence (a DDPM's L_0 .. L_T), mean nats per example
    per_step_labels: list[str] | None = None  # what each entry of per_step is ("L_0", ..., "L_T"; "prior/L_0", ...)
    k: int | None = None
    discrete: bool = True  # a bound on a discrete probability; False: on a density of continuous values
    binarized: bool = False  # the data were binarized (a VAE's Bernoulli decoder): two values a pixel, not 256

    @property
    def bpd_label(self) -> str:
        """How to name ``bpd``: bits/dim of a density (continuous data), or of binarized pixels, are not
        comparable with those of 8-bit data."""
        if not self.discrete:
            return "bits/dim of a density (continuous data; not comparable with 8-bit bits/dim)"
        return "bits/dim of binarized data (not comparable with 8-bit bits/dim)" if self.binarized else "bits/dim"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mean_stderr(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    n = values.numel()
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")


def heldout_data(model: ELBOModel, data: DataConfig, examples: int, split: str, seed: int) -> torch.Tensor:
    """The first ``examples`` (0: all) held-out examples, mapped into the model's range.

    Binarized data gets one fixed binarization drawn with ``seed``, so every evaluation sees the same test set.
    """
    ds = data.load(split)
    if tuple(ds.shape) != tuple(model.data_shape):
        raise UserError(f"data set {data.data!r} has examples of shape {tuple(ds.shape)} but the model was trained on "
                        f"{tuple(model.data_shape)}; pass the same --data/--image-size/--channels as in training")
    x = ds.data if examples <= 0 else ds.data[:examples]
    return to_model(x, model.data_range, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def evaluate_bound(model: ELBOModel, data: DataConfig, *, examples: int = 0, batch_size: int = 256,
                   device: torch.device | str = "cpu", split: str = "test", seed: int = 0,
                   progress: bool = False) -> Evaluation:
    """The negative ELBO on held-out data, in nats and bits/dim, with every term (a DDPM: all T steps, no sampling)."""
    model.eval().to(device)
    x_all = heldout_data(model, data, examples, split, seed)
    generator = torch.Generator().manual_seed(seed)
    parts = []
    batches = range(0, x_all.shape[0], batch_size)
    if progress:
        from elbox.progress import progress_bar

        batches = progress_bar(batches, desc="evaluate", unit="batch")
    for i in batches:
        x = x_all[i : i + batch_size].to(device)
        parts.append(model.bound(x, generator=generator))
    terms = Terms.cat(parts)
    nats, nats_se = _mean_stderr(terms.nll)
    steps = terms.per_step()
    labels, per_step = (steps[0], steps[1].double().mean(0).tolist()) if steps is not None else (None, None)
    return Evaluation(metric="bpd", examples=terms.batch_size, dims=terms.dims, nats=nats, nats_stderr=nats_se,
                      bpd=bits_per_dim(nats, terms.dims), bpd_stderr=bits_per_dim(nats_se, terms.dims),
                      terms={k: float(v.double().mean()) for k, v in terms.totals().items()}, per_step=per_step,
                      per_step_labels=labels, discrete=model.discrete, binarized=model.data_range == "binary")


@torch.no_grad()
def evaluate_iwae(model: ELBOModel, data: DataConfig, *, k: int, examples: int = 0, batch_size: int = 64,
                  device: torch.device | str = "cpu", split: str = "test", seed: int = 0,
                  progress: bool = False) -> Evaluation:
    """-log p(x) by the importance-weighted bound log 1/K sum_k p(x, z_k)/q(z_k|x) (Burda et al. 2016)."""
    if not model.has_iwae:
        raise UserError(f"--metric nll needs a model with an importance-weighted estimate; this {model.kind} "
                        f"has none: use --metric bpd")
    if k < 1:
        raise UserError(f"--k {k} is not allowed; use K >= 1 importance samples (Burda et al. use 5000)")
    model.eval().to(device)
    x_all = heldout_data(model, data, examples, split, seed)
    generator = torch.Generator().manual_seed(seed)
    n = x_all.shape[0]
    bar = None
    if progress:  # counted in importance samples, chunk by chunk, so the ETA shows within the first batch
        from elbox.progress import progress_bar

        passes = model.iwae_passes
        bar = progress_bar(total=n * k, unit="sample", unit_scale=n * k >= 100_000, dynamic_ncols=True,
                   desc=f"IWAE K={k} on {n} examples ({passes:,} network pass{'es' if passes > 1 else ''} a sample)")
    parts = []
    for i in range(0, n, batch_size):
        xb = x_all[i : i + batch_size].to(device)
        tick = None if bar is None else (lambda done, b=xb.shape[0]: bar.update(done * b))
        parts.append(model.iwae_bound(xb, k, generator=generator, progress=tick).double().cpu())
    if bar is not None:
        bar.close()
    log_px = torch.cat(parts)
    nats, nats_se = _mean_stderr(-log_px)
    dims = model.dims
    return Evaluation(metric="nll", examples=log_px.numel(), dims=dims, nats=nats, nats_stderr=nats_se,
                      bpd=bits_per_dim(nats, dims), bpd_stderr=bits_per_dim(nats_se, dims), k=k,
                      discrete=model.discrete, binarized=model.data_range == "binary")
