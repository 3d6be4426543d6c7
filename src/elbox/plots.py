"""Plots a person wants to read, with matplotlib (``pip install 'elbox[plots]'``): the training curves of a run
(the loss raw and smoothed, the bound's terms, train and held-out bits/dim), where a DDPM's bits go (its terms
L_0 .. L_T), a VAE's rate and distortion, and runs side by side. Each function returns a PNG's bytes."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from elbox.errors import UserError

SMOOTH = 0.9  # exponential smoothing of noisy training curves (the raw curve is drawn faintly behind)


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'elbox[plots]' (or pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 9, "legend.frameon": False})
    return plt


def smooth(values: Sequence[float], weight: float = SMOOTH) -> list[float]:
    """Exponential moving average, debiased at the start (as TensorBoard's smoothing)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def _log_if_wide(ax, values: Sequence[float]) -> None:
    """Log scale when every value is positive and they span more than a factor of 20."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if vals and min(vals) > 0 and max(vals) / min(vals) > 20:
        ax.set_yscale("log")


def training_curves(rows: list[dict[str, Any]], terms: Sequence[str], title: str) -> bytes:
    """Three panels over optimizer steps: the training loss (raw and smoothed), each term of the bound (nats per
    example, smoothed), and bits/dim (train estimate, held-out bound where measured); a fourth with FID (and KID)
    when the run measured them during training (``--fid-every``)."""
    return _png(training_figure(rows, terms, title))


def training_figure(rows: list[dict[str, Any]], terms: Sequence[str], title: str):
    """The matplotlib figure of ``training_curves`` (open: the caller renders and closes it)."""
    plt = _pyplot()
    train = [r for r in rows if r.get("loss") is not None]
    quality = [r for r in rows if r.get("fid") is not None]
    fig, axes = plt.subplots(1, 4 if quality else 3, figsize=(16 if quality else 12, 3.4))
    steps = [r["step"] for r in train]
    ax = axes[0]
    loss = [r["loss"] for r in train]
    ax.plot(steps, loss, color="C0", alpha=0.25, lw=0.8, label="raw")
    few = "o" if len(steps) < 3 else None  # a short run's one or two points: markers, or nothing would show
    ax.plot(steps, smooth(loss), color="C0", lw=1.6, label="smoothed", marker=few)
    _log_if_wide(ax, loss)
    ax.set(title="training loss", xlabel="optimizer step", ylabel="loss (the objective's unit)")
    ax.legend()
    ax = axes[1]
    for i, name in enumerate(terms):
        series = [(r["step"], r[name]) for r in train if r.get(name) is not None]
        if series:
            ax.plot([s for s, _ in series], smooth([v for _, v in series]), color=f"C{i}", lw=1.4, label=name,
                    marker=few)
    # every value, the negative ones too (an LDM's neg_entropy): a log scale would drop those lines unseen
    _log_if_wide(ax, [r[n] for r in train for n in terms if isinstance(r.get(n), (int, float))])
    ax.set(title="terms of the bound (smoothed)", xlabel="optimizer step", ylabel="nats per example")
    ax.legend(fontsize=7)
    ax = axes[2]
    bpd = [(r["step"], r["bpd"]) for r in train if r.get("bpd") is not None]
    if bpd:
        ax.plot([s for s, _ in bpd], [v for _, v in bpd], color="C0", alpha=0.25, lw=0.8)
        ax.plot([s for s, _ in bpd], smooth([v for _, v in bpd]), color="C0", lw=1.6, label="training batches",
                marker=few)
    held = [(r["step"], r["heldout_bpd"]) for r in rows if r.get("heldout_bpd") is not None]
    if held:
        ax.plot([s for s, _ in held], [v for _, v in held], "o-", color="C3", ms=4, label="held-out (full bound)")
    ax.set(title="negative ELBO", xlabel="optimizer step", ylabel="bits/dim")
    ax.legend()
    if quality:
        ax = axes[3]
        ax.plot([r["step"] for r in quality], [r["fid"] for r in quality], "o-", color="C2", ms=4, label="FID")
        ax.set(title=f"sample quality (EMA, N = {quality[-1].get('fid_num', '?')})", xlabel="optimizer step",
               ylabel="FID (lower is better)")
        kid = ax.twinx()
        kid.plot([r["step"] for r in quality], [r["kid"] for r in quality], "s--", color="C4", ms=3, label="KID")
        kid.set_ylabel("KID")
        ax.legend(handles=ax.get_lines() + kid.get_lines(), fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def per_step_terms(labels: Sequence[str], nats: Sequence[float], dims: int, title: str) -> bytes:
    """Where the bits go: each term of the per-timestep sequence (L_0, L_1 .. L_{T-1}, L_T) in bits/dim on a log
    scale, and the running total: the share of the bound spent up to each timestep."""
    plt = _pyplot()
    bits = [n / (dims * math.log(2)) for n in nats]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 3.4))
    t = list(range(len(bits)))
    positive = [max(b, 1e-12) for b in bits]
    ax.plot(t, positive, lw=1.2, color="C0")
    ax.set_yscale("log")
    ticks = sorted({0, len(t) - 1, *range(0, len(t), max(1, len(t) // 8))})
    ax.set_xticks(ticks, [labels[i] for i in ticks], rotation=30, fontsize=7)
    ax.set(title="each term of the bound", xlabel="term (L_0 = decoder, L_T = prior)", ylabel="bits/dim (log scale)")
    total = sum(bits)
    running, acc = [], 0.0
    for b in bits:
        acc += b
        running.append(acc / total if total else 0.0)
    ax2.plot(t, running, color="C1", lw=1.4)
    ax2.set_xticks(ticks, [labels[i] for i in ticks], rotation=30, fontsize=7)
    ax2.set(title=f"share of the bound ({total:.3f} bits/dim) up to each term", xlabel="term", ylabel="fraction",
            ylim=(0, 1.02))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def rate_distortion(rows: list[dict[str, Any]], title: str, rate: str = "kl", distortion: str = "decoder_nll") -> bytes:
    """A VAE's rate (the KL, nats) and distortion (-log p(x|z), nats) over training, and one against the other."""
    plt = _pyplot()
    train = [r for r in rows if r.get(rate) is not None and r.get(distortion) is not None]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
    steps = [r["step"] for r in train]
    ax.plot(steps, smooth([r[rate] for r in train]), label=f"rate ({rate})", color="C2")
    ax.plot(steps, smooth([r[distortion] for r in train]), label=f"distortion ({distortion})", color="C4")
    ax.set(title="rate and distortion (smoothed)", xlabel="optimizer step", ylabel="nats per example")
    ax.legend()
    sc = ax2.scatter(smooth([r[rate] for r in train]), smooth([r[distortion] for r in train]), c=steps, s=6,
                     cmap="viridis")
    fig.colorbar(sc, ax=ax2, label="optimizer step")
    ax2.set(title="the path through the rate-distortion plane", xlabel="rate (nats)", ylabel="distortion (nats)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _png(fig)


def compare_runs(curves: dict[str, list[tuple[int, float]]], ylabel: str, title: str) -> bytes:
    """One smoothed curve per run, overlaid."""
    return _png(compare_figure(curves, ylabel, title))


def compare_figure(curves: dict[str, list[tuple[int, float]]], ylabel: str, title: str):
    """The figure of ``compare_runs``: a run with one or two logged points gets markers, or it would not show."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    for i, (name, points) in enumerate(curves.items()):
        if points:
            ax.plot([s for s, _ in points], smooth([v for _, v in points]), lw=1.5, color=f"C{i}", label=name,
                    marker="o" if len(points) < 3 else None)
    ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
