"""Failure paths (issue 12): each ends in one clear line, leaves nothing in the way of the corrected command, and
never reports a wrong number. One test per class of problem, on real runs and real files."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import FlakyDDPM, flaky_run

import elbox
from elbox import checkpoint as ckpt
from elbox.cli import main
from elbox.config import MODELS, DDPMConfig
from elbox.data.dataset import seeded_test_mask
from elbox.errors import UserError
from elbox.objectives.ddpm import DDPM
from elbox.objectives.gaussian import discretized_gaussian_log_likelihood
from elbox.training.loop import train

TINY = ["--net", "micro", "--timesteps", "5", "--steps", "2", "--batch-size", "8", "--checkpoint-every", "1",
        "--num-samples", "4", "--final-eval-examples", "8", "--quiet"]


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("elbox: error: ") and "Traceback" not in err[0], err
    return err[0]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("hardening") / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    return run


# ---------------------------------------------------------------------------------- nothing in the way
@pytest.mark.parametrize("flags, words", [
    (["--net", "nonet"], "is not a U-Net preset"),
    (["--data", "nosuchset"], "nosuchset"),
    (["--channels", "2"], "channels"),
    (["--compile", "--compile-backend", "nobackend"], "compile_backend"),
    (["--compile", "--compile-backend", "aot_eager", "--compile-mode", "reduce-overhead"],
     "compile_mode='reduce-overhead' needs compile_backend='inductor' (not 'aot_eager')"),
    (["--compile", "--compile-mode", "max-autotune", "--grad-accum", "2"],
     "compile_mode='max-autotune' (CUDA graphs) cannot accumulate gradients (grad_accum=2)"),
    # vectors a likelihood cannot take: refused before anything is written (they failed at the first step)
    (["--data", "toy2d:moons", "--data-kind", "8bit", "--net", "mlp"],
     "the training data toy2d:moons: this ddpm (data_kind='8bit') models 8-bit data on the grid of [-1, 1]"),
    (["vae", "--data", "toy2d:moons", "--decoder", "discretized-logistic"],
     "the training data toy2d:moons: the discretized-logistic decoder models 8-bit data on the grid"),
    (["vae", "--data", "toy2d:moons"], "the training data toy2d:moons: the bernoulli decoder models data in [0, 1]"),
])
def test_a_failed_start_creates_nothing(tmp_path, capsys, flags, words):
    out = tmp_path / "run"
    model, flags = (flags[:1], flags[1:]) if flags[0] == "vae" else ([], flags)
    tiny = ["--steps", "2", "--batch-size", "8", "--quiet"] if model else TINY
    assert main(["train", *model, "--out", str(out), *tiny, *flags]) == 2
    assert words in one_line(capsys)
    assert not out.exists()  # the corrected command is not refused for a folder the mistake made


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["train", "--out", str(tmp_path / "file"), *TINY]) == 2
    assert "is a file, not a folder" in one_line(capsys)
    assert (tmp_path / "file").read_text() == "mine"


def test_an_invalid_newer_checkpoint_is_moved_aside_and_the_run_resumes(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    foreign = run / "checkpoints" / "step-0000003"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a checkpoint")
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0
    assert "moved the invalid checkpoint" in capsys.readouterr().err
    assert (run / "checkpoints" / "step-0000003.invalid" / "notes.txt").is_file()  # nothing the user had is lost
    assert ckpt.latest_checkpoint(run).name == "step-0000004"


def _corrupt(folder):
    """Flip one byte of a checkpoint's weights: the manifest is intact, only its checksum can tell."""
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))


def test_a_checkpoint_that_fails_its_checksum_is_moved_aside_beside_earlier_ones(tiny_run, tmp_path):
    """The newest checkpoint has its manifest but a damaged file: only the checksum finds it. It is moved aside
    under a name no earlier move took (.invalid, then .invalid-1, .invalid-2, ...), and the one before it is used."""
    for taken, expected in [((), ".invalid"), ((".invalid",), ".invalid-1"), ((".invalid", ".invalid-1"), ".invalid-2")]:
        run = tmp_path / f"run{len(taken)}"
        shutil.copytree(tiny_run, run)
        root = run / "checkpoints"
        for suffix in taken:  # left by earlier moves: never overwritten
            (root / f"step-0000002{suffix}").mkdir()
            (root / f"step-0000002{suffix}" / "mine.txt").write_text(suffix)
        _corrupt(root / "step-0000002")
        found, notes = ckpt.latest_valid_checkpoint(run)
        assert found == root / "step-0000001"
        assert len(notes) == 1 and f"step-0000002{expected}" in notes[0]
        assert (root / f"step-0000002{expected}" / "manifest.json").is_file()
        for suffix in taken:
            assert (root / f"step-0000002{suffix}" / "mine.txt").read_text() == suffix


def test_the_latest_checkpoint_is_the_highest_step_past_seven_digits(tiny_run, tmp_path):
    """step-10000000 comes after step-9999999: folders are ordered by their step, not by their name."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    root = run / "checkpoints"
    (root / "step-0000001").rename(root / "step-9999999")
    (root / "step-0000002").rename(root / "step-10000000")
    assert ckpt.latest_valid_checkpoint(run) == (root / "step-10000000", [])


def test_a_run_whose_checkpoints_are_gone_is_not_silently_restarted(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "checkpoints")
    metrics = (run / "metrics.jsonl").read_text()
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 2
    assert "no valid checkpoint left" in one_line(capsys)
    assert (run / "metrics.jsonl").read_text() == metrics


def test_evaluate_never_overwrites_and_sample_writes_into_a_folder(tiny_run, tmp_path, capsys):
    mine = tmp_path / "steps.json"
    mine.write_text("mine")
    assert main(["evaluate", str(tiny_run), "--examples", "4", "--per-step", str(mine)]) == 2
    assert "never overwrites" in one_line(capsys) and mine.read_text() == "mine"
    folder = tmp_path / "pngs"
    folder.mkdir()
    assert main(["sample", str(tiny_run), "--num", "4", "--out", str(folder)]) == 0
    assert [p.name for p in folder.iterdir()] == ["samples-prior-seed0.png"]


def test_a_sample_grid_is_named_for_what_drew_it(tiny_run, tmp_path, capsys):
    """Sampler, steps, eta, raw weights and a named checkpoint are in the file name (a DDIM grid and an ancestral
    grid of one seed are told apart); the defaults add nothing."""
    folder = tmp_path / "named"
    checkpoints = sorted((tiny_run / "checkpoints").iterdir())
    for flags, run in (([], tiny_run), (["--sampler", "ddim", "--sampling-steps", "3"], tiny_run),
                       (["--sampler", "ddim", "--sampling-steps", "3", "--eta", "0.5"], tiny_run),
                       (["--sampler", "ddim"], tiny_run), (["--sampler", "ddim", "--sampling-steps", "5"], tiny_run),
                       (["--no-ema", "--seed", "2"], tiny_run),
                       (["--sampler", "ddim", "--sampling-steps", "3"], checkpoints[0])):
        assert main(["sample", str(run), "--num", "2", "--out", str(folder), *flags]) == 0
    capsys.readouterr()
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "samples-prior-seed0.png", "samples-prior-ddim3-seed0.png", "samples-prior-ddim3-eta0.5-seed0.png",
        "samples-prior-ddim5-seed0.png", "samples-prior-ddim5-seed0-1.png",  # all T = 5 steps, twice the same
        "samples-prior-noema-seed2.png",
        f"samples-prior-ddim3-{checkpoints[0].name}-seed0.png"])


def test_mistaken_paths_get_the_message_about_the_mistake(tiny_run, tmp_path, capsys):
    """A run folder where a config file is meant, RUN/checkpoints where a run is meant, a mistyped run beside an
    existing report, a resume naming another model: each message is about what was mistaken (found by a
    newcomer's run)."""
    assert main(["train", "--config", str(tiny_run), "--out", str(tmp_path / "x")]) == 2
    assert one_line(capsys) == (f"elbox: error: config file {tiny_run} is a folder, not a TOML file; did you mean "
                                f"{tiny_run / 'config.toml'}?")
    assert main(["sample", str(tiny_run / "checkpoints"), "--num", "2", "--out", str(tmp_path / "c.png")]) == 0
    capsys.readouterr()
    (tmp_path / "report.html").write_text("mine")
    assert main(["report", str(tmp_path / "nosuchrun"), "--out", str(tmp_path / "report.html")]) == 2
    err = one_line(capsys)
    assert "nosuchrun" in err and "report.html" not in err
    assert main(["train", "vae", "--resume", str(tiny_run)]) == 2
    assert one_line(capsys) == f"elbox: error: {tiny_run} is a run of a DDPM, not a VAE"
    assert main(["train", "vae", "--resume", str(tiny_run / "checkpoints")]) == 2  # RUN/checkpoints: the run
    assert one_line(capsys) == f"elbox: error: {tiny_run} is a run of a DDPM, not a VAE"


def test_sample_out_is_a_png_file_or_a_folder_and_nothing_else(tiny_run, tmp_path, capsys):
    def sample(out):
        return main(["sample", str(tiny_run), "--num", "4", "--out", out])

    # a name ending in "/", or one without a suffix, is a folder (made); FILE.png is the file itself
    assert sample(str(tmp_path / "new") + "/") == 0 and sample(str(tmp_path / "grid")) == 0
    assert sample(str(tmp_path / "one.png")) == 0
    for png in (tmp_path / "new" / "samples-prior-seed0.png", tmp_path / "grid" / "samples-prior-seed0.png",
                tmp_path / "one.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
    # any other suffix is refused before anything is drawn or written; a file without a suffix is not a folder
    (tmp_path / "report.html").write_text("mine")
    (tmp_path / "notes").write_text("mine")
    capsys.readouterr()
    for bad in ("foo.jpg", "report.html"):
        assert sample(str(tmp_path / bad)) == 2
        assert "writes a PNG grid or an .npz of the samples; give a name ending in .png or .npz" in one_line(capsys)
    assert sample(str(tmp_path / "notes")) == 2 and "is a file, not a folder, a .png or an .npz" in one_line(capsys)
    # a place that cannot hold a file is said before anything is drawn (not after hours of sampling)
    assert sample(str(tmp_path / "notes" / "grid.png")) == 2
    assert f"{tmp_path / 'notes'} is not a folder this user can write in" in one_line(capsys)
    assert (tmp_path / "report.html").read_text() == "mine" and (tmp_path / "notes").read_text() == "mine"
    assert not (tmp_path / "foo.jpg").exists() and not list(tmp_path.glob("report-*"))


def test_sample_out_npz_holds_the_samples_themselves_as_uint8_nhwc(tiny_run, tmp_path, capsys):
    """FILE.npz: arr_0, uint8 (N, H, W, C), the very samples the grid of the same seed shows (the layout FID
    tools read); never over an existing file."""
    import numpy as np

    from elbox.api import draw, load
    from elbox.config import SampleConfig
    from elbox.data import from_model

    assert main(["sample", str(tiny_run), "--num", "5", "--seed", "4", "--out", str(tmp_path / "s.npz")]) == 0
    assert main(["sample", str(tiny_run), "--num", "5", "--seed", "4", "--out", str(tmp_path / "s.npz")]) == 0
    capsys.readouterr()
    with np.load(tmp_path / "s.npz") as f, np.load(tmp_path / "s-1.npz") as again:
        arr = f["arr_0"]
        assert arr.dtype == np.uint8 and arr.shape == (5, 8, 8, 1) and (arr == again["arr_0"]).all()
    want = from_model(draw(load(tiny_run), SampleConfig(num=5, seed=4)), "symmetric").permute(0, 2, 3, 1).numpy()
    assert (arr == want).all() and arr.std() > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s-1.npz", "s.npz"]  # no temporary file left behind


def test_sample_and_evaluate_compile_the_networks_and_give_the_same_numbers(tiny_run, tmp_path, capsys):
    """--compile on sample and evaluate hands the loaded networks to torch.compile (aot_eager here: inductor takes
    minutes on a CPU), and the samples and the bound are those of the eager networks. (Whether CUDA graphs pay:
    benchmarks/gpu_check.py's sampling stage.)"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    draws = ["--num", "5", "--seed", "4", "--sampler", "ddim", "--sampling-steps", "3"]
    assert main(["sample", str(tiny_run), *draws, "--out", str(tmp_path / "eager.npz")]) == 0
    assert main(["evaluate", str(tiny_run), "--examples", "6", "--json"]) == 0
    eager = json.loads(capsys.readouterr().out.splitlines()[-1])
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = ["--compile", "--compile-backend", "aot_eager"]
        assert main(["sample", str(tiny_run), *draws, *compiled, "--out", str(tmp_path / "compiled.npz")]) == 0
        sampled = counters["stats"]["unique_graphs"]
        assert counters["frames"]["ok"] > 0 and sampled > 0, dict(counters)
        assert "note: --compile: the networks are compiled at their first call (aot_eager)" in capsys.readouterr().err
        assert main(["evaluate", str(tiny_run), "--examples", "6", "--json", *compiled]) == 0
        assert counters["stats"]["unique_graphs"] > sampled, dict(counters["stats"])  # a new load, compiled anew
    finally:
        torch._dynamo.reset()
        counters.clear()
    again = json.loads(capsys.readouterr().out.splitlines()[-1])
    # a backend torch lists but cannot run without its package (tvm): one line at the first compiled call
    assert main(["sample", str(tiny_run), *draws, "--compile", "--compile-backend", "tvm", "--out",
                 str(tmp_path / "tvm.npz")]) == 2
    note, error = capsys.readouterr().err.strip().splitlines()
    assert note.startswith("elbox: note: --compile") and "Traceback" not in error
    assert error.startswith("elbox: error: --compile-backend tvm failed at the first compiled call: ")
    assert error.endswith("use --compile-backend inductor (or aot_eager)") and not (tmp_path / "tvm.npz").exists()
    # aot_eager runs the eager kernels: the same numbers to the bit
    assert again["bpd"] == eager["bpd"] and again["examples"] == eager["examples"] == 6
    with np.load(tmp_path / "eager.npz") as a, np.load(tmp_path / "compiled.npz") as b:
        assert (a["arr_0"] == b["arr_0"]).all() and a["arr_0"].std() > 0


def test_a_compile_backend_that_cannot_run_here_stops_training_in_one_line_that_works(tmp_path, capsys):
    """tvm is listed by torch but needs apache-tvm: the first step fails in the run folder it made; the line says so
    and names a command that starts the run over (here with aot_eager, where the line says inductor: minutes)."""
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY, "--compile", "--compile-backend", "tvm"]) == 2
    line = one_line(capsys)
    assert line.startswith("elbox: error: --compile-backend tvm failed at the first compiled call: ")
    assert line.endswith(f"`elbox train --resume {run} --compile-backend inductor` starts it over with another backend")
    assert main(["train", "--resume", str(run), "--compile-backend", "aot_eager", "--quiet"]) == 0
    assert ckpt.latest_checkpoint(run) is not None


def test_an_npz_holds_prior_samples_only(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(["train", "vae", "--out", str(run), "--hidden", "16", "--latent-dim", "2", "--steps", "2",
                 "--batch-size", "8", "--num-samples", "4", "--final-eval-examples", "8", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--mode", "reconstruct", "--num", "4", "--out", str(tmp_path / "r.npz")]) == 2
    assert "an .npz holds prior samples" in one_line(capsys) and not (tmp_path / "r.npz").exists()
    assert main(["sample", str(run), "--num", "3", "--out", str(tmp_path / "p.npz")]) == 0


@pytest.mark.parametrize("argv, words", [
    (["sample", "RUN", "--batch-size", "0"], "--batch-size 0"),
    (["evaluate", "RUN", "--batch-size", "-3"], "--batch-size -3"),
    (["evaluate", "RUN", "--k", "0", "--metric", "nll"], "--k 0"),
    (["sample", "RUN", "--sampling-steps", "0", "--sampler", "ddim"], "--sampling-steps 0"),
    (["sample", "RUN", "--precision", "fp16", "--device", "cpu"], "fp16' needs a GPU"),
    (["sample", "RUN", "--precision", "bf17"], "bf17"),
    (["sample", "RUN", "--eta", "0.5"], "--eta 0.5 is DDIM's"),  # before anything is loaded or drawn
    (["evaluate", "RUN", "--metric", "fid", "--eta", "0.5", "--fid-weights", "/nonexistent.pt"], "--eta 0.5 is DDIM's"),
    (["sample", "RUN", "--compile-mode", "reduce-overhead"], "--compile-mode takes effect with --compile only"),
    (["evaluate", "RUN", "--compile-backend", "eager"], "--compile-backend takes effect with --compile only"),
    (["sample", "RUN", "--compile", "--compile-backend", "nobackend"], "compile_backend='nobackend' is not known"),
    (["evaluate", "RUN", "--compile", "--compile-backend", "eager", "--compile-mode", "reduce-overhead"],
     "compile_mode='reduce-overhead' needs compile_backend='inductor' (not 'eager')"),
])
def test_sample_and_evaluate_settings_are_checked(tiny_run, capsys, argv, words):
    assert main([str(tiny_run) if a == "RUN" else a for a in argv]) == 2
    assert words in one_line(capsys)


def test_a_mistyped_data_dir_offline_creates_nothing(tmp_path, capsys, monkeypatch):
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):  # this machine is offline anyway; a CI machine might not be
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    where = tmp_path / "typo" / "deeper"
    assert main(["train", "--out", str(tmp_path / "run"), "--data", "mnist", "--data-dir", str(where), *TINY]) == 2
    one_line(capsys)
    assert not (tmp_path / "typo").exists() and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- non-finite numbers
class NaNWeightsDDPM(FlakyDDPM):
    """From step 1 on, a weight is NaN (a blown-up update): every later loss is NaN too."""

    def losses(self, x, *, step=0):
        if step >= 1:
            with torch.no_grad():
                next(self.net.parameters()).view(-1)[0] = float("nan")
        return super().losses(x, step=step)


def test_skipping_stops_after_max_skips_in_a_row(monkeypatch, tmp_path):
    cfg, run = flaky_run(monkeypatch, tmp_path, {}, steps=20, on_nonfinite="skip", max_skips=3)
    monkeypatch.setitem(MODELS, "flaky", (DDPMConfig, NaNWeightsDDPM))
    cfg.train.checkpoint_every = 100
    with pytest.raises(UserError, match="in 3 steps in a row, the last at step 4; stopped; no checkpoint was written"):
        train(cfg, run)


def test_a_nan_checkpoint_is_never_saved(monkeypatch, tmp_path):
    cfg, run = flaky_run(monkeypatch, tmp_path, {}, steps=20, on_nonfinite="skip")  # a checkpoint every step
    monkeypatch.setitem(MODELS, "flaky", (DDPMConfig, NaNWeightsDDPM))
    with pytest.raises(UserError, match="the weights hold NaN/Inf at step 2; not saved; the last checkpoint, .*"
                                        "step-0000001, is untouched"):
        train(cfg, run)
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000001"]


def test_a_nan_checkpoint_is_refused_by_sample_and_evaluate(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    state = ckpt.load_checkpoint(run)
    nan = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v for k, v in state.model.items()}
    ckpt.save_checkpoint(run, state.step + 1, description=state.description, model_state=nan, ema_state=nan,
                         optimizer_state=None, rng=state.rng, extra={"loader": state.manifest["loader"]}, keep=5)
    for argv in (["sample", str(run)], ["evaluate", str(run), "--examples", "4"]):
        assert main(argv) == 2
        assert "holds NaN/Inf weights" in one_line(capsys)


def test_the_discretized_gaussian_gradient_is_right_far_in_the_tail():
    """log_ndtr's float32 gradient was off by 10x and then non-finite beyond ~10^3 scales: float64 inside."""
    x = torch.tensor([1.0, -1.0, 0.0, 0.5])
    grads = []
    for dtype in (torch.float32, torch.float64):
        mean = torch.tensor([-0.9, 0.9, 0.9, -0.5], dtype=dtype, requires_grad=True)
        log_scale = torch.full((4,), -9.0, dtype=dtype, requires_grad=True)  # |x - mean| / sigma ~ 10^4
        discretized_gaussian_log_likelihood(x.to(dtype), mean, log_scale).sum().backward()
        grads.append(torch.cat([mean.grad, log_scale.grad]).double())
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=0.0)


def test_a_density_is_not_called_bits_per_dim(tmp_path, capsys):
    run = tmp_path / "vae"
    assert main(["train", "vae", "--out", str(run), "--decoder", "gaussian", "--hidden", "16", "--latent-dim", "2",
                 *TINY[4:]]) == 0
    assert "bits/dim of a density (continuous data" in capsys.readouterr().out
    assert main(["evaluate", str(run), "--examples", "4"]) == 0
    assert "bits/dim of a density" in capsys.readouterr().out
    assert not elbox.load(run).discrete


# ---------------------------------------------------------------------------------- data edges
def test_a_seeded_split_of_two_or_more_keeps_both_sides():
    for n in range(2, 30):
        mask = seeded_test_mask([f"img{i}.png" for i in range(n)], seed=0)
        assert mask.any() and not mask.all(), n


def test_skip_bad_reports_the_files_it_skipped(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(12):
        Image.new("L", (8, 8), color=i * 20).save(folder / f"{i:02d}.png")
    for name in ("bad1.png", "bad2.png"):
        (folder / name).write_text("not an image")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", f"folder:{folder}", *TINY]) == 2
    message = one_line(capsys)
    assert "cannot read 2 image file(s)" in message and "bad1.png" in message and "bad2.png" in message
    assert main(["train", "--out", str(run), "--data", f"folder:{folder}", "--skip-bad", *TINY]) == 0
    out = capsys.readouterr().out
    assert "2 unreadable data file(s) skipped (bad1.png, bad2.png" in out
    assert (run / "skipped-files.txt").read_text().split() == ["bad1.png", "bad2.png"]


# ---------------------------------------------------------------------------------- one line, right words
@pytest.mark.parametrize("argv, words", [
    (["train", "--latent-dim", "3"], "--latent-dim is a flag of the vae model: `elbox train vae --latent-dim"),
    (["train", "vae", "--timesteps", "3"], "--timesteps is a flag of the ddpm and ldm models: `elbox train ddpm"),
    (["train", "--vae", "RUN"], "--vae is a flag of the ldm model: `elbox train ldm --vae"),
    (["train", "ddmp", "--steps", "3"], "unknown model 'ddmp'; did you mean ddpm? (models: ddpm, vae, ldm)"),
    (["train", "VAE"], "unknown model 'VAE'; did you mean vae?"),
    (["train", "--steps", "3", "vae"], "the model comes first: `elbox train vae [flags]`"),
    (["train", "--learning-rate", "1e-3"], "elbox calls it --lr"),
    (["sample", "RUN", "--num-inference-steps", "3"], "elbox calls it --sampling-steps"),
    (["train", "--lrr", "1"], "did you mean --lr?"),
])
def test_flag_mistakes_name_the_right_flag(capsys, argv, words):
    assert main([a if a != "RUN" else "x" for a in argv]) == 2
    assert words in one_line(capsys)


def test_the_manifest_is_validated_before_anything_is_built(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    path = ckpt.latest_checkpoint(run)
    manifest = json.loads((path / ckpt.MANIFEST).read_text())
    for change, words in (
        (lambda m: m["files"].update({"../../x": "0" * 64}), "unknown file '../../x'"),
        (lambda m: m["files"].pop("model.safetensors"), "files must map model.safetensors"),
        (lambda m: m["model"].update(data_shape=[1, 100000, 100000]), "data_shape"),
        (lambda m: m["model"]["config"].update(base_channels=4000), "different model"),
        (lambda m: m["model"].update(data=[1]), "model.data must be an object"),
        (lambda m: m.update(step="3"), "step must be an integer"),
    ):
        bad = json.loads(json.dumps(manifest))
        change(bad)
        bad["checksum"] = ckpt._manifest_checksum(bad)  # anyone can recompute it
        (path / ckpt.MANIFEST).write_text(json.dumps(bad))
        assert main(["sample", str(path)]) == 2
        assert words in one_line(capsys), words


def test_a_folder_too_small_for_a_test_split_still_finishes(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "imgs").mkdir()
    Image.new("L", (8, 8), color=100).save(tmp_path / "imgs" / "a.png")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", f"folder:{tmp_path / 'imgs'}", "--batch-size", "1",
                 "--net", "micro", "--timesteps", "5", "--steps", "2", "--num-samples", "4", "--quiet"]) == 0
    assert "no held-out bound: the test split" in capsys.readouterr().err
    assert ckpt.latest_checkpoint(run).name == "step-0000002"


def test_vector_data_gets_the_mlp_by_default(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", "toy2d:moons", "--timesteps", "5", "--steps", "2",
                 "--batch-size", "16", "--final-eval-examples", "16", "--quiet"]) == 0
    assert elbox.load(run).config.net == "auto" and type(elbox.load(run).net).__name__ == "MLPDenoiser"


def test_images_get_the_tiny_unet_by_default():
    auto, tiny = (DDPM(DDPMConfig(data_kind="8bit", **net), (1, 8, 8)).net for net in ({}, {"net": "tiny"}))
    assert type(auto).__name__ == "UNet" and str(auto) == str(tiny)


def test_a_ddpm_on_images_that_are_not_square_is_refused_at_build():
    with pytest.raises(UserError, match="8x12 are not square"):
        DDPM(DDPMConfig(data_kind="8bit", net="micro"), (1, 8, 12))


@pytest.mark.parametrize("make, words", [
    (lambda: elbox.VAEConfig(iwae_k=2.5), "VAEConfig.iwae_k=2.5 must be an integer"),
    (lambda: elbox.VAEConfig(hidden=[64, 2.5]), "VAEConfig.hidden=[64, 2.5] must be a list of integers"),
    (lambda: elbox.VAEConfig(beta="1"), "VAEConfig.beta='1' must be a number"),
    (lambda: elbox.VAEConfig(activation="gelu"), "VAEConfig.activation='gelu' is not allowed; choose one of tanh"),
    (lambda: DDPMConfig(timesteps=2.5), "DDPMConfig.timesteps=2.5 must be an integer"),
    (lambda: DDPMConfig(clip_denoised="no"), "DDPMConfig.clip_denoised='no' must be true or false"),
    (lambda: elbox.LDMConfig(vae=None), "LDMConfig.vae=None must be a string"),
    (lambda: elbox.TrainConfig(steps="100"), "TrainConfig.steps='100' must be an integer"),
    (lambda: elbox.DataConfig(image_size=28.0), "DataConfig.image_size=28.0 must be an integer"),
])
def test_a_config_built_in_python_checks_its_types_in_one_line(make, words):
    # The Python API gets the check a config file gets: a wrong type is refused at construction with the class
    # and field named, not a TypeError (or a silent truncation) deep inside a model later.
    with pytest.raises(UserError) as e:
        make()
    assert words in str(e.value) and "\n" not in str(e.value)


def test_a_config_built_in_python_takes_lists_and_ints_where_tuples_and_floats_are_meant():
    c = elbox.VAEConfig(hidden=[64, 32], beta=1)
    assert c.hidden == (64, 32) and isinstance(c.beta, float)
    assert elbox.DataConfig(image_size=None).image_size is None
    # numpy numbers and arrays, and paths, as a script computes them: stored as the plain types a config file holds
    c = elbox.VAEConfig(hidden=np.array([32, 16]), latent_dim=np.int64(8), beta=np.float32(0.5))
    assert c.hidden == (32, 16) and type(c.hidden[0]) is int and type(c.latent_dim) is int and c.beta == 0.5
    assert type(elbox.VAEConfig(hidden=[np.int64(32), 16]).hidden[0]) is int  # as TOML would write it
    train = elbox.TrainConfig(steps=np.int64(10), lr=np.float32(0.25))
    assert type(train.steps) is int and "steps = 10" in elbox.RunConfig(train=train).to_toml()  # TOML takes plain types
    assert elbox.DataConfig(data_dir=Path("some/dir")).data_dir == "some/dir"


def test_an_npz_of_colour_samples_holds_the_grids_pixels_channel_for_channel(tmp_path, capsys):
    """RGB data: arr_0[n, i, j] is pixel (i, j) of sample n in R, G, B order, as the PNG grid of the same seed
    shows it (the grid scales each 8-pixel image 8 times, 2 px apart)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--data", f"folder:{folder}", "--net", "micro", "--timesteps", "5",
                 "--steps", "2", "--batch-size", "8", "--num-samples", "4", "--final-eval-examples", "0",
                 "--quiet"]) == 0
    for out in ("s.npz", "s.png"):
        assert main(["sample", str(run), "--num", "2", "--out", str(tmp_path / out)]) == 0
    capsys.readouterr()
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    grid = np.asarray(Image.open(tmp_path / "s.png").convert("RGB"))
    assert arr.shape == (2, 8, 8, 3) and arr.dtype == np.uint8 and len(np.unique(arr)) > 10
    assert (grid[2:66:8, 2:66:8] == arr[0]).all() and (grid[2:66:8, 68:132:8] == arr[1]).all()


def test_a_manifold_still_draws_when_the_data_has_moved(tmp_path, capsys):
    """--mode manifold picks the most active latent dimensions from test data; without the data (a folder moved)
    the checkpoint alone still draws it, over the first two dimensions, as prior samples do."""
    import shutil

    import numpy as np
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(40):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(folder / f"{i}.png")
    run = tmp_path / "vae"
    assert main(["train", "vae", "--out", str(run), "--data", f"folder:{folder}", "--hidden", "16", "--latent-dim",
                 "4", "--steps", "2", "--batch-size", "8", "--num-samples", "4", "--final-eval-examples", "0",
                 "--quiet"]) == 0
    assert main(["sample", str(run), "--mode", "manifold", "--num", "4", "--out", str(tmp_path / "a.png")]) == 0
    shutil.move(folder, tmp_path / "elsewhere")
    assert main(["sample", str(run), "--mode", "manifold", "--num", "4", "--out", str(tmp_path / "b.png")]) == 0
    capsys.readouterr()
