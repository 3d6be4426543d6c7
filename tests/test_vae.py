"""The VAE: its closed-form KL, normalised decoders, the IWAE bound against a known log p(x), and behaviour."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from elbox.errors import UserError
from elbox.objectives.decoders import DECODERS, build_likelihood
from elbox.objectives.gaussian import standard_normal_kl
from elbox.objectives.vae import VAE, VAEConfig

SMALL = dict(latent_dim=8, hidden=(64,), conv_channels=(8, 16))


@pytest.fixture(scope="session")
def digits() -> torch.Tensor:
    """The embedded 8x8 digits (training split) as uint8 (N, 1, 8, 8)."""
    from elbox.data import load_dataset

    return load_dataset("digits").data


def binarized(u8: torch.Tensor) -> torch.Tensor:
    return (u8.float() / 255.0 > 0.5).float()


# --------------------------------------------------------------------------------------------- the KL term
def test_closed_form_kl_matches_torch_distributions_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(5, 3, generator=g, dtype=torch.float64)
    logvar = torch.randn(5, 3, generator=g, dtype=torch.float64)
    q = Normal(mu, torch.exp(0.5 * logvar))
    kl = standard_normal_kl(mu, logvar).sum(1)
    torch.testing.assert_close(kl, kl_divergence(q, Normal(0.0, 1.0)).sum(1), rtol=1e-12, atol=1e-12)
    # Monte Carlo: KL = E_q[log q(z) - log p(z)]; the mean of n draws is within a few standard errors
    z = q.sample((200_000,))
    log_ratio = (q.log_prob(z) - Normal(0.0, 1.0).log_prob(z)).sum(-1)
    se = log_ratio.std(0) / math.sqrt(z.shape[0])
    assert torch.all((log_ratio.mean(0) - kl).abs() < 5 * se)


def test_vae_kl_term_is_the_kl_of_its_encoder():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**SMALL), (1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    mu, logvar = vae.encode(x)
    expected = kl_divergence(Normal(mu, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(vae.bound(x).terms["kl"], expected)


# ----------------------------------------------------------------------------- the decoders are normalised
GRID = torch.arange(256, dtype=torch.float64) / 127.5 - 1  # the exact 8-bit grid on [-1, 1], in float64


def test_bernoulli_sums_to_one_over_0_and_1():
    lik = build_likelihood("bernoulli", 1, "fixed", 1.0)
    logits = torch.tensor([-30.0, -3.0, 0.0, 0.7, 25.0], dtype=torch.float64).view(5, 1)
    zeros, ones = torch.zeros_like(logits), torch.ones_like(logits)
    total = torch.logaddexp(lik.log_prob(logits, zeros), lik.log_prob(logits, ones))
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["discretized-gaussian", "discretized-logistic"])
@pytest.mark.parametrize("mode", ["fixed", "learned", "learned-pixel"])
def test_discretized_decoders_sum_to_one_over_256_levels(name, mode):
    locs = torch.tensor([-1.3, -1.0, -0.37, 0.0, 0.5, 0.999, 2.0], dtype=torch.float64)
    log_scales = torch.tensor([-6.5, -4.0, -1.0, 0.0, 1.5], dtype=torch.float64)
    loc, log_scale = (t.reshape(-1, 1) for t in torch.meshgrid(locs, log_scales, indexing="ij"))
    lik = build_likelihood(name, 1, mode, 0.3).double()
    if mode == "learned-pixel":
        params = torch.cat([loc, log_scale - math.log(0.3)], dim=1)  # the network's output is log sigma - log 0.3
    else:
        params = loc
    n = loc.shape[0]
    log_p = lik.log_prob(params.unsqueeze(1).expand(n, 256, -1).reshape(-1, params.shape[1]), GRID.repeat(n)[:, None])
    total = torch.logsumexp(log_p.view(n, 256), dim=1)
    torch.testing.assert_close(total, torch.zeros_like(total), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name", ["bernoulli", "discretized-gaussian", "discretized-logistic"])
def test_decoder_draws_follow_the_decoders_own_probabilities(name):
    # Monte Carlo: the frequency of each value among n seeded draws is within 5 standard errors of exp(log_prob)
    lik = build_likelihood(name, 1, "fixed", 0.05).double()
    values = torch.tensor([0.0, 1.0], dtype=torch.float64) if name == "bernoulli" else GRID
    n = 200_000
    for loc in (-0.97, 0.31):
        params = torch.full((n, 1), loc if name != "bernoulli" else 4 * loc, dtype=torch.float64)
        x = lik.draw(params, generator=torch.Generator().manual_seed(0))[:, 0]
        idx = torch.searchsorted(values, x).clamp(max=len(values) - 1)
        assert torch.equal(values[idx], x), "every draw is one of the decoder's values"
        freq = torch.bincount(idx, minlength=len(values)).double() / n
        prob = torch.exp(lik.log_prob(params[:1].expand(len(values), 1), values[:, None]))[:, 0]
        stderr = torch.sqrt(prob * (1 - prob) / n)
        assert torch.all((freq - prob).abs() <= 5 * stderr + 1e-12), name


@pytest.mark.parametrize("mode", ["fixed", "learned", "learned-pixel"])
def test_gaussian_density_integrates_to_one_in_1d_and_2d(mode):
    lik = build_likelihood("gaussian", 1, mode, 0.2).double()
    mean = 0.3
    step = 0.002
    x = torch.arange(-3.0, 3.0 + step / 2, step, dtype=torch.float64)  # +-16 sigma around the mean
    params = torch.tensor([[mean] + ([0.0] if mode == "learned-pixel" else [])], dtype=torch.float64)
    p1 = torch.exp(lik.log_prob(params.expand(len(x), -1), x[:, None]))[:, 0]
    assert abs(torch.trapezoid(p1, x).item() - 1.0) < 1e-9
    # 2-D: the data point is 2 dimensions whose log-densities add up; integrate over a 2-D grid
    x2 = torch.arange(-1.5, 2.1 + step, 4 * step, dtype=torch.float64)
    a, b = torch.meshgrid(x2, x2, indexing="ij")
    points = torch.stack([a.flatten(), b.flatten()], dim=1)
    loc = torch.tensor([mean, 0.1], dtype=torch.float64)
    params = torch.cat([loc, torch.zeros(2, dtype=torch.float64)]) if mode == "learned-pixel" else loc
    lik2 = build_likelihood("gaussian", 2, mode, 0.2).double()
    density = torch.exp(lik2.log_prob(params.expand(len(points), -1), points).sum(1)).view(len(x2), len(x2))
    mass = torch.trapezoid(torch.trapezoid(density, x2, dim=1), x2)
    assert abs(mass.item() - 1.0) < 1e-6


def test_fixed_gaussian_decoder_nll_is_squared_error_plus_normaliser():
    torch.manual_seed(0)
    sigma = 0.3
    vae = VAE(VAEConfig(decoder="gaussian", decoder_sigma=sigma, **SMALL), (1, 8, 8))
    x, z = torch.rand(4, 1, 8, 8), torch.randn(4, 8)
    mean = vae.decoder_params(z)
    d = 64
    expected = ((x - mean) ** 2).flatten(1).sum(1) / (2 * sigma**2) + d / 2 * math.log(2 * math.pi * sigma**2)
    torch.testing.assert_close(-vae.log_px_given_z(x, z), expected)


def test_bernoulli_with_zero_logits_costs_exactly_ln2_per_pixel_and_zero_kl(digits):
    vae = VAE(VAEConfig(**SMALL), (1, 8, 8))
    for p in vae.parameters():
        torch.nn.init.zeros_(p)  # q(z|x) = N(0, I) = p(z), and p(x|z) = Bernoulli(1/2)
    terms = vae.bound(binarized(digits[:10]))
    torch.testing.assert_close(terms.terms["decoder_nll"], torch.full((10,), 64 * math.log(2.0)))
    torch.testing.assert_close(terms.terms["kl"], torch.zeros(10))
    torch.testing.assert_close(terms.bpd, torch.ones(10))


# ------------------------------------------------------------------------------------------- the IWAE bound
@pytest.fixture(scope="session")
def trained_vae(digits) -> VAE:
    """A small MLP VAE after 150 Adam steps on the binarized digits: a posterior that is not the prior."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(activation="silu", **SMALL), (1, 8, 8))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    data = binarized(digits)
    for step in range(150):
        loss = vae.losses(data[torch.randint(0, len(data), (128,))], step=step).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return vae.eval()


def test_iwae_is_above_the_elbo_and_rises_with_k(trained_vae, digits):
    torch.manual_seed(0)
    x = binarized(digits[-64:])
    with torch.no_grad():
        elbo = -torch.stack([trained_vae.bound(x).nll for _ in range(20)]).mean(0)
        iwae = {k: torch.stack([trained_vae.iwae_bound(x, k, chunk=37) for _ in range(5)]).mean(0) 
                for k in (1, 10, 100)}
    # L_1 is the ELBO itself (Burda et al. theorem 1): the two agree up to Monte Carlo error
    assert abs(iwae[1].mean() - elbo.mean()) < 0.5
    assert iwae[10].mean() > elbo.mean() + 0.5
    assert iwae[1].mean() < iwae[10].mean() < iwae[100].mean()


def linear_gaussian_vae(sigma: float = 0.5):
    """A VAE whose decoder is x = W z + b + sigma eps (2-D z, 3-D x), so p(x) = N(b, W W^T + sigma^2 I).

    Its encoder is deliberately not the true posterior p(z|x) = N(S W^T (x - b) / sigma^2, S) with
    S = (I + W^T W / sigma^2)^-1: the mean is shifted and the variance is diagonal and inflated 1.5 times, so
    the ELBO is strictly below log p(x), while q keeps heavier tails than p(z|x) and the weights a finite variance.
    """
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(), latent_dim=2, decoder="gaussian", decoder_sigma=sigma), (3,)).double()
    w = torch.tensor([[1.0, 0.5], [-0.3, 0.8], [0.4, -0.2]], dtype=torch.float64)
    b = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    s = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + w.T @ w / sigma**2)
    with torch.no_grad():
        dec, enc = vae.decoder.net[0], vae.encoder.net[0]
        dec.weight.copy_(w)
        dec.bias.copy_(b)
        gain = s @ w.T / sigma**2
        enc.weight.copy_(torch.cat([gain, torch.zeros(2, 3, dtype=torch.float64)]))
        enc.bias.copy_(torch.cat([-gain @ b + 0.3, torch.log(1.5 * torch.diagonal(s))]))
    log_px = MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(3, dtype=torch.float64))

    def true_posterior(x):
        return MultivariateNormal((x - b) @ gain.T, s)

    return vae, log_px, true_posterior


def test_iwae_converges_to_the_exact_log_likelihood_of_a_linear_gaussian_model():
    vae, p_x, true_posterior = linear_gaussian_vae()
    x = p_x.sample((8,))
    log_px = p_x.log_prob(x)
    with torch.no_grad():
        mu, logvar = vae.encode(x)
        q = MultivariateNormal(mu, torch.diag_embed(torch.exp(logvar)))
        # the ELBO is log p(x) - KL(q(z|x) || p(z|x)), in closed form; the 1-sample bound averages to it
        elbo = log_px - kl_divergence(q, true_posterior(x))
        draws = torch.stack([-vae.bound(x).nll for _ in range(4000)])
        assert torch.all((draws.mean(0) - elbo).abs() < 5 * draws.std(0) / math.sqrt(len(draws)))
        assert torch.all(elbo < log_px - 0.5)  # the gap is KL(q || p(z|x)) = 0.66 nats here

        # The relative variance v = Var(w) / E[w]^2 of the importance weights w = p(x, z) / q(z|x) sets the error
        # of L_K (delta method): bias -v / (2K), standard deviation sqrt(v / K). Estimate v from 20000 weights.
        z = q.sample((20_000,))
        log_w = vae.log_px_given_z(x.expand(20_000, -1, -1).reshape(-1, 3), z.reshape(-1, 2)).view(20_000, -1)
        log_w = log_w + Normal(0.0, 1.0).log_prob(z).sum(-1) - q.log_prob(z)
        rel_var = torch.exp(torch.logsumexp(2 * log_w, 0) - 2 * torch.logsumexp(log_w, 0) + math.log(20_000)) - 1
        k = 5000
        iwae = vae.iwae_bound(x, k, chunk=512)
        tolerance = 5 * torch.sqrt(rel_var / k) + rel_var / (2 * k)  # 5 standard deviations plus the bias
        assert torch.all((iwae - log_px).abs() < tolerance), (iwae - log_px, tolerance)
        assert torch.all(tolerance < (log_px - elbo) / 5)  # a tight test: the ELBO is 10 times further off

        # for small K the estimate is below log p(x) in expectation (Burda et al. theorem 1): average many draws
        small = torch.stack([vae.iwae_bound(x, 3) for _ in range(2000)])
        se = small.std(0) / math.sqrt(len(small))
        assert torch.all(small.mean(0) < log_px + 3 * se)
        assert small.mean() < log_px.mean() - 0.01


# -------------------------------------------------------------------------------------------- behaviour
@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_a_few_adam_steps_lower_the_loss(digits, arch):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(arch=arch, activation="silu", **SMALL), (1, 8, 8))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    data = binarized(digits)
    held = data[:256]

    def held_out_nelbo():
        torch.manual_seed(1)
        with torch.no_grad():
            return vae.bound(held).nll.mean().item()

    before = held_out_nelbo()
    for step in range(30):
        batch = data[torch.randint(0, len(data), (64,))]
        loss = vae.losses(batch, step=step).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_nelbo()
    assert after < before - 5.0, (before, after)


def test_beta_and_warmup_change_only_the_loss():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 8, 8)
    plain = VAE(VAEConfig(**SMALL), (1, 8, 8))
    warm = VAE(VAEConfig(beta=4.0, kl_warmup_steps=100, **SMALL), (1, 8, 8))
    warm.load_state_dict(plain.state_dict())
    torch.manual_seed(1)
    t0 = plain.losses(x, step=10)
    for step, weight in [(0, 0.0), (25, 1.0), (100, 4.0), (1000, 4.0)]:
        torch.manual_seed(1)
        t = warm.losses(x, step=step)
        for name in ("decoder_nll", "kl"):
            torch.testing.assert_close(t.terms[name], t0.terms[name])
        torch.testing.assert_close(t.loss, t.terms["decoder_nll"] + weight * t.terms["kl"])
    torch.testing.assert_close(t0.loss, t0.nll)
    bound = warm.bound(x)
    torch.testing.assert_close(bound.loss, bound.nll)  # the bound is the ELBO, whatever beta
    torch.manual_seed(1)
    torch.testing.assert_close(warm.losses(x, step=0).loss, t.terms["decoder_nll"])  # at step 0: weight 0
    one = VAE(VAEConfig(kl_warmup_steps=1, **SMALL), (1, 8, 8))
    assert [one.kl_weight(s) for s in (0, 1, 2)] == [0.0, 1.0, 1.0]  # a one-step warm-up still starts at 0


def test_iwae_in_chunks_is_log_mean_exp_of_the_importance_weights_and_chunk_must_be_positive():
    """log 1/K sum_k p(x|z_k) N(z_k; 0, I) / q(z_k|x) (Burda et al. eq. 8) computed here with torch.distributions
    from the same draws (K = 7 in chunks of 3, 3 and 1: eps of shape (chunk, B, L) from the generator it is given,
    drawn in float32 as every seeded draw of elbox is). The global RNG is not touched."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**SMALL), (1, 8, 8)).double()
    x = (torch.rand(3, 1, 8, 8) > 0.5).double()
    global_state = torch.get_rng_state()
    got = vae.iwae_bound(x, 7, chunk=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), global_state)
    mu, logvar = vae.encode(x)
    q = Normal(mu, torch.exp(0.5 * logvar))
    g = torch.Generator().manual_seed(5)
    eps = torch.cat([torch.randn((c, 3, 8), generator=g).double() for c in (3, 3, 1)])
    z = mu + torch.exp(0.5 * logvar) * eps
    log_w = torch.stack([
        vae.log_px_given_z(x, z_k) + Normal(0.0, 1.0).log_prob(z_k).sum(1) - q.log_prob(z_k).sum(1) for z_k in z
    ])
    expected = torch.logsumexp(log_w, 0) - math.log(7)
    torch.testing.assert_close(got.detach(), expected.detach(), rtol=1e-10, atol=1e-10)
    torch.manual_seed(5)
    one_at_a_time = vae.iwae_bound(x, 2, chunk=1)  # the smallest chunk is allowed
    assert one_at_a_time.shape == (3,) and torch.isfinite(one_at_a_time).all()
    for bad in (0, -2):
        with pytest.raises(UserError, match=f"chunk must be >= 1; got {bad}"):
            vae.iwae_bound(x, 7, chunk=bad)


@pytest.mark.parametrize(
    "decoder, data_range", [("bernoulli", "binary"), ("gaussian", "unit"), ("discretized-logistic", "symmetric"),
                            ("discretized-gaussian", "symmetric")]
)
def test_each_decoder_declares_its_data_range_and_decodes_into_it(decoder, data_range):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(decoder=decoder, **SMALL), (1, 8, 8))
    assert vae.data_range == data_range
    lo = -1.0 if data_range == "symmetric" else 0.0
    samples = vae.sample(16, generator=torch.Generator().manual_seed(3))
    assert samples.shape == (16, 1, 8, 8) and samples.min() >= lo and samples.max() <= 1.0
    torch.testing.assert_close(samples, vae.sample(16, generator=torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 7, 5), (2, 28, 28)])
def test_conv_networks_take_any_image_size(shape):
    vae = VAE(VAEConfig(arch="conv", decoder="discretized-logistic", **SMALL), shape)
    x = (torch.rand(3, *shape) * 255).round() / 127.5 - 1  # 8-bit images in [-1, 1]
    assert vae.reconstruct(x).shape == x.shape
    assert vae.decoder_params(torch.randn(3, 8)).shape == (3, 2 * shape[0], *shape[1:])  # location, log-scale
    assert vae.interpolate(x[0], x[1], 5).shape == (5, *shape)
    assert vae.interpolate(x, x, 4).shape == (3, 4, *shape)


def test_vector_data_and_learned_sigma_get_gradients():
    vae = VAE(VAEConfig(decoder="gaussian", sigma_mode="learned", decoder_sigma=0.5, **SMALL), (5,))
    x = torch.rand(7, 5)
    vae.losses(x, step=0).loss.mean().backward()
    assert vae.likelihood.log_sigma.grad is not None and vae.likelihood.log_sigma.grad.abs() > 0
    assert vae.iwae_bound(x, 3).shape == (7,)


def test_interpolation_ends_are_the_reconstructions():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**SMALL), (1, 8, 8))
    x = torch.rand(2, 1, 8, 8)
    path = vae.interpolate(x[0], x[1], 6)
    torch.testing.assert_close(path[0], vae.reconstruct(x[:1])[0])
    torch.testing.assert_close(path[-1], vae.reconstruct(x[1:])[0])


def test_weights_round_trip_through_safetensors_and_config_through_json(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    cfg = VAEConfig(arch="conv", decoder="gaussian", sigma_mode="learned", **SMALL)
    vae = VAE(cfg, (1, 8, 8))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "model.safetensors")
    again = VAE(VAEConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))), (1, 8, 8))
    again.load_state_dict(load_file(tmp_path / "model.safetensors"))
    assert again.config == cfg
    z = torch.randn(2, 8)
    torch.testing.assert_close(again.decode(z), vae.decode(z))


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(latent_dim=0), ["latent_dim=0", "from 1 to 65536"]),
        (dict(decoder_sigma=0.0), ["decoder_sigma must be > 0", "0.0"]),
        (dict(decoder_sigma=-1.5), ["decoder_sigma must be > 0", "-1.5"]),
        (dict(decoder="poisson"), ["decoder='poisson'", "bernoulli"]),
        (dict(arch="transformer"), ["arch='transformer'", "mlp, conv"]),
        (dict(beta=-1.0), ["beta=-1.0", ">= 0"]),
        (dict(kl_warmup_steps=-3), ["kl_warmup_steps=-3"]),
        (dict(hidden=(64, 0)), ["hidden=[64, 0]"]),
    ],
)
def test_bad_config_values_raise_one_line_user_errors(kwargs, words):
    with pytest.raises(UserError) as info:
        VAEConfig(**kwargs)
    message = str(info.value)
    assert "\n" not in message and all(w in message for w in words), message


def test_every_size_limit_allows_its_edge_and_refuses_one_past_it():
    """Each limit of VAEConfig at both ends: the largest (or smallest) allowed value builds a config, one step past
    it is a one-line UserError naming the key (an off-by-one in a limit, `<=` for `<`, would go unseen otherwise)."""
    edges = [  # (allowed, refused, words of the refusal)
        (dict(latent_dim=65536), dict(latent_dim=65537), "latent_dim=65537"),
        (dict(latent_dim=1), dict(latent_dim=0), "latent_dim=0"),
        (dict(hidden=(65536,)), dict(hidden=(65537,)), "hidden=[65537] is too large"),
        (dict(hidden=(1,) * 64), dict(hidden=(1,) * 65), "hidden=[1, 1"),
        (dict(conv_channels=(65536,)), dict(conv_channels=(65537,)), "conv_channels=[65537] is too large"),
        (dict(conv_channels=(1,) * 64), dict(conv_channels=(1,) * 65), "conv_channels=[1, 1"),
        (dict(arch="conv", latent_channels=4096), dict(arch="conv", latent_channels=4097), "latent_channels and"),
        (dict(arch="conv", latent_channels=0), dict(arch="conv", latent_channels=-1), "-1 is not allowed; use 0"),
        (dict(ar_channels=4096), dict(ar_channels=4097), "ar_channels must be <= 4096"),
        (dict(ar_channels=1), dict(ar_channels=0), "ar_channels=0"),
        (dict(ar_kernel=63), dict(ar_kernel=64), "ar_kernel <= 63"),  # 64 is even, but the size limit comes first
        (dict(ar_kernel=3), dict(ar_kernel=1), "ar_kernel=1"),
        (dict(ar_layers=64, ar_kernel=3), dict(ar_layers=65, ar_kernel=3), "ar_layers=65 is not allowed; use an "
                                                                             "integer from 0 to 64"),
        (dict(ar_layers=0), dict(ar_layers=-1), "ar_layers=-1"),
        (dict(ar_layers=1, ar_kernel=3), dict(ar_layers=1), "ar_layers=1 needs an autoregressive context"),
    ]
    for allowed, refused, words in edges:
        VAEConfig(**allowed)
        with pytest.raises(UserError) as info:
            VAEConfig(**refused)
        assert words in str(info.value) and "\n" not in str(info.value), (refused, str(info.value))


def test_bad_data_and_k_raise_one_line_user_errors():
    vae = VAE(VAEConfig(**SMALL), (1, 8, 8))
    for bad in (torch.full((2, 1, 8, 8), 2.0), torch.full((2, 1, 8, 8), -0.5)):
        with pytest.raises(UserError, match=r"bernoulli decoder models data in \[0, 1\].*got values in"):
            vae.losses(bad, step=0)
    x = torch.rand(2, 1, 8, 8)
    for k in (0, -5):
        with pytest.raises(UserError, match=f"importance samples k must be an integer >= 1; got {k}"):
            vae.iwae_bound(x, k)
    with pytest.raises(UserError, match=r"this vae takes a float batch of shape \(B, 1, 8, 8\)"):
        vae.bound(torch.rand(2, 1, 9, 9))
    with pytest.raises(UserError, match="arch 'conv' needs image data"):
        VAE(VAEConfig(arch="conv"), (10,))
    symmetric = VAE(VAEConfig(decoder="discretized-logistic", **SMALL), (1, 8, 8))
    with pytest.raises(UserError, match=r"discretized-logistic decoder models 8-bit data on the grid of \[-1, 1\] "
                                        r"\(k/127.5 - 1, k = 0..255\); got values in \[[0-9.]+, [0-9.]+\]; "):
        symmetric.bound(torch.rand(2, 1, 8, 8) * 3)
    # a [0, 1] image (k/255) lies in [-1, 1] but half off its grid: its discrete likelihood would be of nothing
    with pytest.raises(UserError, match=r"off the grid by up to 0.5 of a level; .* maps onto it by x \* 2 - 1$"):
        symmetric.bound((torch.rand(2, 1, 8, 8) * 255).round() / 255)
    symmetric.bound((torch.rand(2, 1, 8, 8) * 255).round() / 255 * 2 - 1)  # mapped: on the grid


def test_every_registered_decoder_is_a_config_choice():
    import typing

    assert set(typing.get_args(typing.get_type_hints(VAEConfig)["decoder"])) == set(DECODERS)


@pytest.mark.parametrize("latent_dim", [1, 2, 5])
def test_manifold_decodes_a_grid_over_the_prior(latent_dim):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**{**SMALL, "latent_dim": latent_dim}), (1, 8, 8))
    grid = vae.manifold(4)
    assert grid.shape == (16, 1, 8, 8) and 0 <= grid.min() and grid.max() <= 1
    if latent_dim >= 2:  # row 0 is the top (largest z_2), column 0 the left (smallest z_1), quantiles 1/8 .. 7/8
        q = torch.special.ndtri((torch.arange(4) + 0.5) / 4)
        z = torch.zeros(16, latent_dim)
        z[:, 0] = q.repeat(4)
        z[:, 1] = -q.repeat_interleave(4)
        torch.testing.assert_close(grid, vae.decode(z))


@pytest.mark.parametrize("kw", [dict(arch="mlp", decoder="gaussian", sigma_mode="fixed", latent_dim=2),
                                dict(arch="mlp", decoder="gaussian", sigma_mode="fixed", latent_dim=1),
                                dict(arch="conv-mlp", decoder="bernoulli", ar_kernel=3, latent_dim=2)])
def test_a_vae_on_the_cpu_computes_on_the_cpu_whatever_the_default_device(kw,
                                                                          on_the_cpu_under_another_default_device):
    # every term, estimate and drawing, with the CPU and then "meta" (for a GPU) as the default device (conftest.py)
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(16,), conv_channels=(8,), res_blocks=0, **kw), (1, 8, 8)).double()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if kw["decoder"] == "bernoulli":
        x = (x > 0.5).double()

    def everything():
        g = {name: torch.Generator().manual_seed(i) for i, name in enumerate(("bound", "iwae", "sample", "manifold"))}
        return {"nll": vae.bound(x, generator=g["bound"]).nll, "iwae": vae.iwae_bound(x, 3, generator=g["iwae"]),
                "sample": vae.sample(2, generator=g["sample"]), "reconstruct": vae.reconstruct(x),
                "interpolate": vae.interpolate(x[0], x[1], 3), "manifold": vae.manifold(2, generator=g["manifold"])}

    on_the_cpu_under_another_default_device(everything)
