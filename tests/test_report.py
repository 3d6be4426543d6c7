"""`elbox report`: one self-contained HTML page, opened in a real headless Chromium (every image loads, no console
error), with a screenshot saved as an artifact (``$ELBOX_ARTIFACTS``, else the test's tmp folder)."""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from elbox.cli import main

pytest.importorskip("matplotlib", reason="the report's plots need matplotlib (pip install 'elbox[plots]')")

TINY = ["--timesteps", "20", "--steps", "8", "--batch-size", "16", "--log-every", "1", "--checkpoint-every", "4",
        "--sample-every", "4", "--num-samples", "16", "--final-eval-examples", "32", "--quiet"]


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    ddpm, vae = root / "ddpm", root / "vae"
    assert main(["train", "--out", str(ddpm), "--net", "micro", *TINY]) == 0
    assert main(["train", "vae", "--out", str(vae), "--hidden", "32", "--latent-dim", "2",
                 *[a for a in TINY if a not in ("--timesteps", "20")]]) == 0
    assert main(["evaluate", str(vae), "--metric", "nll", "--k", "8", "--examples", "16"]) == 0
    return ddpm, vae


def test_the_report_is_one_self_contained_page(runs, tmp_path):
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    page = out.read_text()
    assert "<script" not in page and not re.search(r'(src|href)="(?!data:)', page)  # nothing from elsewhere
    assert page.count("<img") >= 8 and "Side by side" in page and "Where the bits go" in page
    assert "Rate and distortion" in page and "Samples over training" in page
    assert "<td>digits (binarized)</td>" in page and "<td>digits</td>" in page  # the VAE saw two-valued pixels
    assert page.count("The training line is the bound estimated on each logged training batch") == 2  # per run
    evaluations = [json.loads(line) for line in (runs[1] / "evaluations.jsonl").read_text().splitlines()]
    assert [e["metric"] for e in evaluations] == ["bpd", "nll"]  # the training's bound, then `elbox evaluate`
    assert main(["report", str(runs[0]), "--out", str(out)]) == 2  # never overwritten


def test_the_curves_end_at_the_final_held_out_bound_and_a_fid_line_is_not_a_term(runs, tmp_path):
    from elbox.report import Run

    folder = tmp_path / "ddpm"
    shutil.copytree(runs[0], folder)
    with open(folder / "metrics.jsonl", "a") as f:  # what --fid-every writes after the last step's line
        f.write(json.dumps({"step": 8, "fid": 300.0, "kid": 0.3, "kid_std": 0.01, "fid_num": 6}) + "\n")
        # a skipped NaN/Inf step between metrics lines, of a loss that computed no bound there (the simple loss)
        f.write(json.dumps({"step": 9, "loss": None, "mse": 0.5, "lr": 1e-3, "nonfinite": "the loss"}) + "\n")
    run = Run(folder)
    assert run.terms == ["steps", "prior"]  # the bound's terms, from the last training line that has them
    final = [e for e in run.evaluations if e.get("when") == "training"][-1]
    assert run.curves[-1] == {"step": 8, "heldout_bpd": final["bpd"]} and len(run.curves) == len(run.metrics) + 1


def test_the_headline_is_the_fullest_measurement_of_the_latest_checkpoint(runs, tmp_path):
    from elbox.report import Run

    folder = tmp_path / "ddpm"
    shutil.copytree(runs[0], folder)
    full = json.loads((folder / "evaluations.jsonl").read_text().splitlines()[-1])  # the training's, 32 examples
    quick = {**full, "examples": 4, "bpd": 9.0, "when": "evaluate"}  # a quick check after it
    older = {**full, "step": full["step"] - 4, "examples": 64, "bpd": 8.0}  # more examples, an older checkpoint
    with open(folder / "evaluations.jsonl", "a") as f:
        f.write(json.dumps(quick) + "\n" + json.dumps(older) + "\n")
    assert Run(folder).headline("bpd") == full
    assert Run(folder).headline("fid/kid") is None
    # `elbox evaluate` records no "step", only the checkpoint: a fuller measurement of the same checkpoint wins
    fuller = {k: v for k, v in {**full, "examples": 64, "when": "evaluate"}.items() if k != "step"}
    with open(folder / "evaluations.jsonl", "a") as f:
        f.write(json.dumps(fuller) + "\n")
    assert Run(folder).headline("bpd") == fuller
    full = fuller
    # "Where the bits go" draws the same measurement, and says over how many examples
    assert main(["report", str(folder), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert f"term by term, on {full['examples']} held-out examples ({full['checkpoint']})" in page


def test_sample_grids_are_listed_in_natural_order(runs, tmp_path):
    from elbox.report import _natural_order

    run = tmp_path / "run"
    shutil.copytree(runs[0], run)
    for name in ("samples-prior-seed10.png", "samples-prior-seed0-1.png", "samples-prior-seed0.png"):
        shutil.copy(run / "samples.png", run / name)
    assert main(["report", str(run), "--out", str(tmp_path / "r.html")]) == 0
    captions = re.findall(r"<figcaption>(samples-[^<]+)</figcaption>", (tmp_path / "r.html").read_text())
    assert captions == ["samples-prior-seed0.png", "samples-prior-seed0-1.png", "samples-prior-seed10.png"]

    names = ["samples-prior-seed10.png", "samples-prior-seed0-1.png", "samples-prior-seed2.png",
             "samples-prior-seed0.png", "samples-prior-ddim50-seed0.png", "samples-prior-ddim50-eta0.5-seed0.png",
             "samples-prior-ddim50-eta0.25-seed0.png"]
    assert [n for n in sorted(names, key=lambda n: _natural_order(Path(n)))] == [
        "samples-prior-ddim50-eta0.25-seed0.png", "samples-prior-ddim50-eta0.5-seed0.png",
        "samples-prior-ddim50-seed0.png", "samples-prior-seed0.png", "samples-prior-seed0-1.png",
        "samples-prior-seed2.png", "samples-prior-seed10.png"]
    assert _natural_order(Path("samples-seed1\u00b2x.png"))  # after a number, a digit-like character, not a number


def test_a_run_with_one_logged_point_shows_on_the_side_by_side_plot():
    from elbox.plots import _pyplot, compare_figure

    fig = compare_figure({"short": [(20, 7.0)], "long": [(s, 1.0 / s) for s in range(50, 300, 50)]}, "bpd", "runs")
    _pyplot().close(fig)
    short, long = fig.axes[0].get_lines()
    assert short.get_marker() == "o" and long.get_marker() in ("None", None, "")
    assert fig.axes[0].get_xlim()[0] <= 20  # the short run's point is inside the axes


def test_the_terms_panel_shows_a_negative_term_on_a_linear_scale():
    from elbox.plots import _pyplot, training_figure

    def scale(terms_of_step):
        rows = [{"step": s, "loss": 1.0, "bpd": 1.0, **terms_of_step(s)} for s in range(1, 30)]
        fig = training_figure(rows, list(rows[0].keys() - {"step", "loss", "bpd"}), "run")
        _pyplot().close(fig)
        return fig.axes[1].get_yscale()

    # an LDM's terms: decoder_nll and the prior's KL far apart, its negative entropy below 0 (gone on a log scale)
    assert scale(lambda s: {"decoder_nll": 80.0, "prior/kl": 0.5 / s, "neg_entropy": -40.0}) == "linear"
    assert scale(lambda s: {"decoder_nll": 80.0, "prior/kl": 0.5 / s}) == "log"  # positive and wide: log


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def test_the_report_in_a_real_browser(runs, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("no Chromium here: .ci/run installs Debian's chromium (apt-get install chromium)")
    out = tmp_path / "report.html"
    assert main(["report", *map(str, runs), "--out", str(out)]) == 0
    # a copy with a probe that writes what it saw into the title (the report itself has no scripts)
    probe = tmp_path / "probe.html"
    probe.write_text(out.read_text().replace("</body>", """<script>
window.addEventListener('load', () => { const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.title = 'loaded ' + ok + ' of ' + imgs.length; });</script></body>"""))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--enable-logging=stderr",
             "--v=0", "--virtual-time-budget=10000"]
    done = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", done.stdout)
    assert title, done.stderr[-2000:]
    loaded, total = map(int, re.findall(r"\d+", title.group(1)))
    assert total >= 8 and loaded == total, title.group(1)
    console = [line for line in done.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    artifacts = Path(os.environ.get("ELBOX_ARTIFACTS", tmp_path))
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "report-screenshot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1280,6000", out.as_uri()],
                   capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000
