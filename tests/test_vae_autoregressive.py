"""The autoregressive decoder (ar_kernel > 0) and the conv-mlp networks: still a normalised p(x|z), still causal."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from elbox.errors import UserError
from elbox.objectives.vae import VAE, VAEConfig

SMALL = dict(latent_dim=2, hidden=(16,), conv_channels=(4,), ar_kernel=3, ar_channels=8)


def with_random_context(vae: VAE) -> VAE:
    """The context's last layer starts at zero (a factorized decoder); give it weights so that it matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        vae.context.out.weight.normal_(0.0, 1.0)
        vae.context.out.bias.normal_(0.0, 0.5)
    return vae.double()


@pytest.mark.parametrize(
    "shape, layers, cond", [((1, 2, 2), 0, False), ((2, 2, 2), 0, False), ((1, 2, 3), 2, False), ((1, 2, 3), 1, True)]
)
def test_autoregressive_bernoulli_sums_to_one_over_every_binary_image(shape, layers, cond):
    vae = with_random_context(VAE(VAEConfig(**SMALL, ar_layers=layers, ar_cond=cond), shape))
    d = shape[0] * shape[1] * shape[2]
    images = torch.tensor(list(itertools.product([0.0, 1.0], repeat=d)), dtype=torch.float64).view(-1, *shape)
    for _ in range(3):
        z = torch.randn(1, 2, dtype=torch.float64).expand(len(images), -1)
        total = torch.logsumexp(vae.log_px_given_z(images, z), dim=0)
        torch.testing.assert_close(total, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-12)


def test_autoregressive_discretized_logistic_sums_to_one_over_every_8bit_image():
    vae = with_random_context(VAE(VAEConfig(decoder="discretized-logistic", **SMALL), (1, 1, 2)))
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    images = torch.stack([a.flatten(), b.flatten()], dim=1).view(-1, 1, 1, 2)
    z = torch.randn(1, 2, dtype=torch.float64).expand(len(images), -1)
    total = torch.logsumexp(vae.log_px_given_z(images, z), dim=0)
    torch.testing.assert_close(total, torch.zeros((), dtype=torch.float64), rtol=0, atol=1e-9)


@pytest.mark.parametrize("kernel, layers, cond", [(5, 0, False), (3, 2, False), (3, 2, True)])
def test_the_context_of_a_pixel_depends_only_on_earlier_pixels(kernel, layers, cond):
    config = VAEConfig(**{**SMALL, "ar_kernel": kernel, "ar_layers": layers, "ar_cond": cond})
    vae = with_random_context(VAE(config, (2, 6, 7)))
    x = torch.rand(1, 2, 6, 7, dtype=torch.float64)
    params = vae.decoder_params(torch.randn(1, 2, dtype=torch.float64)) if cond else None
    base = vae.context(x, params)
    for i, j in [(0, 0), (2, 3), (5, 6), (0, 6)]:
        changed = x.clone()
        changed[:, :, i, j] += 1.0
        moved = (vae.context(changed, params) - base).abs().sum(1)[0] > 0
        later = torch.arange(6 * 7).view(6, 7) > i * 7 + j  # raster order: strictly after (i, j)
        assert not moved[~later].any(), (i, j)
        # each masked layer sees one row further down: the first kernel // 2 rows, then one more per layer
        reach = kernel // 2 + layers
        assert moved[i + 1 : i + 1 + reach, j].all() and not moved[i + 1 + reach :].any(), (i, j)


def test_a_conditioned_context_depends_on_z_at_every_pixel():
    """ar_cond: the context's output moves with z everywhere (without it, z never reaches the context)."""
    vae = with_random_context(VAE(VAEConfig(**SMALL, ar_cond=True), (1, 6, 7)))
    x = torch.rand(1, 1, 6, 7, dtype=torch.float64)
    a, b = (vae.context(x, vae.decoder_params(torch.randn(1, 2, dtype=torch.float64))) for _ in range(2))
    assert ((a - b).abs() > 0).all()
    with pytest.raises(ValueError, match="conditioned on z"):
        vae.context(x)


@pytest.mark.parametrize("cond", [False, True])
def test_iwae_with_a_context_matches_the_elbo_at_k_1(cond):
    vae = with_random_context(VAE(VAEConfig(arch="conv-mlp", **SMALL, ar_cond=cond), (1, 5, 5)))
    x = (torch.rand(6, 1, 5, 5) > 0.5).double()
    torch.manual_seed(0)
    elbo = -torch.stack([vae.bound(x).nll for _ in range(400)]).mean(0)
    torch.manual_seed(0)
    iwae1 = torch.stack([vae.iwae_bound(x, 1) for _ in range(400)]).mean(0)
    assert (elbo - iwae1).abs().max() < 0.5
    assert (vae.iwae_bound(x, 50, chunk=7).mean() > elbo.mean()).item()


@pytest.mark.parametrize("cond", [False, True])
def test_iwae_in_chunks_is_the_log_mean_of_the_weights_scored_one_by_one(cond):
    """The chunked estimate, whose context is shared across samples, against log p(x, z_i) / q(z_i|x) computed
    directly with log_px_given_z for the very same z_i (Burda et al. eq. 8)."""
    vae = with_random_context(VAE(VAEConfig(arch="conv-mlp", **SMALL, ar_cond=cond), (1, 5, 5)))
    x = (torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(2)) > 0.5).double()
    k = 12
    got = vae.iwae_bound(x, k, generator=torch.Generator().manual_seed(5), chunk=k)
    mu, logvar = vae.encode(x)
    eps = torch.randn((k, *mu.shape), generator=torch.Generator().manual_seed(5)).double()  # drawn in float32
    z = mu + torch.exp(0.5 * logvar) * eps
    normal = torch.distributions.Normal
    log_w = torch.stack([
        vae.log_px_given_z(x, z[i]) + normal(0.0, 1.0).log_prob(z[i]).sum(1)
        - normal(mu, torch.exp(0.5 * logvar)).log_prob(z[i]).sum(1)
        for i in range(k)
    ])
    torch.testing.assert_close(got, torch.logsumexp(log_w, 0) - math.log(k), rtol=0, atol=1e-10)


@pytest.mark.parametrize("cond", [False, True])
def test_autoregressive_decoding_draws_pixels_and_returns_their_conditional_means(cond):
    vae = with_random_context(VAE(VAEConfig(arch="conv-mlp", **SMALL, ar_cond=cond), (1, 4, 3)))
    a = vae.sample(5, generator=torch.Generator().manual_seed(7))
    b = vae.sample(5, generator=torch.Generator().manual_seed(7))
    assert a.shape == (5, 1, 4, 3) and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a, b)
    assert vae.reconstruct(torch.ones(2, 1, 4, 3, dtype=torch.float64)).shape == (2, 1, 4, 3)


@pytest.mark.parametrize("cond", [False, True])
def test_the_means_of_a_draw_are_the_teacher_forced_conditionals_of_the_pixels_drawn(cond):
    """Each pixel's mean returned by decode is p(x_i | z, x_<i) at the pixels drawn before it: the same numbers as
    one teacher-forced pass over the finished draw (the context at i sees only pixels before i)."""
    vae = with_random_context(VAE(VAEConfig(arch="conv-mlp", **SMALL, ar_cond=cond), (1, 4, 3)))
    drawn, draw = [], vae.likelihood.draw
    vae.likelihood.draw = lambda params, generator: drawn.append(draw(params, generator)) or drawn[-1]
    z = torch.randn(5, 2, dtype=torch.float64)
    means = vae.decode(z, generator=torch.Generator().manual_seed(3))
    x = torch.stack(drawn, dim=-1).view(5, 1, 4, 3)  # raster order
    params = vae.decoder_params(z)
    torch.testing.assert_close(means, vae.likelihood.mean(params + vae.context(x, params if cond else None)))


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(ar_kernel=4), (1, 8, 8), "ar_kernel=4 is not allowed; use 0 .off. or an odd size >= 3"),
        (dict(ar_kernel=1), (1, 8, 8), "ar_kernel=1 is not allowed"),
        (dict(ar_kernel=3), (10,), r"ar_kernel=3 needs image data of shape \(C, H, W\)"),
        (dict(arch="conv-mlp"), (10,), "arch 'conv-mlp' needs image data"),
        (dict(ar_channels=0), (1, 8, 8), "ar_channels=0 is not allowed"),
        (dict(ar_kernel=0, ar_cond=True), (1, 8, 8), "ar_cond=True needs an autoregressive context: set ar_kernel"),
    ],
)
def test_bad_autoregressive_settings_raise_user_errors(kwargs, shape, match):
    with pytest.raises(UserError, match=match):
        VAE(VAEConfig(**kwargs), shape)


@pytest.mark.parametrize("name", ["discretized-gaussian", "discretized-logistic"])
def test_draws_follow_the_discretized_probabilities(name):
    """Autoregressive decoding feeds draws back in, so a draw must come from the very distribution log_prob scores."""
    from elbox.objectives.decoders import build_likelihood

    lik = build_likelihood(name, 1, "learned-pixel", 1.0).double()
    params = torch.tensor([[0.97, -3.5]], dtype=torch.float64)  # near the top edge, scale ~ 0.03: ~10 levels
    n = 200_000
    x = lik.draw(params.expand(n, -1), torch.Generator().manual_seed(0))
    levels = torch.round((x + 1) * 127.5).long()
    assert torch.allclose(x, levels.double() / 127.5 - 1, atol=1e-12)  # on the 8-bit grid
    freq = torch.bincount(levels[:, 0], minlength=256).double() / n
    grid = (torch.arange(256, dtype=torch.float64) / 127.5 - 1)[:, None]
    prob = torch.exp(lik.log_prob(params.expand(256, -1), grid))[:, 0]
    se = torch.sqrt(prob * (1 - prob) / n)
    assert torch.all((freq - prob).abs() <= 5 * se + 1e-12)
    assert prob[-1] > 0.05  # the edge bin, which takes the tail above 1, is really exercised
