"""The DDPM's math against closed forms and Monte-Carlo estimates (Ho et al. 2020; Nichol & Dhariwal 2021)."""

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from elbox.errors import UserError
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.diffusion import GaussianDiffusion, beta_schedule
from elbox.objectives.gaussian import discretized_gaussian_log_likelihood, log1mexp, log_normal_interval, normal_kl
from elbox.samplers import ancestral_sample, ddim_sample, ddim_timesteps


def make_diffusion(T=1000, schedule="linear", **kw):
    return GaussianDiffusion(beta_schedule(schedule, T), **kw).double()


def test_linear_and_cosine_schedules_match_the_papers():
    betas = beta_schedule("linear", 1000)
    assert betas.dtype == np.float64 and betas[0] == 1e-4 and betas[-1] == 0.02 and len(betas) == 1000
    cos = beta_schedule("cosine", 1000)
    abar = np.cumprod(1 - cos)
    # Nichol & Dhariwal eq. 17: alpha-bar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (1, 100, 500, 900):
        assert abar[t - 1] == pytest.approx(f(t) / f(0), rel=1e-9)
    assert cos.max() <= 0.999


def test_the_linear_schedule_takes_each_beta_strictly_inside_zero_one_and_refuses_either_at_or_past_an_end():
    # beta_schedule is also called directly (the API), not only behind DDPMConfig's own check
    inside, outside = (1e-12, 0.5, 1 - 1e-12), (-0.1, 0.0, 1.0, 1.5)
    for start in inside:
        for end in inside:
            assert beta_schedule("linear", 3, start, end)[[0, -1]].tolist() == [start, end]
    for bad in outside:
        for start, end in ((bad, 0.02), (1e-4, bad)):
            with pytest.raises(UserError, match=f"beta_start={start}, beta_end={end}: both betas must lie in"):
                beta_schedule("linear", 3, start, end)


def test_the_linear_schedule_is_float64_even_from_float32_betas():
    # the bound's per-step KLs are differences of nearly equal numbers: the schedule is kept in float64
    betas = beta_schedule("linear", 1000, np.float32(1e-4), np.float32(0.02))
    assert betas.dtype == np.float64 and betas[0] == np.float32(1e-4) and betas[-1] == np.float32(0.02)


def test_q_sample_closed_form_matches_iterating_the_forward_chain():
    """q(x_t|x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) (eq. 4) vs iterating q(x_t|x_{t-1}) = N(sqrt(1-b) x, b I)."""
    torch.manual_seed(0)
    d = make_diffusion(T=200)
    x0 = torch.tensor([0.8, -0.5, 0.0], dtype=torch.float64)
    n = 40_000
    x = x0.expand(n, 3).clone()
    betas = d.betas
    for i in range(200):
        x = torch.sqrt(1 - betas[i]) * x + torch.sqrt(betas[i]) * torch.randn_like(x)
        if i in (0, 49, 199):
            t = torch.full((1,), i)
            mean, var, logvar = d.q_mean_variance(x0[None], t)
            se_mean = torch.sqrt(var / n)
            assert torch.all((x.mean(0) - mean[0]).abs() < 5 * se_mean[0])
            assert torch.allclose(x.var(0), var[0].expand(3), rtol=0.05)
            assert torch.allclose(logvar, var.log())
            xt = d.q_sample(x0.expand(n, 3), t.expand(n))
            assert torch.all((xt.mean(0) - mean[0]).abs() < 5 * se_mean[0])


def test_posterior_matches_bayes_rule():
    """q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): the product of two Gaussians, computed independently."""
    d = make_diffusion(T=1000)
    torch.manual_seed(1)
    x0, xt = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    for i in (1, 10, 500, 999):
        t = torch.full((5,), i)
        beta = d.betas[i]
        abar_prev = d.alphas_cumprod[i - 1]
        # q(x_t | x_{t-1}) as a function of x_{t-1}: precision alpha_t / beta_t around x_t / sqrt(alpha_t)
        prec_lik = (1 - beta) / beta
        prec_prior = 1 / (1 - abar_prev)
        var = 1 / (prec_lik + prec_prior)
        mean = var * (torch.sqrt(1 - beta) / beta * xt + torch.sqrt(abar_prev) / (1 - abar_prev) * x0)
        m, v, logv = d.q_posterior_mean_variance(x0, xt, t)
        assert torch.allclose(m, mean, atol=1e-10)
        assert torch.allclose(v, var.expand_as(v), rtol=1e-10)
        assert torch.allclose(logv, torch.log(var).expand_as(logv), rtol=1e-10)


def test_normal_kl_matches_torch_distributions():
    torch.manual_seed(2)
    m1, m2 = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    lv1, lv2 = torch.randn(100, dtype=torch.float64), torch.randn(100, dtype=torch.float64)
    ours = normal_kl(m1, lv1, m2, lv2)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(ours, ref, atol=1e-12)


@pytest.mark.parametrize("mean,log_scale", [(0.0, -3.0), (0.95, -5.0), (-1.3, 0.0), (0.3, -8.0), (2.5, -1.0)])
def test_discretized_gaussian_sums_to_one_over_256_bins(mean, log_scale):
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1.0  # the 8-bit grid, exactly, in float64
    logp = discretized_gaussian_log_likelihood(grid, torch.tensor(mean, dtype=torch.float64),
                                               torch.tensor(log_scale, dtype=torch.float64))
    assert torch.isfinite(logp).all()
    assert logp.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_gaussian_gradients_stay_finite_far_in_the_tails():
    grid = torch.arange(256, dtype=torch.float32) / 127.5 - 1.0
    mean = torch.full((256,), 5.0, requires_grad=True)
    discretized_gaussian_log_likelihood(grid, mean, torch.full((256,), -6.0)).sum().backward()
    assert torch.isfinite(mean.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_the_discretized_gaussian_answers_in_the_inputs_dtype_though_it_works_in_float64(dtype):
    grid = (torch.arange(256, dtype=torch.float64) / 127.5 - 1.0).to(dtype)
    mean, log_scale = torch.zeros(256, dtype=dtype), torch.full((256,), -3.0, dtype=dtype)
    logp = discretized_gaussian_log_likelihood(grid, mean, log_scale)
    assert logp.dtype == dtype
    lo, hi = torch.tensor([-1.0, 0.5], dtype=dtype), torch.tensor([1.0, 2.0], dtype=dtype)
    assert log_normal_interval(lo, hi).dtype == dtype


def test_a_bin_too_narrow_for_float64_gets_a_finite_log_probability_not_minus_infinity():
    """With sigma = e^40 a pixel's bin spans ~1e-20 standard deviations: Phi(hi) and Phi(lo) round to the same
    float64 and their difference to 0. The clamp keeps log P finite (a floor of log 1e-30 below log Phi(hi)), so one
    such pixel cannot put -inf, and then NaN gradients, into a loss."""
    x = torch.tensor([0.0, 0.5], dtype=torch.float64)
    log_scale = torch.full((2,), 40.0, dtype=torch.float64, requires_grad=True)
    logp = discretized_gaussian_log_likelihood(x, torch.zeros(2, dtype=torch.float64), log_scale)
    assert torch.isfinite(logp).all()
    assert logp.max().item() < math.log(1e-20)  # far below any resolvable bin: a floor, not a probability
    logp.sum().backward()
    assert torch.isfinite(log_scale.grad).all()
    same = torch.tensor([0.3], dtype=torch.float64)  # lo = hi > 0: reflected, log Phi(-0.3) + log 1e-30
    floor = math.log(0.5 * math.erfc(0.3 / math.sqrt(2))) + math.log(1e-30)
    assert log_normal_interval(same, same).item() == pytest.approx(floor, rel=1e-12)


def test_log1mexp_is_accurate_to_a_few_float64_ulps_across_its_whole_range():
    """log(1 - e^a) against 400-digit decimal arithmetic, from a = -1e-15 (where log1p(-e^a) loses every digit to
    e^a rounding to 1) through the switch at -log 2 to -700 (where log(-expm1(a)) rounds to log 1 = 0)."""
    from decimal import Decimal, localcontext

    a = -torch.logspace(-15, math.log10(700.0), 150, dtype=torch.float64)
    a = torch.cat([a, torch.tensor([-math.log(2.0)], dtype=torch.float64)])
    with localcontext() as ctx:
        ctx.prec = 400  # e^-700 ~ 1e-304: 1 - e^a needs 320 digits to keep 16 of e^a
        ref = torch.tensor([float((1 - Decimal(v).exp()).ln()) for v in a.tolist()], dtype=torch.float64)
    ours = log1mexp(a)
    torch.testing.assert_close(ours, ref, rtol=4 * torch.finfo(torch.float64).eps, atol=0.0)


class GaussianOracle(nn.Module):
    """The optimal reverse process for data x_0 ~ N(mu, s^2 I): everything is jointly Gaussian, so
    E[x_0|x_t] and Var(x_{t-1}|x_t) have closed forms; it outputs them as (epsilon, variance interpolation v)."""

    def __init__(self, d: GaussianDiffusion, mu: float, s: float):
        super().__init__()
        self.d, self.mu, self.s2 = d, mu, s * s

    def forward(self, x_t, t):
        abar = self.d.alphas_cumprod[t].reshape(-1, 1)  # t: (B,), or one t for the batch
        gain = abar.sqrt() * self.s2 / (abar * self.s2 + 1 - abar)
        x0_hat = self.mu + gain * (x_t - abar.sqrt() * self.mu)
        eps = (x_t - abar.sqrt() * x0_hat) / (1 - abar).sqrt()
        var_x0 = self.s2 * (1 - abar) / (abar * self.s2 + 1 - abar)
        coef1 = self.d.posterior_mean_coef1[t].reshape(-1, 1)
        true_var = self.d.posterior_variance[t].reshape(-1, 1) + coef1**2 * var_x0  # Var(x_{t-1}|x_t)
        lo, hi = self.d.posterior_log_variance_clipped[t].reshape(-1, 1), self.d.log_betas[t].reshape(-1, 1)
        frac = (true_var.log() - lo) / (hi - lo)  # Nichol & Dhariwal eq. 15 solved for v
        return torch.cat([eps, (2 * frac - 1).expand_as(eps)], dim=1)


def test_vlb_with_the_optimal_denoiser_is_the_true_nll_and_never_below():
    """Data N(mu, s^2 I) in D dims: with the exact reverse process, the bound's gap KL(q(x_1:T|x_0) || p(x_1:T|x_0))
    vanishes up to the L_T mismatch (alpha-bar_T ~ 4e-5), so the VLB equals -log q(x_0) in expectation, and the
    bound may never be below the true NLL (beyond Monte-Carlo error of the single-x_t-per-step estimate)."""
    torch.manual_seed(3)
    D, mu, s, n = 2, 0.3, 0.7, 400
    model = DDPM(DDPMConfig(data_kind="continuous", net="mlp", var_type="learned", loss="hybrid"), (D,)).double()
    model.net = GaussianOracle(model.diffusion, mu, s)
    x0 = mu + s * torch.randn(n, D, dtype=torch.float64)
    terms = model.bound(x0, generator=torch.Generator().manual_seed(0))
    true_nll = (0.5 * ((x0 - mu) / s) ** 2 + math.log(s) + 0.5 * math.log(2 * math.pi)).sum(1)
    gap = terms.nll.double() - true_nll
    se = gap.std() / math.sqrt(n)
    assert gap.mean() > -3 * se, f"bound below the true NLL: gap {gap.mean():.5f} ± {se:.5f}"
    assert gap.mean().abs() < 0.01 * D + 3 * se, f"gap {gap.mean():.5f} ± {se:.5f} nats"
    assert terms.terms["kl"].shape == (n, 999) and terms.terms["prior"].mean() < 1e-3


def test_a_worse_denoiser_gives_a_larger_bound():
    torch.manual_seed(4)
    model = DDPM(DDPMConfig(data_kind="continuous", net="mlp"), (2,)).double()
    model.net = GaussianOracle(model.diffusion, 0.3, 0.7)
    x0 = 0.3 + 0.7 * torch.randn(200, 2, dtype=torch.float64)
    good = model.bound(x0, generator=torch.Generator().manual_seed(0)).nll.mean()
    model.net = GaussianOracle(model.diffusion, 0.0, 1.0)  # believes the data is N(0, 1)
    bad = model.bound(x0, generator=torch.Generator().manual_seed(0)).nll.mean()
    assert bad > good + 0.05


class RandomNet(nn.Module):
    def __init__(self, channels, out_factor=1):
        super().__init__()
        self.conv = nn.Conv2d(channels + 1, channels * out_factor, 3, padding=1)

    def forward(self, x, t):
        tt = (t.float() / 1000).reshape(-1, 1, 1, 1).expand(x.shape[0], 1, *x.shape[2:])
        return 0.1 * self.conv(torch.cat([x, tt], 1))


def test_sampling_is_deterministic_given_a_seed():
    torch.manual_seed(5)
    d = GaussianDiffusion(beta_schedule("linear", 50), var_type="fixed_small", loss_type="simple")
    net = RandomNet(1)
    a = ancestral_sample(d, net, (4, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    b = ancestral_sample(d, net, (4, 1, 8, 8), generator=torch.Generator().manual_seed(7))
    c = ancestral_sample(d, net, (4, 1, 8, 8), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    e = ddim_sample(d, net, (4, 1, 8, 8), steps=10, generator=torch.Generator().manual_seed(7))
    f = ddim_sample(d, net, (4, 1, 8, 8), steps=10, generator=torch.Generator().manual_seed(7))
    assert torch.equal(e, f)


def test_ddim_eta1_over_all_steps_is_ancestral_sampling():
    """With eta = 1 and tau = all T steps, sigma_t^2 = beta-tilde_t (Song et al. eq. 16) and the DDIM update is the
    DDPM posterior step: same seed, same samples (up to rounding); different seeds, same statistics."""
    torch.manual_seed(6)
    d = GaussianDiffusion(beta_schedule("linear", 100), var_type="fixed_small", loss_type="simple")
    net = RandomNet(1)
    shape = (256, 1, 4, 4)
    a = ancestral_sample(d, net, shape, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    b = ddim_sample(d, net, shape, eta=1.0, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    assert torch.allclose(a, b, atol=1e-4)
    c = ddim_sample(d, net, shape, eta=1.0, generator=torch.Generator().manual_seed(2), clip_denoised=False)
    assert abs(float(a.mean() - c.mean())) < 5 * float(a.std()) / math.sqrt(a.numel())
    assert float(a.std() / c.std()) == pytest.approx(1.0, abs=0.05)
    det = ddim_sample(d, net, shape, eta=0.0, generator=torch.Generator().manual_seed(1), clip_denoised=False)
    assert not torch.allclose(det, a, atol=1e-2)  # eta = 0 is a different (deterministic) sampler


def test_ddim_timesteps():
    assert ddim_timesteps(1000, 1000) == list(range(999, -1, -1))
    tau = ddim_timesteps(1000, 50)
    assert len(tau) == 50 and tau[0] == 999 and tau[-1] == 0 and tau == sorted(tau, reverse=True)
    assert ddim_timesteps(1000, 1) == [0] and ddim_timesteps(1, 1) == [0]  # one step: straight from x_T to x_0
    assert all(isinstance(i, int) for i in ddim_timesteps(10, 3))
    for bad in (0, -1, 1001):
        with pytest.raises(UserError, match=f"sampling steps={bad} is not allowed; use 1 <= steps <= T=1000"):
            ddim_timesteps(1000, bad)


@pytest.mark.parametrize("mean_type", ["epsilon", "x0", "v"])
def test_parameterisations_agree_on_x0(mean_type):
    """Feeding each parameterisation its exact target must recover the true x_0 and the true posterior."""
    d = make_diffusion(T=1000, mean_type=mean_type, var_type="fixed_small", loss_type="simple")
    torch.manual_seed(7)
    x0 = torch.randn(6, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 1, 10, 200, 700, 999])
    noise = torch.randn_like(x0)
    xt = d.q_sample(x0, t, noise)
    out = d.p_mean_variance(None, xt, t, model_output=d.training_target(x0, t, noise))
    assert torch.allclose(out["pred_x_start"], x0, atol=1e-6)
    assert torch.allclose(out["mean"], d.q_posterior_mean_variance(x0, xt, t)[0], atol=1e-6)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(timesteps=0), "timesteps=0"),
    (dict(beta_start=0.0), "(0, 1)"),
    (dict(beta_end=1.5), "(0, 1)"),
    (dict(loss="simple", var_type="learned"), "simple"),
    (dict(loss="hybrid", var_type="fixed_large"), "hybrid"),
    (dict(loss="hybrid", timestep_sampler="importance"), "importance"),
])
def test_impossible_settings_are_one_line_user_errors(kwargs, fragment):
    with pytest.raises(UserError) as e:
        DDPM(DDPMConfig(data_kind="8bit", net="micro", **kwargs), (1, 8, 8))
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_every_config_limit_allows_its_edge_and_refuses_one_past_it():
    """DDPMConfig's ranges at both ends: the edge value is a config, one step past it a one-line UserError."""
    edges = [  # (allowed, refused, words of the refusal)
        (dict(timesteps=100_000), dict(timesteps=100_001), "timesteps=100001"),
        (dict(timesteps=1), dict(timesteps=0), "timesteps=0"),
        (dict(base_channels=4096), dict(base_channels=4097), "base_channels=4097"),
        (dict(base_channels=1), dict(base_channels=0), "base_channels=0"),
        (dict(dropout=0.0), dict(dropout=-0.01), "dropout=-0.01"),
        (dict(dropout=0.99), dict(dropout=1.0), "dropout=1.0"),
        (dict(hybrid_lambda=1e-12), dict(hybrid_lambda=0.0), "hybrid_lambda=0.0"),
    ]
    for allowed, refused, words in edges:
        DDPMConfig(**allowed)
        with pytest.raises(UserError) as info:
            DDPMConfig(**refused)
        assert words in str(info.value) and "\n" not in str(info.value), (refused, str(info.value))


def test_image_size_not_divisible_by_the_unet_downsampling():
    with pytest.raises(UserError, match="not divisible"):
        DDPM(DDPMConfig(data_kind="8bit", net="small"), (1, 30, 30))


def test_importance_sampling_uses_the_loss_history():
    d = make_diffusion(T=20, loss_type="vlb", var_type="fixed_small", timestep_sampler="importance")
    t, w = d.sample_timesteps(8, torch.device("cpu"))
    assert torch.all(w == 20)  # uniform until every t has 10 values
    for _ in range(10):
        d.update_loss_history(torch.arange(20), torch.where(torch.arange(20) == 3, 100.0, 1.0).double())
    t, w = d.sample_timesteps(4000, torch.device("cpu"))
    assert (t == 3).float().mean() > 0.8  # p(t) ∝ sqrt(E[L_t^2])
    # the estimate stays unbiased: E[w L_t] = sum_t L_t
    losses = torch.where(torch.arange(20) == 3, 100.0, 1.0)
    assert float((w * losses[t]).mean()) == pytest.approx(float(losses.sum()), rel=0.05)


def test_timesteps_and_their_weights_land_on_the_requested_device_not_on_the_default_device():
    # torch.set_default_device("cuda") with a model kept on the CPU: t and the weights must stay on the CPU;
    # "meta" stands in for the GPU as the default device here
    d = make_diffusion(T=20, loss_type="vlb", var_type="fixed_small", timestep_sampler="importance")
    cpu = torch.device("cpu")
    for sampler in ("uniform", "importance"):  # uniform until every t has 10 values
        with torch.device("meta"):
            t, w = d.sample_timesteps(8, cpu)
        assert (t.device, w.device) == (cpu, cpu) and bool((w == 20).all()) == (sampler == "uniform"), sampler
        for _ in range(10):
            d.update_loss_history(torch.arange(20), torch.arange(1.0, 21.0, dtype=torch.float64))


def one_by_one(history: torch.Tensor, count: torch.Tensor, t: torch.Tensor, losses: torch.Tensor):
    """The loss history's update as N&D's code makes it: each value appended in turn to its step's last ten."""
    history, count = history.clone(), count.clone()
    for ti, li in zip(t.tolist(), losses.tolist()):
        if count[ti] == 10:
            history[ti, :-1] = history[ti, 1:].clone()
            history[ti, -1] = li
        else:
            history[ti, count[ti]] = li
            count[ti] += 1
    return history, count


@pytest.mark.parametrize("T", [1, 3, 50])
def test_the_loss_history_of_a_whole_batch_is_each_value_appended_in_turn(T):
    """Updated on the device in one go (no read back): repeated steps in a batch, a step with more than ten values
    in one batch, a full step's history moving on; the same history and counts as appending one by one."""
    d = make_diffusion(T=T, loss_type="vlb", var_type="fixed_small", timestep_sampler="importance")
    g = torch.Generator().manual_seed(0)
    for i, size in enumerate([1, 25, 7, 40, 3, 64, 2, 30] * 8):
        t = torch.randint(T, (size,), generator=g, dtype=torch.int32 if i % 2 else torch.int64)
        losses = torch.randn(size, generator=g, dtype=torch.float64)
        expected = one_by_one(d.loss_history, d.loss_history_count, t, losses)
        d.update_loss_history(t, losses)
        assert torch.equal(d.loss_history, expected[0]) and torch.equal(d.loss_history_count, expected[1])
    assert bool((d.loss_history_count == 10).all())


def test_whether_the_history_is_full_is_remembered_and_looked_at_anew_when_a_history_is_loaded():
    d = make_diffusion(T=2, loss_type="vlb", var_type="fixed_small", timestep_sampler="importance")
    empty = {k: v.clone() for k, v in d.state_dict().items()}
    assert not d.history_full()
    d.update_loss_history(torch.tensor([0, 1] * 10), torch.ones(20, dtype=torch.float64))
    assert d.history_full()
    d.loss_history_count.zero_()  # never happens in training: the history only grows
    assert d.history_full()  # remembered, not read again
    d.load_state_dict(empty)
    assert not d.history_full()
    d.update_loss_history(torch.tensor([0, 1] * 10), torch.ones(20, dtype=torch.float64))
    assert d.history_full()
    copy = torch.load(io.BytesIO(save(d)), weights_only=False)  # a whole module still pickles, and loads anew
    assert copy.history_full() and torch.equal(copy.loss_history, d.loss_history)
    copy.load_state_dict(empty)
    assert not copy.history_full() and d.history_full()


def save(module: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(module, buffer)
    return buffer.getvalue()


def test_the_loss_history_keeps_the_last_ten_values_of_each_step_in_order():
    d = make_diffusion(T=3, loss_type="vlb", var_type="fixed_small", timestep_sampler="importance")
    for value in range(1, 14):  # 13 values for t = 1, 2 for t = 0
        d.update_loss_history(torch.tensor([1]), torch.tensor([float(value)], dtype=torch.float64))
    d.update_loss_history(torch.tensor([0, 0]), torch.tensor([7.0, 8.0], dtype=torch.float64))
    assert d.loss_history[1].tolist() == [float(v) for v in range(4, 14)]
    assert d.loss_history[0, :2].tolist() == [7.0, 8.0] and d.loss_history_count.tolist() == [2, 10, 0]


def test_built_directly_the_diffusion_defaults_to_improved_ddpm_settings():
    """GaussianDiffusion(betas) alone is Nichol & Dhariwal's recipe: epsilon mean, learned variance, L_hybrid with
    lambda = 0.001 (their sec. 3.1), uniform t, the discretized decoder of Ho et al. eq. 13."""
    d = GaussianDiffusion(beta_schedule("linear", 4))
    assert (d.mean_type, d.var_type, d.loss_type, d.timestep_sampler, d.decoder) == (
        "epsilon", "learned", "hybrid", "uniform", "discretized")
    assert d.hybrid_lambda == 0.001


@pytest.mark.parametrize("keyword, name, allowed", [
    ("mean_type", "mean_type", "epsilon, x0, v"),
    ("var_type", "var_type", "fixed_small, fixed_large, learned"),
    ("loss_type", "loss", "simple, vlb, hybrid"),  # named as the config key the user writes
    ("timestep_sampler", "timestep_sampler", "uniform, importance"),
    ("decoder", "decoder", "discretized, continuous"),
])
def test_built_directly_an_unknown_choice_is_refused_naming_the_setting_and_its_options(keyword, name, allowed):
    # DDPMConfig checks these first, so only a direct build reaches the diffusion's own check
    with pytest.raises(UserError) as info:
        GaussianDiffusion(beta_schedule("linear", 4), **{keyword: "bogus"})
    assert str(info.value) == f"{name}='bogus' is not known; choose one of {allowed}"


@pytest.mark.parametrize("betas", [[0.0, 0.5], [-0.1, 0.5], [0.5, 1.0], [0.5, 1.5], [0.5, 2.5]])
def test_built_directly_a_beta_at_or_outside_zero_one_is_refused(betas):
    # beta_schedule and DDPMConfig check their own betas first; a schedule handed in directly is checked here
    with pytest.raises(UserError) as info:
        GaussianDiffusion(np.array(betas), loss_type="vlb", var_type="fixed_small")
    assert str(info.value) == "every beta_t must lie in (0, 1); check beta_start and beta_end"
    GaussianDiffusion(np.array([1e-12, 1 - 1e-12]), loss_type="vlb", var_type="fixed_small")  # just inside: built


def test_reverse_variances_of_the_two_shortest_chains():
    """T = 2 is the shortest chain with a beta-tilde_2 to borrow at t = 1: fixed_small is (beta-tilde_2,
    beta-tilde_2), fixed_large (beta-tilde_2, beta_2). T = 1 has none (beta-tilde_1 = 0): both are beta_1."""
    betas = np.array([0.1, 0.3])
    abar_1, abar_2 = 1 - betas[0], (1 - betas[0]) * (1 - betas[1])
    tilde_2 = betas[1] * (1 - abar_1) / (1 - abar_2)  # beta-tilde_t = beta_t (1 - abar_{t-1}) / (1 - abar_t), eq. 7
    expected = {"fixed_small": [tilde_2, tilde_2], "fixed_large": [tilde_2, 0.3]}
    for var_type, variances in expected.items():
        d = GaussianDiffusion(betas, var_type=var_type, loss_type="vlb").double()
        out = d.p_mean_variance(None, torch.zeros(2, 3, dtype=torch.float64), torch.tensor([0, 1]),
                                model_output=torch.zeros(2, 3, dtype=torch.float64))
        torch.testing.assert_close(out["log_variance"][:, 0], torch.tensor(variances, dtype=torch.float64).log(),
                                   rtol=1e-12, atol=0)
    for var_type in ("fixed_small", "fixed_large"):
        d = GaussianDiffusion(np.array([0.2]), var_type=var_type, loss_type="vlb").double()
        out = d.p_mean_variance(None, torch.zeros(1, 3, dtype=torch.float64), torch.tensor([0]),
                                model_output=torch.zeros(1, 3, dtype=torch.float64))
        assert torch.equal(out["log_variance"], torch.full((1, 3), math.log(0.2), dtype=torch.float64)), var_type


def test_the_schedule_is_float64_and_only_the_loss_history_is_kept_in_a_state_dict():
    """The schedule is float64 (alpha-bar_T and L_T are where float32 bites) even from float32 betas, and is not
    saved: it follows from the config. What is saved is the importance-sampling history, float64 values and
    int64 counts, one row per step."""
    d = GaussianDiffusion(np.linspace(1e-4, 0.02, 7, dtype=np.float32), loss_type="vlb", var_type="fixed_small")
    schedule = dict(d.named_buffers())
    assert {name for name, b in schedule.items() if b.dtype != torch.float64} == {"loss_history_count"}
    state = d.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "loss_history": (torch.float64, (7, 10)), "loss_history_count": (torch.int64, (7,))}
