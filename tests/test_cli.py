"""The `elbox` command end to end, with a tiny model on the embedded data, in seconds; and its one-line errors."""

import json
import re

import pytest
from PIL import Image

from elbox.cli import main

TINY_DDPM = ["--net", "micro", "--timesteps", "20", "--steps", "6", "--batch-size", "16", "--log-every", "2",
             "--checkpoint-every", "3", "--num-samples", "4", "--final-eval-examples", "16", "--quiet"]


def test_help_lists_commands_and_typed_flags_with_defaults(elbox_cli):
    top = elbox_cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("train", "sample", "evaluate"))
    train = elbox_cli("train", "--help")
    assert train.returncode == 0
    for fragment in ("--timesteps", "(default: 1000)", "{linear,cosine}", "--hflip", "--no-hflip", "--precision"):
        assert fragment in train.stdout
    for cmd in ("sample", "evaluate"):
        assert elbox_cli(cmd, "--help").returncode == 0
    for cmd in (("train",), ("sample",), ("evaluate",)):
        text = " ".join(elbox_cli(*cmd, "--help").stdout.split())  # argparse wraps lines
        assert not re.search(r"\(default: [^)]*\) \(default:", text), cmd  # one default per flag, not two


def test_train_sample_evaluate_end_to_end(tmp_path, elbox_cli):
    run = tmp_path / "run"
    r = elbox_cli("train", "--out", run, *TINY_DDPM)
    assert r.returncode == 0, r.stderr
    assert "held-out bound" in r.stdout and "bits/dim" in r.stdout and str(run / "samples.png") in r.stdout
    for name in ("config.toml", "metrics.jsonl", "samples.png", "loss.png"):
        assert (run / name).is_file(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r_["step"] for r_ in rows] == [2, 4, 6]
    assert {"loss", "nelbo", "bpd", "steps", "prior", "mse", "lr", "grad_norm", "images_per_s"} <= set(rows[0])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000003", "step-0000006"]
    assert Image.open(run / "samples.png").size[0] >= 64

    s = elbox_cli("sample", run, "--num", "4", "--sampler", "ddim", "--sampling-steps", "5", "--seed", "3")
    assert s.returncode == 0, s.stderr
    png = run / "samples-prior-ddim5-seed3.png"  # what drew it is in the name
    assert str(png) in s.stdout and png.is_file()
    assert "ddim sampling: 4 samples, 5 steps x 1 batch" in s.stderr and "5/5" in s.stderr  # a bar over the chain
    b = elbox_cli("sample", run, "--num", "3", "--batch-size", "2", "--out", tmp_path / "two.png")
    assert b.returncode == 0 and "ancestral sampling: 3 samples, 20 steps x 2 batches" in b.stderr and "40/40" in b.stderr
    again = elbox_cli("sample", run, "--num", "4", "--sampler", "ddim", "--sampling-steps", "5", "--seed", "3")
    assert (run / "samples-prior-ddim5-seed3-1.png").is_file(), "a second sample must not overwrite the first"
    assert again.returncode == 0
    assert (run / "samples-prior-ddim5-seed3-1.png").read_bytes() == png.read_bytes(), "same seed, same samples"

    e = elbox_cli("evaluate", run, "--metric", "bpd", "--examples", "8", "--json", "--per-step", tmp_path / "steps.json")
    assert e.returncode == 0, e.stderr
    result = json.loads(e.stdout)
    assert result["examples"] == 8 and result["dims"] == 64 and result["bpd"] > 0
    per_step = json.loads((tmp_path / "steps.json").read_text())["nats_per_example"]
    assert len(per_step) == 20 + 1  # L_0, L_1 .. L_19 (the KL terms), L_T
    assert sum(per_step) == pytest.approx(result["nats"], rel=1e-4)


def test_a_progress_bar_into_a_log_file_is_drawn_at_its_start_and_its_end(tmp_path, elbox_cli):
    """stderr is a pipe here, as in a log file or CI: the bar is not redrawn ten times a second (a 300-step run
    wrote 30 KB of redraws), only every 30 s, and always at its start and its end."""
    r = elbox_cli("train", "--out", tmp_path / "run", "--net", "micro", "--timesteps", "20", "--steps", "80",
                  "--batch-size", "8", "--final-eval-examples", "0", "--num-samples", "4")
    assert r.returncode == 0, r.stderr
    draws = [line for line in r.stderr.replace("\r", "\n").splitlines() if line.startswith("train:")]
    assert len(draws) == 2 and "0/80" in draws[0] and "80/80" in draws[1], draws


def test_config_file_round_trip_and_flags_override_it(tmp_path, elbox_cli):
    run = tmp_path / "a"
    assert elbox_cli("train", "--out", run, *TINY_DDPM, "--steps", "2", "--final-eval-examples", "0").returncode == 0
    text = (run / "config.toml").read_text()
    assert 'model = "ddpm"' in text and "timesteps = 20" in text and "final_eval_examples = 0" in text
    run_b = tmp_path / "b"
    r = elbox_cli("train", "--config", run / "config.toml", "--out", run_b, "--steps", "3")
    assert r.returncode == 0, r.stderr
    assert "steps = 3" in (run_b / "config.toml").read_text()
    assert "timesteps = 20" in (run_b / "config.toml").read_text()


@pytest.mark.parametrize("args,fragment", [
    (["train", "--stepz", "3"], "did you mean --steps"),
    (["train", "--timesteps", "0"], "timesteps=0"),
    (["train", "--timesteps", "ten"], "is not an integer"),
    (["train", "--schedule", "quadratic"], "invalid choice"),
    (["train", "--beta-end", "1.5"], "(0, 1)"),
    (["train", "--data", "nosuchset"], "nosuchset"),
    (["trian"], "did you mean 'train'"),
    (["sample", "/nonexistent/run"], "does not exist"),
    (["evaluate", "/nonexistent/run"], "does not exist"),
])
def test_user_mistakes_are_one_line_errors(tmp_path, capsys, args, fragment):
    # in-process (fast); test_train_sample_evaluate_end_to_end runs the real command in a subprocess
    argv = [*args, "--out", str(tmp_path / "x")] if args[0] == "train" else args
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("elbox: error:") and fragment in lines[0]


def test_unknown_config_key_suggests_the_nearest(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "ddpm"\n[ddpm]\ntimestep = 10\n')
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'timesteps'" in err and len(err.strip().splitlines()) == 1
    cfg.write_text('model = "ddpm"\n[train]\nsteps = "many"\n')
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "train.steps" in err and "integer" in err
    assert not (tmp_path / "x").exists()


def test_an_existing_run_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--out", str(run), *TINY_DDPM]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "mine" and sorted(p.name for p in run.iterdir()) == ["notes.txt"]
