"""benchmarks/speed.py, elbox's side: one tiny timing of its real training step and sampler on CIFAR-10 (from
../shared/data; skipped without it). The peers' sides need the `bench` extra and are not run here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CIFAR = ROOT.parent / "shared" / "data" / "cifar10"


@pytest.mark.skipif(not CIFAR.is_dir(), reason="needs ../shared/data/cifar10")
def test_the_speed_benchmark_times_elbox_and_prints_a_json_line_and_a_table(tmp_path):
    out = tmp_path / "speed.jsonl"
    done = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--libraries", "elbox", "--precision", "fp32", "--warmup", "1",
         "--steps", "1", "--repeats", "2", "--sample-steps", "2", "--sample-batch", "2", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[0])
    assert "error" not in row, row
    assert row["library"] == "elbox" and row["preset"] == "small" and row["batch"] == 16
    assert row["params"] == 2_245_763  # Ho et al.'s U-Net at width 32 (the same count as diffusers' UNet2DModel)
    assert len(row["step_ms_blocks"]) == 2 and row["train_images_per_s"] > 0
    # forward + backward of the network: ~3x the forward's 2 x MACs; the counter sees every convolution
    assert 1.0 < row["gflop_per_image"] < 5.0
    assert 0 < row["fraction_of_peak"] < 1.5 and row["sample_step_ms"] > 0
    assert row["bound_10k_test_images_s"] > 0 and row["sample_10k_images_s"] > row["sample_step_ms"] / 1e3
    assert "elbox" in done.stdout.splitlines()[-1] and "train img/s" in done.stdout


def test_the_step_ops_benchmark_counts_fewer_operators_where_the_simple_loss_skips_the_bound():
    """benchmarks/step_ops.py: a simple-loss step that writes no metrics line runs fewer operators (no L_t); a
    hybrid-loss step trains on the bound, so it runs the same either way."""
    done = subprocess.run([sys.executable, "benchmarks/step_ops.py", "--nets", "micro", "--threads", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {r["loss"]: r for r in map(json.loads, done.stdout.splitlines()[:2])}
    assert rows["simple"]["ops_other_step"] < rows["simple"]["ops_logged_step"] - 50
    assert rows["hybrid"]["ops_other_step"] == rows["hybrid"]["ops_logged_step"] > rows["simple"]["ops_logged_step"]
    assert "| micro | simple |" in done.stdout
