"""`elbox train vae`, `elbox sample` in every VAE mode and `elbox evaluate --metric elbo|nll`, end to end in seconds."""

import json

from PIL import Image

from elbox.cli import main

TINY_VAE = ["vae", "--hidden", "32", "--latent-dim", "2", "--steps", "8", "--batch-size", "32", "--log-every", "4",
            "--sample-every", "4", "--num-samples", "8", "--final-eval-examples", "16", "--quiet"]


def test_vae_train_sample_evaluate(tmp_path, elbox_cli, capsys):
    run = tmp_path / "vae"
    r = elbox_cli("train", *TINY_VAE, "--out", run)
    assert r.returncode == 0, r.stderr
    assert "bits/dim of binarized data (not comparable with 8-bit bits/dim)" in r.stdout  # a Bernoulli VAE's data
    for name in ("samples.png", "reconstructions.png", "samples/step-0000004.png",
                 "samples/step-0000004-reconstructions.png", "checkpoints/step-0000008/manifest.json"):
        assert (run / name).is_file(), name
    assert 'model = "vae"' in (run / "config.toml").read_text()
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"decoder_nll", "kl", "nelbo", "bpd"} <= set(row)

    sizes = {}
    for mode, num in (("prior", 9), ("reconstruct", 8), ("interpolate", 16), ("manifold", 16)):
        assert main(["sample", str(run), "--mode", mode, "--num", str(num)]) == 0
        png = run / f"samples-{mode}-seed0.png"
        assert png.is_file() and str(png) in capsys.readouterr().out
        sizes[mode] = Image.open(png).size
    assert sizes["interpolate"][0] > sizes["interpolate"][1]  # two rows of 8 steps: wider than tall

    assert main(["evaluate", str(run), "--metric", "elbo", "--examples", "16", "--json"]) == 0
    elbo = json.loads(capsys.readouterr().out)
    assert main(["evaluate", str(run), "--metric", "nll", "--k", "20", "--examples", "16", "--json"]) == 0
    nll = json.loads(capsys.readouterr().out)
    assert nll["metric"] == "nll" and nll["k"] == 20 and nll["examples"] == 16
    assert main(["evaluate", str(run), "--metric", "nll", "--k", "20", "--examples", "16"]) == 0
    shown = capsys.readouterr()  # the bar counts importance samples, what each costs, and reaches them all
    assert "IWAE K=20 on 16 examples (1 network pass a sample)" in shown.err and "320/320" in shown.err
    assert f"{nll['nats']:.3f}" in shown.out  # the same estimate with the bar as without
    # the importance-weighted bound is tighter than the ELBO on the same examples (Burda et al. theorem 1)
    assert nll["nats"] <= elbo["nats"] + 3 * elbo["nats_stderr"]


def test_vae_bad_values_are_one_line_errors(tmp_path, capsys):
    for args, fragment in ((["--latent-dim", "0"], "latent"), (["--decoder-sigma", "-1", "--decoder", "gaussian"], "sigma")):
        assert main(["train", "vae", *args, "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and fragment in err[0], err
    assert main(["train", *TINY_VAE, "--out", str(tmp_path / "v")]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "v"), "--metric", "nll", "--k", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--k 0 is not allowed; use an integer >= 1" in err[0], err
    assert main(["sample", str(tmp_path / "v"), "--mode", "manifold", "--num", "0"]) == 2
