"""`elbox train ldm --vae RUN` end to end, in seconds: a VAE, then a DDPM prior over its latents (vector latents
with an MLP denoiser, spatial latents with a U-Net), evaluated with its own bound and sampled."""

import json
import shutil

import pytest
import torch

import elbox
from elbox.config import load_run_config

QUICK = ["--steps", "4", "--batch-size", "16", "--log-every", "2", "--checkpoint-every", "4", "--num-samples", "4",
         "--final-eval-examples", "16", "--quiet"]
VECTOR_VAE = ["--latent-dim", "4", "--hidden", "32", "--decoder", "discretized-logistic"]
SPATIAL_VAE = ["--arch", "conv", "--conv-channels", "8", "8", "--latent-channels", "2", "--decoder",
               "discretized-logistic"]


@pytest.mark.parametrize("vae_flags, prior_flags", [(VECTOR_VAE, ["--net", "mlp"]), (SPATIAL_VAE, ["--net", "micro"])],
                         ids=["vector", "spatial"])
def test_train_evaluate_sample_a_latent_diffusion_model(tmp_path, elbox_cli, vae_flags, prior_flags):
    vae_run, run = tmp_path / "vae", tmp_path / "ldm"
    r = elbox_cli("train", "vae", "--out", vae_run, *vae_flags, *QUICK)
    assert r.returncode == 0, r.stderr
    r = elbox_cli("train", "ldm", "--vae", vae_run, "--out", run, "--timesteps", "10", *prior_flags, *QUICK)
    assert r.returncode == 0, r.stderr
    assert "held-out bound" in r.stdout and (run / "samples.png").is_file()
    assert load_run_config(run / "config.toml").data == load_run_config(vae_run / "config.toml").data  # its VAE's
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"decoder_nll", "neg_entropy", "log_scale", "prior/steps", "prior/prior", "nelbo", "bpd"} <= set(rows[-1])

    e = elbox_cli("evaluate", run, "--examples", "8", "--json", "--per-step", tmp_path / "steps.json")
    assert e.returncode == 0, e.stderr
    result = json.loads(e.stdout)
    assert set(result["terms"]) == {"decoder_nll", "neg_entropy", "log_scale", "prior/decoder_nll", "prior/kl",
                                    "prior/prior"}
    assert sum(result["terms"].values()) == pytest.approx(result["nats"], rel=1e-5)
    steps = json.loads((tmp_path / "steps.json").read_text())
    assert steps["labels"] == ["L_0", *[f"L_{t}" for t in range(1, 10)], "L_T"]

    n = elbox_cli("evaluate", run, "--metric", "nll", "--k", "3", "--examples", "8", "--json")
    assert n.returncode == 0, n.stderr
    assert json.loads(n.stdout)["metric"] == "nll" and json.loads(n.stdout)["k"] == 3

    # the checkpoint is complete: the VAE's weights and description travel with it
    shutil.move(vae_run, tmp_path / "elsewhere")
    model = elbox.load(run)
    assert model.kind == "ldm" and float(model.latent_scale) > 0
    x = model.sample(2, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=3)
    assert x.shape == (2, 1, 8, 8)
    s = elbox_cli("sample", run, "--num", "4", "--sampler", "ddim", "--sampling-steps", "3")
    assert s.returncode == 0, s.stderr


def test_config_toml_states_the_measured_scale_and_repeats_the_run_from_anywhere(tmp_path, elbox_cli):
    """config.toml says every value the run used: the latent scale measured at the start (not 0, "measure it"), the
    VAE's folder as an absolute path; `elbox train --config` from another working directory repeats the run."""
    assert elbox_cli("train", "vae", "--out", "vae", *VECTOR_VAE, *QUICK, cwd=tmp_path).returncode == 0
    r = elbox_cli("train", "ldm", "--vae", "vae", "--out", "ldm", "--timesteps", "10", *QUICK, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    config = load_run_config(tmp_path / "ldm" / "config.toml").model_config
    first = elbox.load(tmp_path / "ldm")
    assert config.vae == str((tmp_path / "vae").resolve())
    assert config.latent_scale == float(first.latent_scale) and config.latent_scale not in (0.0, 1.0)
    (tmp_path / "elsewhere").mkdir()
    again = elbox_cli("train", "--config", tmp_path / "ldm" / "config.toml", "--out", "again", cwd=tmp_path / "elsewhere")
    assert again.returncode == 0, again.stderr
    second = elbox.load(tmp_path / "elsewhere" / "again")
    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name]), name
    # the same file with another --vae: that VAE's description and scale, measured afresh (not the file's)
    assert elbox_cli("train", "vae", "--out", "vae2", "--seed", "5", *VECTOR_VAE, *QUICK, cwd=tmp_path).returncode == 0
    other = elbox_cli("train", "ldm", "--config", "ldm/config.toml", "--vae", "vae2", "--out", "other", cwd=tmp_path)
    assert other.returncode == 0, other.stderr
    config2 = load_run_config(tmp_path / "other" / "config.toml").model_config
    assert config2.vae == str((tmp_path / "vae2").resolve()) and config2.latent_scale != config.latent_scale
    assert config2.latent_scale == float(elbox.load(tmp_path / "other").latent_scale)
    # a resume takes its VAE's path however it is written (relative, a trailing slash)
    for steps, vae in ((5, "vae"), (6, "vae/")):
        more = elbox_cli("train", "ldm", "--resume", "ldm", "--vae", vae, "--steps", steps, "--quiet", cwd=tmp_path)
        assert more.returncode == 0, more.stderr
    moved = elbox_cli("train", "ldm", "--resume", "ldm", "--vae", "vae2", "--steps", "7", cwd=tmp_path)
    assert moved.returncode == 2 and "holds a different model" in moved.stderr


def test_latent_diffusion_needs_a_vae_run(tmp_path, elbox_cli):
    r = elbox_cli("train", "ldm", "--out", tmp_path / "x", *QUICK)
    assert r.returncode == 2 and "needs a trained VAE" in r.stderr and "Traceback" not in r.stderr
    ddpm = tmp_path / "ddpm"
    assert elbox_cli("train", "--out", ddpm, "--net", "micro", "--timesteps", "5", *QUICK).returncode == 0
    r = elbox_cli("train", "ldm", "--vae", ddpm, "--out", tmp_path / "y", *QUICK)
    assert r.returncode == 2 and "is a run of a DDPM, not a VAE" in r.stderr, r.stderr
    assert not (tmp_path / "y").exists()  # nothing in the way of the corrected command
