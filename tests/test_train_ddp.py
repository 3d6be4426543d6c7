"""Multi-process training through the real torchrun (gloo on the CPU): two processes with global batch B train the
same model as one process with batch B, resume under DDP, keep EMA identical on every rank, and only rank 0 writes.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from elbox.cli import main

# no dropout and no flips: those draw per process, so a split run matches one process only in distribution
FLAGS = ["--net", "micro", "--timesteps", "20", "--batch-size", "16", "--num-samples", "4", "--quiet", "--device", "cpu",
         "--log-every", "1", "--checkpoint-every", "4", "--keep-checkpoints", "10", "--final-eval-examples", "0"]


# one thread per process (two share the two cores); a rank that aborts in C++ prints every thread's Python stack
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}


def torchrun(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           "-m", "elbox", "train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:07d}"


def max_abs_diff(a: Path, b: Path, name: str) -> float:
    ta, tb = load_file(a / f"{name}.safetensors"), load_file(b / f"{name}.safetensors")
    assert ta.keys() == tb.keys()
    return max((ta[k].double() - tb[k].double()).abs().max().item() for k in ta)


def test_two_processes_match_one_resume_and_agree_on_ema(tmp_path, capsys):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["train", "--out", str(one), "--steps", "8", *FLAGS]) == 0

    first = torchrun("--out", two, "--steps", "4", *FLAGS)
    assert first.returncode == 0, first.stderr
    second = torchrun("--resume", two, "--steps", "8", "--final-eval-examples", "16", "--quiet")
    assert second.returncode == 0, second.stderr

    # the same weights as one process, within rounding (the two halves' gradients are averaged, not summed as one)
    diffs = {(step, name): max_abs_diff(checkpoint(one, step), checkpoint(two, step), name)
             for step in (4, 8) for name in ("model", "ema")}
    with capsys.disabled():
        print("\n2 processes vs 1, max |diff|:", {f"step {s} {n}": f"{d:.2g}" for (s, n), d in diffs.items()})
    assert max(diffs.values()) < 1e-5, diffs
    # ... and the logged loss (averaged over the ranks) follows the one-process run step by step
    rows_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_two] == list(range(1, 9))
    for a, b in zip(rows_one, rows_two):
        assert abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"]) and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4

    # EMA (and weights) bit-identical on both ranks at every checkpoint: each rank's digest is in the manifest
    for step in (4, 8):
        manifest = json.loads((checkpoint(two, step) / "manifest.json").read_text())
        digests = manifest["rank_digests"]
        assert sorted(digests) == ["0", "1"] and digests["0"] == digests["1"], digests
        assert sorted(manifest["loader"]) == ["0", "1"]  # each rank's data position, for resume

    # rank 0 alone writes: one summary line, and nothing in the run folder but one run's files
    for done in (first, second):
        assert sum(line.startswith("elbox: trained") for line in done.stdout.splitlines()) == 1, done.stdout
    assert sorted(p.name for p in two.iterdir() if p.name != "tensorboard") == [
        "checkpoints", "config.toml", "evaluations.jsonl", "loss.png", "metrics.jsonl", "samples.png"]
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-0000004", "step-0000008"]
    assert "held-out bound" in second.stdout

    # a DDP run's data order continues exactly only with as many processes
    capsys.readouterr()
    assert main(["train", "--resume", str(two), "--steps", "9"]) == 2
    assert "written by 2 process(es)" in capsys.readouterr().err


@pytest.mark.parametrize("deferred", [False, True])
def test_a_nan_on_one_process_skips_the_step_on_every_process_and_names_the_other_batch(tmp_path, monkeypatch,
                                                                                        deferred):
    """With --on-nonfinite skip, a NaN in one process's half of the batch skips the update on all of them (their
    weights stay equal), and rank 0, whose own half was finite, logs that the NaN was in another process's batch.
    Deferred: the same with the GPU's checks (the flags all-reduced on the device, the update skipped there)."""
    from ddp_one_rank_nan import run

    import elbox.training.loop

    monkeypatch.setattr(elbox.training.loop, "defer_checks", elbox.training.loop.defer_checks)  # run() may set it
    one, two = tmp_path / "one", tmp_path / "two"
    run(one, deferred)  # one process: the NaN is in its own batch, and is named by its term
    script = Path(__file__).with_name("ddp_one_rank_nan.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script), str(two), *(["deferred"] if deferred else [])],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr  # (the script also checks that the process group is torn down last)

    def skipped(run: Path) -> list[tuple[int, str]]:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], r["nonfinite"]) for r in rows if "nonfinite" in r]

    assert skipped(one) == [(3, "the prior term L_T")]
    assert skipped(two) == [(3, "the batch of another process")]
    for step in (2, 3, 4):
        digests = json.loads((checkpoint(two, step) / "manifest.json").read_text())["rank_digests"]
        assert digests["0"] == digests["1"], (step, digests)
    assert max_abs_diff(checkpoint(two, 2), checkpoint(two, 3), "model") == 0.0  # step 3's update was skipped
    assert max(max_abs_diff(checkpoint(one, 4), checkpoint(two, 4), name) for name in ("model", "ema")) < 1e-5


@pytest.mark.parametrize("deferred", [False, True])
def test_a_stop_on_one_process_stops_every_process_at_the_same_step(tmp_path, deferred):
    """Rank 1 is asked to stop during step 3: every process finishes that step and stops, saving it. With the GPU's
    deferred checks the flag is read a step late, so the processes stop after step 4 instead, and step 4 (whose NaN
    on rank 0 is skipped) is read before the last checkpoint is written."""
    script = Path(__file__).with_name("ddp_stop_on_one_rank.py")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                           str(script), str(tmp_path / "run"), *(["deferred"] if deferred else [])],
                          capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "run" / "result.json").read_text())
    if deferred:
        assert result == {"step": 4, "stopped_by": "SIGTERM", "skipped": 1, "checkpoints": ["step-0000004"],
                          "nonfinite": [[4, "the prior term L_T"]]}
    else:
        assert result == {"step": 3, "stopped_by": "SIGTERM", "skipped": 0, "checkpoints": ["step-0000003"],
                          "nonfinite": []}
