"""The ELBO contract (objectives/base.py, objectives/terms.py): one signature per verb for every model, terms that
compose, what the data is declared rather than guessed, capabilities instead of type checks, and inference that
does not depend on training."""

import ast
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal

from elbox.api import sampler_options
from elbox.config import MODELS, DataConfig, RunConfig, SampleConfig, TrainConfig, load_run_config
from elbox.errors import UserError
from elbox.objectives.base import ELBOModel
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.latent import LDM, LDMConfig
from elbox.objectives.terms import Terms, log_mean_exp_in_chunks
from elbox.objectives.vae import VAE, VAEConfig
from elbox.training.loop import train

SRC = Path(__file__).resolve().parents[1] / "src" / "elbox"


def small_models():
    torch.manual_seed(0)
    return {
        "ddpm": DDPM(DDPMConfig(data_kind="8bit", net="micro", timesteps=5), (1, 8, 8)),
        "vae": VAE(VAEConfig(hidden=(16,), latent_dim=3), (1, 8, 8)),
    }


# ------------------------------------------------------------------------------------------ one signature per verb
@pytest.mark.parametrize("kind", list(MODELS))
def test_every_model_has_one_signature_per_verb(kind):
    cls = MODELS[kind][1]
    losses = inspect.signature(cls.losses).parameters
    assert losses["step"].kind is inspect.Parameter.KEYWORD_ONLY and losses["step"].default is inspect.Parameter.empty
    bound = inspect.signature(cls.bound).parameters
    assert list(bound) == ["self", "x", "generator"]
    assert bound["generator"].kind is inspect.Parameter.KEYWORD_ONLY and bound["generator"].default is None
    sample = inspect.signature(cls.sample).parameters
    assert list(sample)[:3] == ["self", "n", "generator"] and sample["generator"].kind is inspect.Parameter.KEYWORD_ONLY
    extra = [p for p in list(sample)[3:] if sample[p].kind is not inspect.Parameter.VAR_KEYWORD]
    assert set(extra) == set(cls.sampler_options)  # what it takes is what it says it takes


def test_nothing_calls_the_verbs_inside_try_except_type_error():
    for path in SRC.rglob("*.py"):
        assert "except TypeError" not in path.read_text(), path


@pytest.mark.parametrize("kind", ["ddpm", "vae"])
def test_bound_draws_from_its_generator_and_leaves_the_global_rng_alone(kind):
    model = small_models()[kind].eval()
    x = torch.rand(4, 1, 8, 8).round() if kind == "vae" else torch.rand(4, 1, 8, 8).mul(255).round().div(127.5).sub(1)
    state = torch.get_rng_state()
    a = model.bound(x, generator=torch.Generator().manual_seed(3)).nll
    b = model.bound(x, generator=torch.Generator().manual_seed(3)).nll
    c = model.bound(x, generator=torch.Generator().manual_seed(4)).nll
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _every_model():
    models = small_models()
    vae = VAE(VAEConfig(hidden=(16,), latent_dim=3, decoder="gaussian"), (6,))
    models["ldm"] = LDM(LDMConfig(timesteps=4, latent_scale=0.5), (6,), vae=vae)
    assert set(models) == set(MODELS)
    return models


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("verb", ["losses", "bound", "iwae_bound"])
def test_a_batch_of_the_wrong_shape_or_type_is_one_line_naming_what_the_model_takes(kind, verb):
    model = _every_model()[kind]
    want = "(B, " + ", ".join(map(str, model.data_shape)) + ")"
    call = {"losses": lambda x: model.losses(x, step=0), "bound": model.bound,
            "iwae_bound": lambda x: model.iwae_bound(x, 2)}[verb]
    good = torch.zeros(2, *model.data_shape)
    for bad, got in [(good[0], f"shape {tuple(good.shape[1:])}"), (good.flatten(1)[:, :-1], "of shape"),
                     (good.to(torch.uint8), "torch.uint8"), (good.tolist(), "a list")]:
        with pytest.raises(UserError) as e:
            call(bad)
        assert f"this {kind} takes a float batch of shape {want}" in str(e.value) and got in str(e.value)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("verb", ["losses", "bound", "iwae_bound"])
def test_a_batch_of_another_precision_or_device_is_one_line(kind, verb):
    """A half-precision batch for fp32 weights (outside autocast), or one on another device (meta stands in for a
    GPU), is a one-line error saying what to do, not torch's traceback from deep in a layer; under autocast a
    bf16 batch is what mixed precision hands over, and runs."""
    model = _every_model()[kind]
    call = {"losses": lambda x: model.losses(x, step=0), "bound": model.bound,
            "iwae_bound": lambda x: model.iwae_bound(x, 2)}[verb]
    good = torch.zeros(2, *model.data_shape)
    with pytest.raises(UserError, match=rf"^this {kind}'s weights are torch.float32, the batch is torch.float16; "
                                        r"convert the batch \(x.to\(torch.float32\)\) or run under torch.autocast"):
        call(good.half())
    with pytest.raises(UserError, match=rf"^this {kind} is on cpu, the batch on meta; move one to the other"):
        call(good.to("meta"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        call(good.bfloat16())


@pytest.mark.parametrize("kind", list(MODELS))
def test_a_count_of_samples_must_be_a_whole_number(kind):
    model = _every_model()[kind]
    for n in (2.5, -1, "3", None):
        with pytest.raises(UserError, match=rf"^cannot draw {re.escape(repr(n))} samples; give a whole number >= 0$"):
            model.sample(n)
    assert model.sample(torch.tensor(2)).shape == (2, *model.data_shape)  # any integer will do, a 0-dim tensor too


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_importance_weighted_estimate_reports_each_chunk_and_what_a_sample_costs(kind):
    """``iwae_bound(..., progress=f)`` calls f with each chunk's count (so `elbox evaluate --metric nll` can show an
    ETA within a batch: K = 5000 trajectories of a DDPM is hours) and returns the same estimate as without it;
    ``iwae_passes`` is the network passes one importance sample costs (a DDPM's whole T-step trajectory)."""
    model = _every_model()[kind].eval()
    x = torch.full((3, *model.data_shape), 1 / 255)  # on the 8-bit grid of [-1, 1], and in [0, 1]
    calls = []
    with torch.no_grad():
        got = model.iwae_bound(x, 7, chunk=3, generator=torch.Generator().manual_seed(1), progress=calls.append)
        want = model.iwae_bound(x, 7, chunk=3, generator=torch.Generator().manual_seed(1))
    assert calls == [3, 3, 1] and torch.equal(got, want)
    assert model.iwae_passes == {"ddpm": 5, "vae": 1, "ldm": 4 + 1}[kind]


def test_a_model_refuses_sampler_options_it_does_not_take():
    models = small_models()
    with pytest.raises(UserError, match=r"this vae does not take the sampling option\(s\) steps \(it takes: none\)$"):
        models["vae"].sample(2, steps=3)  # the error says what it does take
    models["vae"].sampler_options = ("temperature", "steps")  # a model that takes some: they are listed
    with pytest.raises(UserError, match=r"option\(s\) eta \(it takes: temperature, steps\)$"):
        models["vae"].sample(2, eta=0.5)
    del models["vae"].sampler_options  # back to the class's: none
    with pytest.raises(UserError, match="--sampler ddim does not apply to this vae"):
        sampler_options(models["vae"], SampleConfig(sampler="ddim"))
    assert sampler_options(models["vae"], SampleConfig()) == {}
    assert sampler_options(models["ddpm"], SampleConfig(sampler="ddim", sampling_steps=3)) == {
        "sampler": "ddim", "steps": 3, "eta": 0.0}


def test_capabilities_say_what_a_model_can_do():
    models = small_models()
    assert models["vae"].sample_modes == ("prior", "reconstruct", "interpolate", "manifold") and models["vae"].has_iwae
    assert models["ddpm"].sample_modes == ("prior",) and models["ddpm"].has_iwae
    assert models["ddpm"].per_step_terms and not models["vae"].per_step_terms
    assert models["ddpm"].draws_images and models["vae"].draws_images

    class Bare(ELBOModel):
        kind = "bare"

    assert not Bare.has_iwae and Bare.sample_modes == ("prior",) and not Bare.per_step_terms
    with pytest.raises(UserError, match="this bare has no importance-weighted"):
        Bare(None, (1,)).iwae_bound(torch.zeros(1, 1), 2)


def test_every_model_takes_one_to_three_positive_sizes_and_at_most_2_to_the_26_numbers():
    """ELBOModel's data shape, at both ends of each range: 1 and 3 sizes are built, 0 and 4 are not; a size of 1 is
    built, 0 is not; 2**26 numbers in all are built (a shape is all it stores), one more row of them is not."""
    for shape in [(1,), (3, 2, 1), (1, 1, 1), (65536, 1024), (1024, 256, 256)]:
        assert ELBOModel(None, shape).data_shape == shape
    for shape in [(), (1, 1, 1, 1), (0,), (4, 0, 4), (65536, 1025), (1025, 256, 256)]:
        with pytest.raises(UserError) as error:
            ELBOModel(None, shape)
        assert str(error.value) == (f"data shape {shape} is not allowed: 1 to 3 positive sizes, at most 2^26 numbers")


# -------------------------------------------------------------------------------------------- terms compose
def _terms() -> Terms:
    return Terms(terms={"decoder_nll": torch.tensor([1.0, 2.0]), "kl": torch.tensor([[0.5, 0.25], [1.0, 2.0]]),
                        "prior": torch.tensor([0.125, 0.0])}, dims=4,
                 columns={"decoder_nll": ("L_0",), "kl": ("L_1", "L_2"), "prior": ("L_T",)},
                 steps=("decoder_nll", "kl", "prior"), extras={"mse": torch.tensor([9.0, 9.0])})


def test_prefixed_terms_merge_into_a_larger_model_with_their_columns_and_steps():
    prior = _terms().prefixed("prior")
    assert list(prior.terms) == ["prior/decoder_nll", "prior/kl", "prior/prior"]
    assert prior.columns["prior/kl"] == ("L_1", "L_2") and list(prior.extras) == ["prior/mse"]
    outer = Terms(terms={"decoder_nll": torch.tensor([10.0, 20.0])}, dims=4)
    whole = Terms.merge([outer, prior], dims=4)
    torch.testing.assert_close(whole.nll, outer.nll + prior.nll)  # the negative ELBO of the whole is the sum
    assert list(whole.extras) == ["prior/mse"] and torch.equal(whole.extras["prior/mse"], prior.extras["prior/mse"])
    labels, values = whole.per_step()
    assert labels == ["L_0", "L_1", "L_2", "L_T"]
    torch.testing.assert_close(values, torch.tensor([[1.0, 0.5, 0.25, 0.125], [2.0, 1.0, 2.0, 0.0]]))
    with pytest.raises(ValueError, match="appear in two parts"):
        Terms.merge([outer, outer], dims=4)
    both = Terms.cat([whole, whole])
    assert both.columns == whole.columns and both.steps == whole.steps and both.batch_size == 4


def test_batches_put_together_keep_the_unit_of_their_loss():
    part = Terms(terms={"a": torch.tensor([1.0, 2.0])}, dims=3, loss=torch.tensor([7.0, 8.0]), loss_unit="bits/dim")
    both = Terms.cat([part, part])
    assert both.loss_unit == "bits/dim" and torch.equal(both.loss, torch.tensor([7.0, 8.0, 7.0, 8.0]))


def test_a_prefixed_part_keeps_its_dims_loss_and_unit_and_merged_steps_keep_every_parts_order():
    """prefixed renames, nothing else: dims, the training loss (not the sum of its terms) and its unit travel
    with it. merge: steps from every part, in the parts' order; a merged loss defaults to the whole's bound in
    nats, or is the one given, in the unit given."""
    loss = torch.tensor([7.0, 8.0])
    part = Terms(terms={"steps": torch.tensor([1.0, 2.0])}, dims=3, loss=loss, loss_unit="bits/dim", steps=("steps",))
    prefixed = part.prefixed("prior")
    assert prefixed.dims == 3 and torch.equal(prefixed.loss, loss) and prefixed.loss_unit == "bits/dim"
    assert prefixed.steps == ("prior/steps",)
    first = Terms(terms={"a": torch.tensor([0.5, 0.5]), "b": torch.tensor([0.25, 0.0])}, dims=3, steps=("b", "a"))
    whole = Terms.merge([first, prefixed], dims=3)
    assert whole.steps == ("b", "a", "prior/steps") and whole.loss_unit == "nats"
    torch.testing.assert_close(whole.loss, torch.tensor([1.75, 2.5]))
    given = Terms.merge([first, prefixed], dims=3, loss=loss, loss_unit="MSE")
    assert torch.equal(given.loss, loss) and given.loss_unit == "MSE"


def test_columns_must_match_the_term_and_steps_must_exist():
    with pytest.raises(ValueError, match="2 column"):
        Terms(terms={"kl": torch.zeros(3, 2)}, dims=1, columns={"kl": ("L_1",)})
    with pytest.raises(ValueError, match="do not exist"):
        Terms(terms={"kl": torch.zeros(3)}, dims=1, steps=("prior",))
    assert Terms(terms={"kl": torch.zeros(3, 2)}, dims=1, steps=("kl",)).per_step()[0] == ["kl[0]", "kl[1]"]
    assert Terms(terms={"kl": torch.zeros(3)}, dims=1).per_step() is None


def test_each_column_of_a_term_has_a_label():
    """One number per example is one column named after the term; wider terms have name[i] unless their columns
    are named."""
    terms = Terms(terms={"nll": torch.zeros(3), "one": torch.zeros(3, 1), "kl": torch.zeros(3, 2),
                         "steps": torch.zeros(3, 2)}, dims=1, columns={"steps": ("L_1", "L_2")})
    assert terms.labels("nll") == ("nll",) and terms.labels("one") == ("one",)
    assert terms.labels("kl") == ("kl[0]", "kl[1]") and terms.labels("steps") == ("L_1", "L_2")


def test_the_ddpm_bound_labels_its_timesteps():
    model = small_models()["ddpm"].eval()
    bound = model.bound(torch.full((2, 1, 8, 8), 1 / 255), generator=torch.Generator().manual_seed(0))
    labels, values = bound.per_step()
    assert labels == ["L_0", "L_1", "L_2", "L_3", "L_4", "L_T"]  # T = 5: L_0, the KLs L_1 .. L_{T-1}, L_T
    torch.testing.assert_close(values.sum(1), bound.nll)


def test_a_ddpm_on_8bit_data_refuses_values_off_its_grid():
    """Its L_0 is a discrete likelihood over the 256 levels of [-1, 1] (Ho et al. eq. 13): a [0, 1] image (half its
    values between two levels) or [0, 255] values is one line, not a plausible-looking bits/dim; a continuous DDPM
    takes any values."""
    model = small_models()["ddpm"].eval()
    images = torch.randint(0, 256, (2, 1, 8, 8), generator=torch.Generator().manual_seed(0)).float()
    verbs = (lambda x: model.bound(x), lambda x: model.iwae_bound(x, 2), lambda x: model.losses(x, step=0))
    half_off = r"got values in \[0[.0-9]*, [.0-9]+\], off the grid by up to 0.5 of a level; .*x \* 2 - 1$"
    for bad, words in ((images / 255, half_off),
                       (images, r"got values in \[[0-9]+, 2[0-9][0-9]\]; ")):
        for verb in verbs:
            with pytest.raises(UserError, match=r"^this ddpm \(data_kind='8bit'\) models 8-bit data on the grid of "
                                                r"\[-1, 1\] \(k/127.5 - 1, k = 0..255\); " + words):
                verb(bad)
    for verb in verbs:
        verb(images / 127.5 - 1)
    continuous = DDPM(DDPMConfig(data_kind="continuous", net="micro", timesteps=5), (1, 8, 8))
    continuous.bound(images / 255)


def test_the_loss_says_its_unit():
    x = torch.full((2, 1, 8, 8), 1 / 255)  # on the 8-bit grid
    units = {}
    for loss, var in (("simple", "fixed_large"), ("vlb", "learned"), ("hybrid", "learned")):
        model = DDPM(DDPMConfig(data_kind="8bit", net="micro", timesteps=5, loss=loss, var_type=var), (1, 8, 8))
        units[loss] = model.losses(x, step=0).loss_unit
    assert units == {"simple": "mean squared error per dimension", "vlb": "bits/dim", "hybrid": "MSE + lambda bits/dim"}
    assert small_models()["vae"].losses(torch.zeros(2, 1, 8, 8), step=0).loss_unit == "nats"


# ----------------------------------------------------------------------------------- the data is declared
def test_a_ddpm_must_be_told_what_its_data_is():
    with pytest.raises(UserError, match="data_kind='auto' is resolved from the training data"):
        DDPM(DDPMConfig(net="micro"), (1, 8, 8))
    assert DDPM.resolve_config(DDPMConfig(), "continuous").data_kind == "continuous"
    assert DDPM.resolve_config(DDPMConfig(data_kind="8bit"), "continuous").data_kind == "8bit"  # declared wins


def test_a_continuous_spatial_ddpm_has_a_gaussian_l0_and_no_clipping():
    """A DDPM over continuous (C, h, w) values (a VAE's spatial latents): U-Net, Gaussian density for L_0 (not the
    8-bit decoder of Ho et al. eq. 13), no clipping of the predicted x_0 and no image grid."""
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(data_kind="continuous", net="micro", timesteps=4), (2, 4, 4)).double().eval()
    assert not model.clip_denoised and not model.draws_images
    x = 3.0 * torch.randn(3, 2, 4, 4, dtype=torch.float64)  # far outside [-1, 1]
    t0 = torch.zeros(3, dtype=torch.long)
    x_1 = model.diffusion.q_sample(x, t0, torch.randn_like(x))
    l0, out = model.diffusion.vlb_terms(model.net, x, x_1, t0, clip_denoised=model.clip_denoised)
    expected = -Normal(out["mean"], torch.exp(0.5 * out["log_variance"])).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(l0, expected)
    eight_bit = DDPM(DDPMConfig(data_kind="8bit", net="micro", timesteps=4), (2, 4, 4)).double().eval()
    assert eight_bit.clip_denoised and eight_bit.diffusion.decoder == "discretized"
    samples = model.sample(64, generator=torch.Generator().manual_seed(0))
    assert samples.abs().max() > 1.0  # nothing clipped them into [-1, 1]


def test_training_saves_the_resolved_data_kind(tmp_path):
    cfg = RunConfig(model="ddpm", model_config=DDPMConfig(net="micro", timesteps=5), data=DataConfig("digits"),
                    train=TrainConfig(steps=1, batch_size=8, device="cpu", quiet=True, final_eval_examples=0,
                                      num_samples=4))
    train(cfg, tmp_path / "run")
    assert load_run_config(tmp_path / "run" / "config.toml").model_config.data_kind == "8bit"
    import elbox

    assert elbox.load(tmp_path / "run").config.data_kind == "8bit"


# ------------------------------------------------------------------------------------------- the layering
def test_inference_does_not_import_training():
    code = ("import sys, elbox.api, elbox.metrics.likelihood, elbox.cli; "
            "bad = sorted(m for m in sys.modules if m.startswith('elbox.training')); print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_objectives_and_samplers_do_not_import_each_other_in_a_circle():
    imported = {m for m in re.findall(r"^from elbox\.(\w+)", (SRC / "samplers.py").read_text(), re.M)}
    assert "objectives" not in imported


def test_no_model_kind_branching_outside_objectives():
    """The callers ask the model what it can do (sample_modes, draws_images, per_step_terms, has_iwae)."""
    pattern = re.compile(r"\.kind\s*[!=]=|hasattr\(\s*model|len\([^)]*data_shape\)")
    files = [SRC / "api.py", SRC / "cli.py", *(SRC / "metrics").glob("*.py"), *(SRC / "training").glob("*.py")]
    offending = [f"{f.name}:{n}" for f in files for n, line in enumerate(f.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offending


def test_the_training_functions_are_short():
    """``train()`` reads top to bottom: set-up, the step, the periodic actions and the end are named pieces."""
    for path in (SRC / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                assert length <= 60, f"{path.name}: {node.name} has {length} lines"


def test_term_words_names_a_term_and_where_it_sits():
    """What an error message says for a term (a NaN "in the KL term of the latent prior"): nested prefixes read
    from the inside out; an unknown name is quoted, never dropped."""
    from elbox.objectives.terms import term_words

    assert term_words("kl") == "the KL term"
    assert term_words("prior/steps") == "the diffusion term L_t at the sampled timestep of the latent prior"
    assert term_words("stage2/prior/kl") == "the KL term of the latent prior of the stage2"
    assert term_words("mystery") == "the term 'mystery'"
    assert term_words("prior/mystery") == "the term 'mystery' of the latent prior"


def test_the_importance_weighted_estimate_in_chunks_is_log_mean_exp_and_refuses_a_bad_k():
    """log 1/k sum_i w_i over chunks equals torch's logsumexp - log k; k and the chunk must be whole numbers >= 1 (one line); the weights are asked for chunk at a time."""
    w = torch.randn(7, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows = iter(w)
    got = log_mean_exp_in_chunks(lambda n: torch.stack([next(rows) for _ in range(n)]), 7, 3)
    assert torch.allclose(got, torch.logsumexp(w, 0) - torch.log(torch.tensor(7.0, dtype=torch.float64)))
    for k in (0, -2, 2.5):
        with pytest.raises(UserError, match=f"must be an integer >= 1; got {k}"):
            log_mean_exp_in_chunks(lambda n: torch.zeros(n, 3), k, 3)
    calls = []
    for k, chunk in ((7, 3), (6, 3), (2, 5), (3, 1), (1, 1)):  # a chunk of 1 and a k of 1 are allowed
        log_mean_exp_in_chunks(lambda n: calls.append(n) or torch.zeros(n, 3), k, chunk)
    assert calls == [3, 3, 1, 3, 3, 2, 1, 1, 1, 1]  # chunks of `chunk`, the last one what is left
    for chunk in (0, -1, 1.5):
        with pytest.raises(UserError, match=f"chunk must be an integer >= 1; got {chunk}"):
            log_mean_exp_in_chunks(lambda n: torch.zeros(n, 3), 4, chunk)


def test_pytest_xdist_workers_share_the_cores():
    """README's `pytest -n 2`: each worker, and each subprocess it starts, gets its share of the cores' threads
    (two workers at two threads each made a 2-core machine's suite slower than one process)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers < 2 or os.environ["ELBOX_TEST_THREADS_GIVEN"] == "1":
        pytest.skip("not under pytest-xdist with its own thread count (README's `pytest -n 2` runs this)")
    from conftest import worker_threads

    assert int(os.environ["OMP_NUM_THREADS"]) == torch.get_num_threads() == worker_threads(workers)

