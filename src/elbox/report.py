"""`elbox report RUN [RUN ...] --out report.html`: one self-contained HTML page about one or several runs.

Everything is inside the file (images as data: URIs, the style inline; no scripts, no fonts, no network), so it
opens offline and can be mailed. For each run: what it is (model, data, parameters, its config), its measurements
(every evaluation recorded in ``evaluations.jsonl``: bits/dim with standard errors, -log p(x), FID/KID with N),
its training curves, where a DDPM's bits go, a VAE's rate and distortion, its samples (and their evolution over
training), reconstructions. With several runs, first a comparison table and the runs' curves overlaid.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path
from typing import Any

from elbox import checkpoint as ckpt
from elbox import plots
from elbox.errors import UserError

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0 auto; max-width: 1180px;
       padding: 24px 32px; color: #1d2330; line-height: 1.45; }
h1 { font-size: 26px; margin-bottom: 2px; } h2 { font-size: 20px; margin-top: 40px; border-bottom: 1px solid #dde;
padding-bottom: 4px; } h3 { font-size: 15px; margin: 22px 0 6px; color: #445; }
.sub { color: #667; margin-top: 0; } table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border-bottom: 1px solid #e4e6ee; padding: 5px 12px; text-align: left; vertical-align: top; }
th { background: #f4f5f9; font-weight: 600; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #e4e6ee; border-radius: 3px; } .grids { display: flex; gap: 18px;
flex-wrap: wrap; align-items: flex-start; } .grids figure { margin: 0; } figcaption { font-size: 12px; color: #667; }
details { margin: 8px 0; } pre { background: #f7f7fa; padding: 10px; font-size: 12px; overflow-x: auto; }
.note { font-size: 12px; color: #667; } .timeline img { width: 150px; }
"""


def _step_of(evaluation: dict[str, Any]) -> int:
    """The checkpoint step an evaluation measured: its "step" (training records it) or its checkpoint's name
    (`elbox evaluate` records only that: "step-0000300")."""
    if "step" in evaluation:
        return int(evaluation["step"])
    name = str(evaluation.get("checkpoint", ""))
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else -1


def _natural_order(path: Path) -> list:
    """seed2 before seed10, eta0.25 before eta0.5, and a first grid (samples-prior-seed0.png) before its repeat
    (samples-prior-seed0-1)."""
    parts = re.split(r"(\d+(?:\.\d+)?)", path.stem)  # the numbers at odd places
    return [(0, float(part), "") if i % 2 else (1, 0.0, part) for i, part in enumerate(parts)]


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _pm(value: float | None, se: float | None, digits: int) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None and math.isfinite(se) else "")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if isinstance(row, dict):
                rows.append(row)
    return rows


class Run:
    """What one run folder holds, read once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        checkpoint = ckpt.resolve_checkpoint(self.path)
        self.folder = checkpoint.parent.parent
        manifest = ckpt.read_manifest(checkpoint, verify=False)
        self.description = manifest["model"]
        self.step = manifest["step"]
        self.kind = self.description["kind"]
        self.config_text = (self.folder / "config.toml").read_text() if (self.folder / "config.toml").is_file() else ""
        self.metrics = _read_jsonl(self.folder / "metrics.jsonl")
        self.evaluations = _read_jsonl(self.folder / "evaluations.jsonl")
        self.parameters = _count_parameters(checkpoint / "model.safetensors")
        self.name = self.folder.name

    def headline(self, metric: str) -> dict[str, Any] | None:
        """The evaluation the summary shows: of the latest checkpoint measured, the one over the most examples
        (then the most importance samples, then the newest); a quick check on a few examples does not replace
        the full measurement in the headline (every evaluation is still listed)."""
        return self.fullest(lambda e: e.get("metric") == metric)

    def fullest(self, wanted) -> dict[str, Any] | None:
        """Of the evaluations ``wanted`` takes, the headline's choice: latest checkpoint, most examples, largest K,
        newest."""
        found = [(_step_of(e), e.get("examples", 0), e.get("k") or 0, i, e)
                 for i, e in enumerate(self.evaluations) if wanted(e)]
        return max(found, key=lambda f: f[:4])[4] if found else None

    @property
    def data(self) -> str:
        """The data set, marked when the model saw it binarized (its bits/dim are of two-valued pixels)."""
        name = self.description.get("data", {}).get("data", "?")
        return name + (" (binarized)" if self.description.get("data_range") == "binary" else "")

    @property
    def terms(self) -> list[str]:
        fixed = {"step", "loss", "nelbo", "bpd", "lr", "grad_norm", "images_per_s", "skipped", "mse", "heldout_bpd",
                 "nonfinite", "stopped"}
        # the last line with the bound: not a FID or held-out line, nor a NaN/Inf one of a step that computed no bound
        last = next((m for m in reversed(self.metrics) if "nelbo" in m), {})
        return [k for k in last if k not in fixed]

    @property
    def curves(self) -> list[dict[str, Any]]:
        """metrics.jsonl, with the held-out bound that ended training (evaluations.jsonl) as its last point."""
        final = [{"step": e["step"], "heldout_bpd": e["bpd"]} for e in self.evaluations
                 if e.get("metric") == "bpd" and e.get("when") == "training" and "step" in e]
        return self.metrics + final


def _count_parameters(path: Path) -> int:
    """Numbers in a safetensors file, from its header (the tensors are not read)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def _bound_row(run: Run) -> list[str]:
    bound = run.headline("bpd") or run.headline("elbo")
    nll = run.headline("nll")
    quality = run.headline("fid/kid")
    label = "" if not bound or bound.get("discrete", True) else " (density)"
    return [
        html.escape(run.name), run.kind, html.escape(run.data), f"{run.parameters:,}", f"{run.step:,}",
        _pm(bound and bound["bpd"], bound and bound["bpd_stderr"], 4) + label + (f" (N = {bound['examples']})" if bound else ""),
        _pm(bound and bound["nats"], bound and bound["nats_stderr"], 2),
        (_pm(nll["nats"], nll["nats_stderr"], 2) + f" (K = {nll['k']}, N = {nll['examples']})") if nll else "—",
        (f"{quality['fid']:.2f} / {quality['kid']:.4f} (N = {quality['num']})") if quality else "—",
    ]


HEAD = ["run", "model", "data", "parameters", "steps", "−ELBO, bits/dim", "−ELBO, nats", "−log p(x), nats", "FID / KID"]


def _table(rows: list[list[str]], head: list[str]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"]
    for row in rows:
        out.append("<tr>" + "".join(f'<td{" class=num" if i >= 3 else ""}>{c}</td>' for i, c in enumerate(row)) + "</tr>")
    return "\n".join(out) + "</table>"


#: what the training curves' bound is, and why it need not meet the held-out one
TRAINING_NOTE = ("The training line is the bound estimated on each logged training batch with one draw per example "
                 "(a diffusion model: one random timestep, scaled by T; as it trains, without clipping its "
                 "prediction of x<sub>0</sub>): unbiased but noisy, and a point can even fall below zero. The "
                 "held-out point is the full bound, every term computed, as the table above.")


def _run_section(run: Run) -> str:
    parts = [f"<h2>{html.escape(run.name)} <span class=sub>— {run.kind}, {html.escape(run.data)}</span></h2>",
             _table([_bound_row(run)], HEAD)]
    if run.evaluations:
        rows = []
        for e in run.evaluations:
            what = e.get("metric", "?")
            if what == "fid/kid":
                value = f"FID {e['fid']:.3f}, KID {e['kid']:.5f} ± {e['kid_std']:.5f}"
                n = f"{e['num']} samples vs {e['reference']}"
            else:
                value = f"{_pm(e.get('nats'), e.get('nats_stderr'), 3)} nats, {_pm(e.get('bpd'), e.get('bpd_stderr'), 4)} bits/dim"
                n = f"{e.get('examples')} held-out examples" + (f", K = {e['k']}" if e.get("k") else "")
            rows.append([html.escape(str(e.get("time", ""))), html.escape(what), value, html.escape(n),
                         html.escape(str(e.get("checkpoint", "")))])
        parts.append("<h3>Every evaluation recorded</h3>" + _table(rows, ["when", "metric", "value", "on", "checkpoint"]))
    if run.metrics:
        parts.append("<h3>Training</h3>" + _img(plots.training_curves(run.curves, run.terms, run.name),
                                                "training curves")
                     + "<p class=note>" + TRAINING_NOTE + "</p>")
    if run.kind == "vae" and run.metrics and "kl" in run.metrics[-1]:
        parts.append("<h3>Rate and distortion</h3>" + _img(plots.rate_distortion(run.metrics, run.name),
                                                           "rate and distortion"))
    steps = run.fullest(lambda e: bool(e.get("per_step")))  # the same choice as the headline's, N said
    if steps:
        title = f"{run.name}: {steps.get('examples', '?')} held-out examples, {steps.get('checkpoint', '')}"
        parts.append(f"<h3>Where the bits go</h3><p class=note>The full bound, term by term, on "
                     f"{steps.get('examples', '?')} held-out examples ({html.escape(str(steps.get('checkpoint', '')))})"
                     f".</p>" + _img(
            plots.per_step_terms(steps["per_step_labels"], steps["per_step"], steps["dims"], title),
            "per-timestep terms"))
    grids = [(name, run.folder / name) for name in ("samples.png", "reconstructions.png")]
    grids += [(p.name, p) for p in sorted(run.folder.glob("samples-*.png"), key=_natural_order)]
    shown = [f"<figure>{_img(p.read_bytes(), name)}<figcaption>{html.escape(name)}</figcaption></figure>"
             for name, p in grids if p.is_file()]
    if shown:
        parts.append("<h3>Samples</h3><div class=grids>" + "".join(shown) + "</div>")
    over_time = sorted(p for p in (run.folder / "samples").glob("step-*.png") if "reconstructions" not in p.name)
    if over_time:
        parts.append("<h3>Samples over training</h3><div class='grids timeline'>" + "".join(
            f"<figure>{_img(p.read_bytes(), p.stem)}<figcaption>{p.stem}</figcaption></figure>" for p in over_time)
            + "</div>")
    if run.config_text:
        parts.append(f"<details><summary>config.toml</summary><pre>{html.escape(run.config_text)}</pre></details>")
    return "\n".join(parts)


def write_report(runs: list[Path], out: Path) -> Path:
    """The HTML page for ``runs``, written to ``out`` (a new file: an existing one is never overwritten)."""
    if not runs:
        raise UserError("elbox report needs at least one run folder")
    loaded = [Run(r) for r in runs]  # each run checked first: a mistyped run is the error to see
    if out.exists():
        raise UserError(f"{out} exists; choose another --out (elbox never overwrites a file)")
    body = [f"<h1>elbox report</h1><p class=sub>{len(loaded)} run(s): " + ", ".join(html.escape(r.name) for r in loaded)
            + ". Every number is a negative ELBO or likelihood estimate in the units shown, with its standard error over "
            "held-out examples and the N it is over.</p>"]
    if len(loaded) > 1:
        body.append("<h2>Side by side</h2>" + _table([_bound_row(r) for r in loaded], HEAD))
        curves = {r.name: [(m["step"], m["bpd"]) for m in r.metrics if m.get("bpd") is not None] for r in loaded}
        body.append(_img(plots.compare_runs(curves, "bits/dim (training batches)", "negative ELBO during training"),
                         "runs compared"))
        body.append("<p class=note>Bits/dim are comparable across models when each bounds the same discrete data "
                    "(8-bit or binary pixels); binarized data and a density's bits/dim are marked.</p>")
    body += [_run_section(r) for r in loaded]
    page = (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>elbox report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
