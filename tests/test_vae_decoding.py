"""The VAE's decoding (means, draws, grids, interpolation) in float64 and at the edges of the data range, and
the exact limits of its config: values checked, not only shapes."""

import math

import pytest
import torch

from elbox.errors import UserError
from elbox.objectives.decoders import DECODERS, LocationScale, build_likelihood
from elbox.objectives.vae import VAE, VAEConfig

SMALL = dict(latent_dim=8, hidden=(64,), conv_channels=(8, 16))


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_means_and_draws_keep_float64_and_the_data_range(name):
    """Means and draws come back in the parameters' dtype; a discretized decoder's mean is its location clamped to
    [-1, 1] (where its edge bins put the mass), a Gaussian's is the location itself, a Bernoulli's is sigmoid."""
    lik = build_likelihood(name, 1, "fixed", 0.5).double()
    params = torch.linspace(-3.0, 3.0, 32, dtype=torch.float64).view(2, 1, 4, 4)
    mean, draw = lik.mean(params), lik.draw(params, torch.Generator().manual_seed(0))
    assert mean.dtype == draw.dtype == torch.float64 and mean.shape == draw.shape == params.shape
    if isinstance(lik, LocationScale):  # its standard noise, too, is drawn (and a logistic's quantile taken) in float64
        assert lik.noise(params, torch.Generator().manual_seed(0)).dtype == torch.float64
    expected = {"bernoulli": torch.sigmoid(params), "gaussian": params,
                "discretized-gaussian": params.clamp(-1, 1), "discretized-logistic": params.clamp(-1, 1)}[name]
    assert torch.equal(mean, expected)
    if lik.data_range == "symmetric":  # draws land on the 8-bit grid
        levels = (draw + 1) * 255 / 2
        assert torch.allclose(levels, levels.round(), atol=1e-9) and draw.min() >= -1 and draw.max() <= 1


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_draws_come_from_the_generator_given(name):
    """A draw is a function of its generator alone: equal seeds give equal draws whatever the global RNG did in
    between, another seed another draw, and the global RNG is not consumed (samples are reproducible)."""
    lik = build_likelihood(name, 1, "fixed", 0.5)
    params = torch.zeros(4, 1, 8, 8)
    torch.manual_seed(1)
    first = lik.draw(params, torch.Generator().manual_seed(3))
    state = torch.get_rng_state()
    again = lik.draw(params, torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    torch.rand(5)
    assert torch.equal(first, again) and torch.equal(first, lik.draw(params, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, lik.draw(params, torch.Generator().manual_seed(4)))


def test_grid_and_interpolation_sizes_are_checked_in_one_line():
    vae = VAE(VAEConfig(**SMALL), (1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    assert vae.interpolate(x[0], x[1], 2).shape == (2, 1, 8, 8) and vae.manifold(1).shape == (1, 1, 8, 8)
    with pytest.raises(UserError, match="interpolate needs steps >= 2 \\(both ends\\); got 1"):
        vae.interpolate(x[0], x[1], 1)
    with pytest.raises(UserError, match="manifold needs a grid size n >= 1; got 0"):
        vae.manifold(0)


@pytest.mark.parametrize("latent_dim", [1, 2])
def test_manifold_and_interpolation_run_in_float64_and_seed_an_autoregressive_decoder(latent_dim):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**{**SMALL, "latent_dim": latent_dim}, ar_kernel=3, ar_channels=4), (1, 4, 4)).double()
    with torch.no_grad():  # the context starts at zero; give it weight, so that the drawn pixels matter
        for p in vae.context.parameters():
            p.add_(torch.randn_like(p))
    grids = []
    for global_seed in (1, 2):  # the global RNG moves between the calls; the generator alone decides the draw
        torch.manual_seed(global_seed)
        grids.append(vae.manifold(2, generator=torch.Generator().manual_seed(9)))
    assert grids[0].dtype == torch.float64 and grids[0].shape == (4, 1, 4, 4)
    torch.testing.assert_close(grids[0], grids[1], rtol=0, atol=0)
    other = vae.manifold(2, generator=torch.Generator().manual_seed(10))
    assert not torch.equal(other, grids[0])  # the draws do matter
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64).round()
    vae_plain = VAE(VAEConfig(**{**SMALL, "latent_dim": latent_dim}), (1, 4, 4)).double()
    path = vae_plain.interpolate(x, x.flip(0), 4)
    assert path.dtype == torch.float64
    m1, m2 = vae_plain.encode(x)[0], vae_plain.encode(x.flip(0))[0]
    third = vae_plain.decode(m1 * (2 / 3) + m2 * (1 / 3))  # t = 1/3, in float64 throughout
    torch.testing.assert_close(path[:, 1], third, rtol=1e-12, atol=1e-12)
    # the grid's quantiles in float64 too: (i + 1/2)/n through the inverse normal CDF
    q = torch.special.ndtri((torch.arange(3, dtype=torch.float64) + 0.5) / 3)
    z = torch.zeros(9, latent_dim, dtype=torch.float64)
    if latent_dim == 1:
        z[:, 0] = torch.special.ndtri((torch.arange(9, dtype=torch.float64) + 0.5) / 9)
    else:
        z[:, 0], z[:, 1] = q.repeat(3), -q.repeat_interleave(3)
    torch.testing.assert_close(vae_plain.manifold(3), vae_plain.decode(z), rtol=1e-12, atol=1e-12)


def test_decoded_images_are_clamped_to_the_data_range_and_bad_shapes_are_refused():
    """An image decoder's mean is shown, so it is clamped into the data range, at both ends (a Gaussian decoder's
    location is unconstrained); a data shape with a zero size is one line."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(decoder="gaussian", **SMALL), (1, 8, 8))
    z = torch.randn(4, 8)
    for shift, bound in ((50.0, 1.0), (-50.0, 0.0)):
        params = vae.decoder_params(z)
        with torch.no_grad():
            last = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Linear)][-1]
            last.bias += shift
        assert torch.all(vae.decode(z) == bound), shift
        with torch.no_grad():
            last.bias -= shift
        torch.testing.assert_close(vae.decoder_params(z), params)
    for shape in [(1, 0, 8), (0,), ()]:
        with pytest.raises(UserError, match="is not allowed: 1 to 3 positive sizes"):
            VAE(VAEConfig(**SMALL), shape)


def test_config_limits_are_exact():
    """The smallest allowed values are accepted, one below is refused naming the value and the rule."""
    for ok in [dict(hidden=(1,)), dict(conv_channels=(1,)), dict(res_blocks=0), dict(beta=0.0), dict(ar_channels=1),
               dict(latent_dim=1), dict(kl_warmup_steps=0), dict(ar_kernel=3)]:
        VAEConfig(**ok)
    for bad, message in [
        (dict(hidden=(8, 0)), "hidden=[8, 0] is not allowed; every hidden size must be >= 1"),
        (dict(conv_channels=(4, 0)), "conv_channels=[4, 0] is not allowed; give one or more widths >= 1"),
        (dict(conv_channels=()), "conv_channels=[] is not allowed; give one or more widths >= 1"),
        (dict(res_blocks=-1), "res_blocks=-1 is not allowed; use an integer >= 0"),
        (dict(beta=-0.5), "beta=-0.5 is not allowed; use a number >= 0 (1 is the ELBO)"),
        (dict(beta=math.inf), "beta=inf is not allowed"),
        (dict(ar_channels=0), "ar_channels=0 is not allowed; use an integer >= 1"),
        (dict(latent_dim=0), "latent_dim=0 is not allowed; use an integer from 1 to 65536"),
        (dict(kl_warmup_steps=-1), "kl_warmup_steps=-1 is not allowed; use an integer >= 0 (0: off)"),
        (dict(ar_kernel=4), "ar_kernel=4 is not allowed; use 0 (off) or an odd size >= 3"),
        (dict(ar_kernel=1), "ar_kernel=1 is not allowed"),
        (dict(decoder_sigma=0.0), "decoder_sigma must be > 0 (a standard deviation); got 0.0"),
    ]:
        with pytest.raises(UserError) as e:
            VAEConfig(**bad)
        assert message in str(e.value), (bad, str(e.value))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_learned_global_scale_comes_back_in_the_outputs_dtype(dtype):
    """sigma_mode="learned": the float32 log sigma is handed out in the network output's dtype (float64 for the exact
    checks, bf16 under autocast), as the location is."""
    lik = build_likelihood("gaussian", 1, "learned", 0.5)
    loc, log_sigma = lik.split(torch.zeros(2, 1, 4, 4, dtype=dtype))
    assert loc.dtype == log_sigma.dtype == dtype and log_sigma.item() == pytest.approx(math.log(0.5), rel=1e-2)


def test_the_manifold_walks_the_two_dimensions_it_is_given_and_elbox_sample_takes_the_most_active(tmp_path):
    """A wide latent space leaves most dimensions unused (Burda et al. 2016, section 5.2), and a grid over two
    unused ones decodes one image n * n times: `elbox sample --mode manifold` walks the two most active."""
    from elbox.api import draw, load
    from elbox.cli import main
    from elbox.config import SampleConfig

    torch.manual_seed(0)
    vae = VAE(VAEConfig(**{**SMALL, "latent_dim": 5}), (1, 8, 8))
    q = torch.special.ndtri((torch.arange(3) + 0.5) / 3)
    z = torch.zeros(9, 5)
    z[:, 2], z[:, 4] = q.repeat(3), -q.repeat_interleave(3)
    torch.testing.assert_close(vae.manifold(3, dims=(2, 4)), vae.decode(z))
    for bad in ((1, 1), (0, 5), (-1, 2)):
        with pytest.raises(UserError, match=r"manifold dims=.*: give two different latent dimensions of 0 .. 4"):
            vae.manifold(3, dims=bad)
    run = tmp_path / "v"
    assert main(["train", "vae", "--out", str(run), "--latent-dim", "6", "--hidden", "32", "--steps", "30",
                 "--batch-size", "32", "--num-samples", "4", "--final-eval-examples", "8", "--quiet"]) == 0
    model = load(run)
    from elbox.data import to_model

    ds = model.data_config.load("test")
    g = torch.Generator().manual_seed(0)  # --seed 0: test images picked, then binarized, from one stream
    x = to_model(ds.data[torch.randperm(len(ds.data), generator=g)[:1000]], model.data_range, generator=g)
    activity = model.activity(x)
    assert activity.shape == (6,) and (activity >= 0).all()
    top = tuple(sorted(activity.argsort(descending=True)[:2].tolist()))
    assert top != (0, 1)  # else the first two dimensions would pass this test too
    torch.testing.assert_close(draw(model, SampleConfig(mode="manifold", num=9)), model.manifold(3, dims=top))
