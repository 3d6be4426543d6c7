"""Latent diffusion (objectives/latent.py): a DDPM prior over a frozen VAE's latents, and its bound

    -log p(x) <= E_q[-log p(x|z)] - H[q(z|x)] + E_q[L_DDPM(s z)] - d log s      (LSGM's cross-entropy form)

checked on a linear-Gaussian model whose log p(x) is known in closed form, with a DDPM prior that is exactly right
for its latents: the reverse process of Gaussian data N(0, v I) is Gaussian, with the mean and variance below."""

import json
import math

import pytest
import torch
from test_vae import linear_gaussian_vae
from test_vae_autoregressive import with_random_context
from torch import nn
from torch.distributions import MultivariateNormal

from elbox.errors import UserError
from elbox.objectives.latent import LDM, LDMConfig
from elbox.objectives.vae import VAE, VAEConfig


class ExactGaussianDenoiser(nn.Module):
    """The Bayes-optimal eps-prediction and variance for data x_0 ~ N(0, v I) (cosine schedule, learned Sigma).

    x_t = sqrt(abar) x_0 + sqrt(1 - abar) eps has variance V_t = abar v + 1 - abar, so E[eps | x_t] =
    sqrt(1 - abar) x_t / V_t; and q(x_{t-1} | x_t) = N(., V_{t-1} beta_t / V_t) (x_{t-1} ~ N(0, V_{t-1})), whose
    log-variance the network gives as the interpolation value of Nichol & Dhariwal eq. 15.
    """

    def __init__(self, diffusion, v: float, eps_gain: float = 1.0) -> None:
        super().__init__()
        self.d, self.v, self.eps_gain = diffusion, v, eps_gain

    def forward(self, x_t, t):
        d = self.d
        abar = d.alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1)  # t: (B,), or one t for the batch
        abar_prev = d.alphas_cumprod_prev[t].to(x_t.dtype).reshape(-1, 1)
        var_t, var_prev = abar * self.v + 1 - abar, abar_prev * self.v + 1 - abar_prev
        eps = self.eps_gain * torch.sqrt(1 - abar) * x_t / var_t
        log_var = torch.log(var_prev * d.betas[t].to(x_t.dtype).reshape(-1, 1) / var_t)
        lo, hi = d.posterior_log_variance_clipped[t].to(x_t.dtype).reshape(-1, 1), d.log_betas[t].to(x_t.dtype).reshape(-1, 1)
        frac = (log_var - lo) / (hi - lo)
        return torch.cat([eps, (2 * frac - 1).expand_as(eps)], dim=1)


def ldm_over(vae: VAE, scale: float, eps_gain: float = 1.0, timesteps: int = 40) -> LDM:
    config = LDMConfig(timesteps=timesteps, schedule="cosine", latent_scale=scale, net="mlp")
    model = LDM(config, vae.data_shape, vae=vae).double()
    model.prior.net = ExactGaussianDenoiser(model.prior.diffusion, v=scale**2, eps_gain=eps_gain)
    return model.eval()


def mean_bound(model, x, draws=2000, seed=0):
    """The bound of each example of x averaged over ``draws`` independent draws (of z and of every x_t), and its
    standard error: x repeated, in one batch."""
    nll = model.bound(x.repeat(draws, 1), generator=torch.Generator().manual_seed(seed)).nll.view(draws, len(x))
    return nll.mean(0), nll.std(0) / math.sqrt(draws)


def exact_posterior_linear_gaussian(sigma=0.5):
    """x = W z + b + sigma eps with orthogonal columns of W, so p(z|x) is diagonal and the encoder can be exact:
    the VAE's bound is then log p(x) itself (in expectation)."""
    vae = VAE(VAEConfig(hidden=(), latent_dim=2, decoder="gaussian", decoder_sigma=sigma), (3,)).double()
    w = torch.tensor([[1.0, -0.5], [0.5, 1.0], [0.0, 0.6]], dtype=torch.float64)  # w1 . w2 = 0
    b = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    s = torch.linalg.inv(torch.eye(2, dtype=torch.float64) + w.T @ w / sigma**2)
    gain = s @ w.T / sigma**2
    with torch.no_grad():
        vae.decoder.net[0].weight.copy_(w)
        vae.decoder.net[0].bias.copy_(b)
        vae.encoder.net[0].weight.copy_(torch.cat([gain, torch.zeros(2, 3, dtype=torch.float64)]))
        vae.encoder.net[0].bias.copy_(torch.cat([-gain @ b, torch.log(torch.diagonal(s))]))
    return vae, MultivariateNormal(b, w @ w.T + sigma**2 * torch.eye(3, dtype=torch.float64))


def test_with_the_exact_prior_and_posterior_the_bound_is_the_true_nll_and_the_scale_enters_by_its_jacobian():
    """An exact encoder and a DDPM prior exact for s z ~ N(0, s^2 I): E[bound] = -log p(x) in closed form. With
    s = 0.6 the log-Jacobian is d log s = -1.02 nats: leaving it out would miss by that much."""
    torch.manual_seed(0)
    vae, p_x = exact_posterior_linear_gaussian()
    x = p_x.sample((6,))
    nll = -p_x.log_prob(x)
    for scale in (1.0, 0.6):
        mean, se = mean_bound(ldm_over(vae, scale), x)
        assert torch.all((mean - nll).abs() < 5 * se + 1e-3), (scale, mean - nll, se)
        assert torch.all(se < 0.1)  # a test that could see a 1-nat error
    worse, se = mean_bound(ldm_over(vae, 0.6, eps_gain=0.7), x)  # a prior that is off: a looser bound
    assert torch.all(worse - nll > 5 * se) and (worse - nll).mean() > 0.3


def test_a_prior_that_matches_n01_gives_the_vaes_own_bound():
    """The same frozen VAE (an inexact encoder: its bound is 0.66 nats loose), its KL replaced by the cross-entropy
    against a DDPM that is exactly N(0, I): the same bound, in expectation."""
    vae, p_x, _ = linear_gaussian_vae()
    x = p_x.sample((6,))
    ldm, vae_bound = mean_bound(ldm_over(vae, 1.0), x), mean_bound(vae, x, draws=4000)
    assert torch.all((ldm[0] - vae_bound[0]).abs() < 5 * torch.sqrt(ldm[1] ** 2 + vae_bound[1] ** 2))
    assert torch.all(ldm[0] > -p_x.log_prob(x) + 0.3)  # and, like it, above the true -log p(x)


def test_the_terms_of_the_bound():
    torch.manual_seed(0)
    vae, _ = exact_posterior_linear_gaussian()
    model = ldm_over(vae, 0.6, timesteps=5)
    x = torch.randn(4, 3, dtype=torch.float64)
    terms = model.bound(x, generator=torch.Generator().manual_seed(0))
    assert list(terms.terms) == ["decoder_nll", "neg_entropy", "log_scale", "prior/decoder_nll", "prior/kl",
                                 "prior/prior"]
    torch.testing.assert_close(terms.terms["log_scale"], torch.full((4,), -2 * math.log(0.6), dtype=torch.float64))
    _, logvar = vae.encode(x)
    entropy = MultivariateNormal(torch.zeros(2, dtype=torch.float64), torch.diag_embed(logvar.exp())).entropy()
    torch.testing.assert_close(terms.terms["neg_entropy"], -entropy)
    labels, _ = terms.per_step()
    assert labels == ["L_0", "L_1", "L_2", "L_3", "L_4", "L_T"] and terms.dims == 3


def test_the_bound_draws_z_and_every_x_t_from_the_generator_it_is_given():
    """The same generator seed gives the same terms whatever the global RNG did in between (z and the prior's x_t
    both from it); another seed gives others. One example alone is a batch too."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(8,), latent_dim=3, decoder="gaussian"), (5,))
    model = LDM(LDMConfig(timesteps=4, net="mlp", latent_scale=0.7), (5,), vae=vae).eval()
    x = torch.randn(3, 5)
    runs = []
    for seed, global_seed in ((1, 10), (1, 20), (2, 10)):
        torch.manual_seed(global_seed)
        runs.append(model.bound(x, generator=torch.Generator().manual_seed(seed)).terms)
    for name in runs[0]:
        assert torch.equal(runs[0][name], runs[1][name]), name
    assert not torch.equal(runs[0]["decoder_nll"], runs[2]["decoder_nll"])  # z from the generator
    assert not torch.equal(runs[0]["prior/kl"], runs[2]["prior/kl"])  # and x_t
    one = model.bound(x[:1], generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(one.terms["log_scale"], torch.tensor([-3 * math.log(0.7)]))
    mu, logvar = vae.encode(x)  # z = mu + sigma eps, eps the generator's first draw (in float32)
    z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(runs[0]["decoder_nll"], -vae.log_px_given_z(x, z))


@pytest.mark.parametrize("end_to_end", [False, True])
def test_a_micro_batch_draws_its_rows_of_the_global_batch(end_to_end):
    """Inside the trainer's global batch (gradient accumulation, DDP), z ~ q(z|x) and the prior's t and noise are
    drawn for the whole batch and a micro-batch keeps its rows: its terms are its rows of the whole batch's."""
    from elbox import draws

    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(8,), latent_dim=3, decoder="gaussian"), (5,))
    model = LDM(LDMConfig(timesteps=50, net="mlp", latent_scale=0.7, end_to_end=end_to_end), (5,), vae=vae)
    x = torch.randn(8, 5)
    with draws.global_batch(3, torch.arange(8), 8):
        whole = model.losses(x, step=0)
    with draws.global_batch(3, torch.arange(4, 8), 8):
        part = model.losses(x[4:], step=0)
    for name in whole.terms:
        torch.testing.assert_close(part.terms[name], whole.terms[name][4:], msg=name)


def test_training_draws_z_from_q_and_trains_only_the_prior():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(16,), latent_dim=4, decoder="gaussian"), (6,))
    model = LDM(LDMConfig(timesteps=10, latent_scale=0.5), (6,), vae=vae)
    x = torch.randn(512, 6)
    seen = {}
    original = model.prior.losses

    def spy(z, *, step):
        seen["z"] = z
        return original(z, step=step)

    model.prior.losses = spy
    model.losses(x, step=0).loss.mean().backward()
    mu, logvar = vae.encode(x)
    eps = (seen["z"] / 0.5 - mu) / torch.exp(0.5 * logvar)
    assert 0.9 < float(eps.std()) < 1.1 and abs(float(eps.mean())) < 0.1  # a draw z ~ q(z|x), not the mean
    assert all(p.grad is None for p in model.vae.parameters())  # frozen
    assert all(p.grad is not None for p in model.prior.parameters())
    model.train()
    assert not model.vae.training


def test_a_spatial_latent_gets_a_unet_prior():
    torch.manual_seed(0)
    vae = VAE(VAEConfig(arch="conv", conv_channels=(8, 8), latent_channels=2, decoder="discretized-logistic"),
              (1, 8, 8))
    assert vae.latent_shape == (2, 2, 2)
    model = LDM(LDMConfig(timesteps=4, net="micro", latent_scale=1.0), (1, 8, 8), vae=vae)
    assert not model.prior.clip_denoised and model.prior.diffusion.decoder == "continuous"
    x = torch.randint(0, 256, (3, 1, 8, 8)).float().div(127.5).sub(1)
    terms = model.bound(x, generator=torch.Generator().manual_seed(0))
    assert terms.nll.shape == (3,) and torch.isfinite(terms.nll).all()
    assert model.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 1, 8, 8)


def test_the_vae_is_described_in_the_config_so_a_checkpoint_is_complete():
    config = LDMConfig(vae_config=json.dumps({"config": {"latent_dim": 3, "hidden": [8]}, "data_shape": [5]}))
    model = LDM(config, (5,))
    assert model.vae.latent_shape == (3,) and model.prior.data_shape == (3,)
    assert model.latent_scale.item() == 1.0 and model.latent_scale.dtype == torch.float64  # s = 1 until measured
    with pytest.raises(Exception, match="needs a trained VAE"):
        LDM(LDMConfig(), (5,))
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(UserError, match=f"latent_scale={bad} is not allowed; use a number > 0, or 0 to measure"):
            LDMConfig(latent_scale=bad)
    with pytest.raises(Exception, match="shape"):
        LDM(config, (6,))


# ------------------------------------------------------------------------ importance weights over trajectories
def test_trajectory_weights_average_to_the_bound_and_to_the_likelihood():
    """E[-log w] over trajectories is the DDPM's bound (Ho eq. 5 is its Rao-Blackwellised form); E[w] is p(x_0), so
    for a prior that is exactly right the weight is p(x_0) itself on every trajectory (up to q(x_T) vs N(0, I))."""
    torch.manual_seed(0)
    vae, p_x = exact_posterior_linear_gaussian()
    prior = ldm_over(vae, 0.6, eps_gain=0.7, timesteps=20).prior  # an inexact prior over 2-D values
    z = torch.randn(5, 2, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    log_w = prior.trajectory_log_weight(z.repeat(4000, 1), generator=g).view(4000, 5)
    bound = prior.bound(z.repeat(4000, 1), generator=g).nll.view(4000, 5)
    se = torch.sqrt(log_w.var(0) / 4000 + bound.var(0) / 4000)
    assert torch.all((-log_w.mean(0) - bound.mean(0)).abs() < 5 * se), (-log_w.mean(0) - bound.mean(0), se)
    exact = ldm_over(vae, 0.6, timesteps=40).prior
    log_w = exact.trajectory_log_weight(z.repeat(50, 1), generator=g).view(50, 5)
    true = torch.distributions.Normal(0.0, 0.6).log_prob(z).sum(1)
    assert torch.all(log_w.std(0) < 0.02) and torch.all((log_w.mean(0) - true).abs() < 0.02)


def test_the_ldm_importance_weighted_estimate_is_a_bound_that_tightens_to_log_px():
    """With the inexact encoder (its ELBO 0.66 nats loose) and an exact prior, weights over (z, trajectory) give
    IWAE estimates that rise with K to log p(x) (Burda et al. theorem 1), never above it on average."""
    vae, p_x, _ = linear_gaussian_vae()
    model = ldm_over(vae, 0.6, timesteps=20)
    x = p_x.sample((4,))
    log_px = p_x.log_prob(x)
    g = torch.Generator().manual_seed(0)
    k1 = torch.stack([model.iwae_bound(x, 1, generator=g) for _ in range(300)])
    elbo, _ = mean_bound(model, x)
    assert torch.all((k1.mean(0) + elbo).abs() < 5 * k1.std(0) / math.sqrt(300) + 0.02)  # L_1 is the ELBO
    k500 = model.iwae_bound(x, 500, generator=g, chunk=100)
    assert torch.all((k500 - log_px).abs() < 0.1) and torch.all(k500 > k1.mean(0) + 0.3)


def test_the_ldm_importance_weighted_estimate_by_hand_from_the_same_generator():
    """LDM.iwae_bound, each weight written out: z = mu + sigma eps (eps from the generator, drawn in float32),
    log q(z|x) from torch.distributions, log p(x|z) from the decoder, log p_DDPM(s z) from the prior's trajectory
    (its noise from the same generator, after z's) plus d log s; log-mean-exp over k = 6 weights drawn in chunks of 4
    then 2 (and 18 in the default chunks of 16, then 2). Then in float32, as a new model is built (its scale s is a float64 buffer), one image with k = 1: the
    estimate is that single weight."""

    def by_hand(model, x, k, chunk, seed):
        g = torch.Generator().manual_seed(seed)
        mu, logvar = model.vae.encode(x)
        weights = []
        for n in [chunk] * (k // chunk) + ([k % chunk] if k % chunk else []):
            mu_n, sigma_n = mu.repeat(n, 1), torch.exp(0.5 * logvar.repeat(n, 1))
            z = mu_n + sigma_n * torch.randn(mu_n.shape, generator=g).to(x.dtype)  # drawn in float32 (draws.py)
            log_q = torch.distributions.Normal(mu_n, sigma_n).log_prob(z).sum(1)
            log_p = (model.vae.log_px_given_z(x.repeat(n, 1), z)
                     + model.prior.trajectory_log_weight(0.8 * z, generator=g) + 3 * math.log(0.8))
            weights.append((log_p - log_q).view(n, len(x)))
        return torch.logsumexp(torch.cat(weights).double(), 0) - math.log(k)

    def ldm():
        torch.manual_seed(3)
        vae = VAE(VAEConfig(hidden=(8,), latent_dim=3, decoder="gaussian", decoder_sigma=0.7), (5,))
        return LDM(LDMConfig(timesteps=6, net="mlp", latent_scale=0.8), vae.data_shape, vae=vae).eval()

    x = torch.randn(2, 5, dtype=torch.float64)
    with torch.no_grad():
        model = ldm().double()
        got = model.iwae_bound(x, 6, generator=torch.Generator().manual_seed(11), chunk=4)
        torch.testing.assert_close(got, by_hand(model, x, 6, 4, 11), rtol=1e-12, atol=1e-10)
        default_chunks = model.iwae_bound(x, 18, generator=torch.Generator().manual_seed(13))  # 16, then 2
        torch.testing.assert_close(default_chunks, by_hand(model, x, 18, 16, 13), rtol=1e-12, atol=1e-10)
        model = ldm()
        assert model.latent_scale.dtype == torch.float64 and next(model.parameters()).dtype == torch.float32
        one = model.iwae_bound(x[:1].float(), 1, generator=torch.Generator().manual_seed(12))
        torch.testing.assert_close(one, by_hand(model, x[:1].float(), 1, 1, 12), rtol=1e-5, atol=1e-4)
    assert got.dtype == one.dtype == torch.float64 and got.shape == (2,) and one.shape == (1,)


# ------------------------------------------------------------------------- the pieces the trainer calls
def test_losses_carry_the_priors_loss_on_s_z_under_prefixed_names():
    """LDM.losses: the prior's own loss (and unit) on s z for the z the terms were computed at; the bound's terms
    named decoder_nll, neg_entropy, log_scale and prior/<the DDPM's>; dims those of x, not of z."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(16,), latent_dim=4, decoder="gaussian"), (6,))
    model = LDM(LDMConfig(timesteps=10, latent_scale=0.5, loss="hybrid"), (6,), vae=vae)
    x = torch.randn(8, 6)
    torch.manual_seed(1)
    terms = model.losses(x, step=3)
    torch.manual_seed(1)  # the same draws again, by hand
    z, _ = model._encode(x, None)
    prior = model.prior.losses(z * 0.5, step=3)
    assert torch.equal(terms.loss, prior.loss) and terms.loss_unit == prior.loss_unit == "MSE + lambda bits/dim"
    assert set(terms.terms) == {"decoder_nll", "neg_entropy", "log_scale", "prior/steps", "prior/prior"}
    torch.testing.assert_close(terms.terms["prior/steps"], prior.terms["steps"], rtol=0, atol=0)
    assert terms.dims == 6 and prior.dims == 4


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory):
    from elbox.cli import main

    root = tmp_path_factory.mktemp("ldm-pieces")
    common = ["--steps", "2", "--batch-size", "16", "--final-eval-examples", "0", "--num-samples", "4", "--quiet",
              "--device", "cpu"]
    assert main(["train", "vae", "--out", str(root / "vae"), "--hidden", "16", "--latent-dim", "3", *common]) == 0
    assert main(["train", "--out", str(root / "ddpm"), "--net", "micro", "--timesteps", "4", *common]) == 0
    assert main(["train", "vae", "--out", str(root / "vae-no-ema"), "--hidden", "16", "--latent-dim", "3",
                 "--ema-decay", "0", *common]) == 0
    return root


def test_resolve_config_stores_the_vaes_description_and_refuses_what_is_not_a_vae(vae_run):
    from elbox import checkpoint as ckpt
    from elbox.errors import UserError

    resolved = LDM.resolve_config(LDMConfig(vae=str(vae_run / "vae")), "8bit")
    stored = json.loads(resolved.vae_config)
    desc = ckpt.load_checkpoint(vae_run / "vae", with_training_state=False).description
    assert stored == {"config": desc["config"], "data_shape": desc["data_shape"]} and stored["data_shape"] == [1, 8, 8]
    assert resolved.vae == str(vae_run / "vae") and stored["config"]["latent_dim"] == 3
    assert LDM.resolve_config(resolved, "8bit") is resolved  # already resolved (a resume, a load): kept as it is
    with pytest.raises(UserError, match="latent diffusion needs a trained VAE: `elbox train ldm --vae"):
        LDM.resolve_config(LDMConfig(), "8bit")
    with pytest.raises(UserError, match=r"is a run of a DDPM, not a VAE; latent diffusion needs a VAE run"):
        LDM.resolve_config(LDMConfig(vae=str(vae_run / "ddpm")), "8bit")


@pytest.mark.parametrize("scale", [0.0, 0.7])
def test_initialize_loads_the_vaes_ema_weights_and_measures_the_scale_only_when_asked(vae_run, scale):
    from elbox import checkpoint as ckpt
    from elbox.data import load_dataset, to_model

    config = LDM.resolve_config(LDMConfig(vae=str(vae_run / "vae"), latent_scale=scale, timesteps=4), "8bit")
    model = LDM(config, (1, 8, 8))
    x = to_model(load_dataset("digits", "train").data[:64], model.data_range,
                 generator=torch.Generator().manual_seed(0))
    torch.manual_seed(5)
    model.initialize(x)
    state = ckpt.load_checkpoint(vae_run / "vae", with_training_state=False)
    assert state.ema is not None and any(not torch.equal(state.ema[k], state.model[k]) for k in state.ema)
    for name, value in model.vae.state_dict().items():
        assert torch.equal(value, state.ema[name]), name  # the EMA weights, not the raw ones
    if scale:
        assert model.latent_scale.item() == pytest.approx(scale)
    else:
        torch.manual_seed(5)  # the same z ~ q(z|x) again
        z = model._encode(x, None)[0]
        assert model.latent_scale.item() == pytest.approx(1.0 / z.double().std().item(), rel=1e-6)
        assert model.latent_scale.item() != pytest.approx(1.0 / model.vae.encode(x)[0].double().std().item())


def test_initialize_takes_the_raw_weights_of_a_vae_without_ema_and_names_a_checkpoint_that_does_not_fit(vae_run):
    from elbox import checkpoint as ckpt
    from elbox.errors import UserError

    config = LDM.resolve_config(LDMConfig(vae=str(vae_run / "vae-no-ema"), latent_scale=1.0, timesteps=4), "8bit")
    model = LDM(config, (1, 8, 8))
    x = torch.zeros(2, 1, 8, 8)
    model.initialize(x)
    state = ckpt.load_checkpoint(vae_run / "vae-no-ema", with_training_state=False)
    assert state.ema is None
    for name, value in model.vae.state_dict().items():
        assert torch.equal(value, state.model[name]), name
    # a VAE run replaced by another model after the LDM was configured: one line naming the checkpoint
    wrong = LDM(LDM.resolve_config(LDMConfig(vae=str(vae_run / "vae"), latent_scale=1.0, timesteps=4), "8bit"),
                (1, 8, 8))
    wrong.config.vae = str(vae_run / "ddpm")
    with pytest.raises(UserError, match=f"{ckpt.resolve_checkpoint(vae_run / 'ddpm')} holds weights of a different"):
        wrong.initialize(x)


def test_the_ddpms_importance_weighted_estimate_is_the_log_mean_exp_of_its_trajectory_weights():
    from elbox.objectives.ddpm import DDPM, DDPMConfig

    torch.manual_seed(0)
    model = DDPM(DDPMConfig(timesteps=4, net="micro", data_kind="8bit"), (1, 8, 8))
    x = (torch.rand(3, 1, 8, 8) * 255).round() / 127.5 - 1  # on the 8-bit grid
    got = model.iwae_bound(x, 6, generator=torch.Generator().manual_seed(7), chunk=4)
    g = torch.Generator().manual_seed(7)  # the same draws, in the same chunks (4, then 2)
    w = torch.cat([model.trajectory_log_weight(x.repeat(n, 1, 1, 1), generator=g).view(n, 3) for n in (4, 2)])
    assert w.dtype == torch.float64  # a float32 model's weights summed over T steps in float64
    torch.testing.assert_close(got, torch.logsumexp(w.double(), 0) - math.log(6))
    assert got.shape == (3,) and bool((got > w.double().mean(0)).all())  # Jensen: above the mean log-weight
    # the default chunk is 16 (then 2 for k = 18): it decides which draws each trajectory gets, so a seeded figure
    # of `elbox evaluate --metric nll` stays the same number
    g = torch.Generator().manual_seed(8)
    w = torch.cat([model.trajectory_log_weight(x.repeat(n, 1, 1, 1), generator=g).view(n, 3) for n in (16, 2)])
    torch.testing.assert_close(model.iwae_bound(x, 18, generator=torch.Generator().manual_seed(8)),
                               torch.logsumexp(w.double(), 0) - math.log(18))


def test_trajectory_weight_by_hand():
    """One trajectory written out (T = 3, 8-bit images at the ends of [-1, 1], a network far from its
    initialisation): x_t = sqrt(1 - beta_t) x_{t-1} + sqrt(beta_t) eps_t from the generator (drawn in float32);
    log w = sum_t [log p(x_{t-1}|x_t) - log q(x_t|x_{t-1})] + log N(x_T; 0, I), with the discretized L_0 at t = 1
    and the predicted x_0 clipped (the clipping changes p here, so leaving it out would show)."""
    from elbox.objectives.ddpm import DDPM, DDPMConfig

    torch.manual_seed(0)
    model = DDPM(DDPMConfig(timesteps=3, net="micro", data_kind="8bit"), (1, 4, 4)).double()
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    d, normal = model.diffusion, torch.distributions.Normal
    x = torch.randint(0, 2, (2, 1, 4, 4)).double() * 2 - 1
    g = torch.Generator().manual_seed(5)
    log_w, x_prev, clipped = torch.zeros(2, dtype=torch.float64), x, []
    for i in range(3):
        t = torch.full((2,), i)
        beta = d.betas[i]
        x_t = torch.sqrt(1 - beta) * x_prev + torch.sqrt(beta) * torch.randn(x.shape, generator=g).double()
        log_w -= normal(torch.sqrt(1 - beta) * x_prev, torch.sqrt(beta)).log_prob(x_t).sum((1, 2, 3))
        out = d.p_mean_variance(model.net, x_t, t, clip_denoised=True)
        clipped.append(not torch.allclose(out["mean"], d.p_mean_variance(model.net, x_t, t)["mean"]))
        if i == 0:
            log_w -= d.decoder_nll(x, out["mean"], out["log_variance"])
        else:
            log_w += normal(out["mean"], torch.exp(0.5 * out["log_variance"])).log_prob(x_prev).sum((1, 2, 3))
        x_prev = x_t
    log_w += normal(0.0, 1.0).log_prob(x_prev).sum((1, 2, 3))
    assert any(clipped)
    got = model.trajectory_log_weight(x, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(got, log_w, rtol=1e-10, atol=1e-8)


def test_sample_decodes_the_priors_draw_divided_by_the_scale():
    """x = decode(z' / s), z' from the prior by the sampler asked for, and the decoder's own draws (an
    autoregressive decoder draws its pixels) from the same generator: the composition by hand gives the same
    numbers, for DDIM with its options and for the defaults (ancestral; DDIM's eta 0)."""
    vae = with_random_context(VAE(VAEConfig(latent_dim=2, hidden=(16,), conv_channels=(4,), ar_kernel=3,
                                            ar_channels=8), (1, 4, 4)))
    model = LDM(LDMConfig(timesteps=12, net="mlp", latent_scale=2.0), vae.data_shape, vae=vae).double().eval()

    def by_hand(seed, **options):
        g = torch.Generator().manual_seed(seed)
        return vae.decode(model.prior.sample(3, generator=g, **options) / 2.0, generator=g)

    calls = []
    ddim = model.sample(3, generator=torch.Generator().manual_seed(0), sampler="ddim", steps=5, eta=0.7,
                        progress=lambda i, n: calls.append((i, n)))
    assert torch.equal(ddim, by_hand(0, sampler="ddim", steps=5, eta=0.7)) and calls == [(i, 5) for i in range(1, 6)]
    assert not torch.equal(ddim, by_hand(0, sampler="ddim", steps=5, eta=0.0))
    assert torch.equal(model.sample(3, generator=torch.Generator().manual_seed(1), sampler="ddim", steps=5),
                       by_hand(1, sampler="ddim", steps=5, eta=0.0))
    assert torch.equal(model.sample(3, generator=torch.Generator().manual_seed(2)), by_hand(2))
    assert not torch.equal(by_hand(2), vae.decode(model.prior.sample(3, generator=torch.Generator().manual_seed(2))
                                                  / 2.0, generator=torch.Generator().manual_seed(2)))


def test_reconstruct_is_the_vaes():
    vae = VAE(VAEConfig(latent_dim=2, hidden=(8,)), (3,))
    model = LDM(LDMConfig(timesteps=4, net="mlp", latent_scale=2.0), vae.data_shape, vae=vae).eval()
    x = torch.rand(5, 3)
    assert torch.equal(model.reconstruct(x), vae.reconstruct(x))


def test_latent_diffusion_checks_its_batch_as_its_vae_does():
    """Its data is its VAE's: over a discretized decoder, a [0, 1] image (half off the 8-bit grid of [-1, 1]) is
    refused by every verb, as the VAE refuses it, not given a plausible-looking bound."""
    vae = VAE(VAEConfig(decoder="discretized-logistic", arch="mlp", hidden=(16,), latent_dim=3), (1, 8, 8))
    ldm = LDM(LDMConfig(timesteps=4, latent_scale=0.5), (1, 8, 8), vae=vae)
    x = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).round() / 255
    for verb in (ldm.bound, lambda x: ldm.iwae_bound(x, 2), lambda x: ldm.losses(x, step=0)):
        with pytest.raises(UserError, match="^the discretized-logistic decoder models 8-bit data on the grid"):
            verb(x)
        verb(x * 2 - 1)
    with pytest.raises(UserError, match="got non-finite values"):
        ldm.bound(torch.full((2, 1, 8, 8), float("nan")))
