"""Mixed prediction (DDPMConfig.mixed_prediction; LSGM, Vahdat, Kreis & Kautz 2021, sec. 3.2): the denoiser is the
exact one of N(0, I) data plus a learned residual, so an untrained prior over a VAE's latents IS N(0, I).

For x_0 ~ N(0, I), x_t ~ N(0, I) at every t, E[eps | x_t] = sqrt(1 - abar_t) x_t and q(x_{t-1} | x_t) has variance
beta_t: then p_theta(x_{0:T}) = q(x_{0:T}) and every trajectory's importance weight is p(x_0) itself."""

import math

import pytest
import torch
from test_latent import ExactGaussianDenoiser
from test_vae import linear_gaussian_vae

from elbox.errors import UserError
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.latent import LDM, LDMConfig


def log_normal(x):
    return -0.5 * (x**2).sum(1) - 0.5 * x.shape[1] * math.log(2 * math.pi)


def mixed_ddpm(dim=3, **config):
    torch.manual_seed(0)
    return DDPM(DDPMConfig(data_kind="continuous", net="mlp", mixed_prediction=True, **config), (dim,)).double().eval()


@pytest.mark.parametrize("mean_type", ["epsilon", "x0", "v"])
@pytest.mark.parametrize("schedule, timesteps", [("linear", 1), ("linear", 2), ("linear", 40), ("cosine", 40)])
def test_an_untrained_mixed_prior_gives_every_trajectory_the_weight_of_n01(mean_type, schedule, timesteps):
    """log p(x_{0:T}) - log q(x_{1:T} | x_0) = log N(x_0; 0, I) on every trajectory: each reverse step is exact,
    L_0 (at t = 1, variance beta_1) included. A wrong coefficient or a step off by one leaves a trajectory-dependent
    error of order beta_t, far above the tolerance."""
    model = mixed_ddpm(mean_type=mean_type, schedule=schedule, timesteps=timesteps)
    x = 1.5 * torch.randn(5, 3, dtype=torch.float64)
    for seed in range(3):
        log_w = model.trajectory_log_weight(x, generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(log_w, log_normal(x), rtol=0, atol=1e-8)


def test_the_mixed_output_is_the_gaussian_optimum_plus_the_network():
    """Against the test suite's own exact denoiser of N(0, v I) data (written from Bayes' rule, v = 1); then a
    trained-looking network's output lands on top of it unchanged."""
    model = mixed_ddpm(schedule="cosine", timesteps=40)
    x_t, t = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 40, (8,))
    exact = ExactGaussianDenoiser(model.diffusion, v=1.0)(x_t, t)
    torch.testing.assert_close(model.net(x_t, t), exact, rtol=0, atol=1e-10)
    with torch.no_grad():
        for p in model.net.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    residual = model.net.net(x_t, t)
    assert residual.abs().min() > 1e-4
    torch.testing.assert_close(model.net(x_t, t), exact + residual, rtol=0, atol=1e-10)
    torch.testing.assert_close(model.net(x_t, t[:1].squeeze()), model.net(x_t, t[:1].expand(8)))  # a shared t


def test_an_untrained_mixed_latent_prior_gives_the_vaes_own_importance_weights():
    """Latent diffusion at scale 1 over a frozen VAE, before training: its weights over (z, trajectory) are the VAE's
    p(x|z) N(z; 0, I) / q(z|x) for the same z (drawn first from the same generator), so the estimates agree to
    rounding, K = 1 (the ELBO's single draw) and K = 8 alike."""
    vae, p_x, _ = linear_gaussian_vae()
    x = p_x.sample((4,))
    config = LDMConfig(timesteps=30, net="mlp", latent_scale=1.0, mixed_prediction=True)
    ldm = LDM(config, vae.data_shape, vae=vae).double().eval()
    for k in (1, 8):
        got = ldm.iwae_bound(x, k, generator=torch.Generator().manual_seed(k), chunk=8)
        want = vae.iwae_bound(x, k, generator=torch.Generator().manual_seed(k), chunk=8)
        torch.testing.assert_close(got, want.double(), rtol=0, atol=1e-8)


def test_the_end_to_end_gradient_through_an_untrained_mixed_prior_is_that_of_n01():
    """End-to-end latent diffusion sends the encoder the gradient of the single-t estimate ``bound_estimate`` (the
    wrapped network rerun on detached weights); at the start it must be the gradient of -log N(z; 0, I), z, on
    average."""
    model = mixed_ddpm(timesteps=20)
    z = 1.5 * torch.randn(4, 3, dtype=torch.float64)
    n = 4000
    zs = z.repeat(n, 1).requires_grad_(True)
    terms = model.bound_estimate(zs)
    sum(terms.terms.values()).sum().backward()
    grad = zs.grad.view(n, 4, 3)
    se = grad.std(0) / math.sqrt(n)
    assert torch.all((grad.mean(0) - z).abs() < 5 * se) and torch.all(se < 0.03), (grad.mean(0) - z, se)


def test_training_the_residual_beats_n01_where_the_data_leave_it():
    """Data: one bimodal coordinate (+-1.2, sd 0.3) beside one N(0, 1). The mixed prior starts at N(0, I)'s
    -log p(x) (3.10 nats here) and, trained on its bound for a few hundred steps, goes well below it, staying above
    the true -log p(x) (2.33 nats), as a bound must."""
    torch.manual_seed(0)

    def data(n, g):
        sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        return torch.stack([1.2 * sign + 0.3 * torch.randn(n, generator=g), torch.randn(n, generator=g)], 1)

    model = DDPM(DDPMConfig(data_kind="continuous", net="mlp", mixed_prediction=True, timesteps=20, loss="vlb"), (2,))
    test = data(4000, torch.Generator().manual_seed(1))
    n01 = -log_normal(test).mean()
    modes = torch.distributions.Normal(torch.tensor([1.2, -1.2]), 0.3).log_prob(test[:, :1])
    true = -(torch.logsumexp(modes, 1) - math.log(2) + torch.distributions.Normal(0.0, 1.0).log_prob(test[:, 1])).mean()
    start = model.bound(test, generator=torch.Generator().manual_seed(2)).nll.mean()
    assert abs(start - n01) < 0.05  # untrained: N(0, I), up to the one draw of x_t per step
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(3)
    for step in range(300):
        loss = model.losses(data(256, g), step=step).loss.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = model.eval().bound(test, generator=torch.Generator().manual_seed(2)).nll.mean()
    assert true - 0.05 < trained < n01 - 0.3, (float(trained), float(n01), float(true))


def test_mixed_prediction_is_refused_for_8bit_images_in_one_line():
    with pytest.raises(UserError, match="mixed_prediction=True starts the model at N\\(0, I\\)"):
        DDPMConfig(data_kind="8bit", mixed_prediction=True)
    DDPMConfig(data_kind="auto", mixed_prediction=True)  # decided when the data are known


def test_elbox_train_refuses_mixed_prediction_on_images_and_trains_a_mixed_latent_prior(tmp_path, elbox_cli):
    from test_cli_ldm import QUICK, VECTOR_VAE

    r = elbox_cli("train", "ddpm", "--out", tmp_path / "d", "--mixed-prediction", "--net", "micro", *QUICK)
    assert r.returncode == 2 and "mixed_prediction=True" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "d").exists()
    vae_run, run = tmp_path / "vae", tmp_path / "ldm"
    assert elbox_cli("train", "vae", "--out", vae_run, *VECTOR_VAE, *QUICK).returncode == 0
    r = elbox_cli("train", "ldm", "--vae", vae_run, "--out", run, "--timesteps", "10", "--mixed-prediction",
                  "--latent-scale", "1", *QUICK)
    assert r.returncode == 0, r.stderr
    import elbox

    model = elbox.load(run)  # rebuilt from its checkpoint: the residual network inside the mixed denoiser
    assert model.config.mixed_prediction and any(k.startswith("prior.net.net.") for k in model.state_dict())
    e = elbox_cli("evaluate", run, "--metric", "nll", "--k", "2", "--examples", "8", "--json")
    assert e.returncode == 0, e.stderr
