"""The DDPM's training objective and bound checked for their values, each against an independent computation.

Every test here fails on one bug that once passed the whole suite (issue 9): the hybrid loss without its
stop-gradient at the mean, lambda = 1 instead of 0.001, ``fixed_large`` using beta-tilde, L_T read at the wrong
timestep, uniform t never drawing the first step, the training term of the bound missing its weight T, and the
discretized L_0's bins shifted by half a bin.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn

from elbox import draws
from elbox.data import load_dataset, to_model
from elbox.errors import UserError
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.diffusion import GaussianDiffusion
from elbox.objectives.gaussian import discretized_gaussian_log_likelihood

D = 64  # 8x8 grey digits


class FixedOutput(nn.Module):
    """A "network" whose output is one free tensor, so gradients with respect to the output are its gradients."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.out = nn.Parameter(0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(3)))

    def forward(self, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.out


def digits(n: int) -> torch.Tensor:
    return to_model(load_dataset("digits").data[:n], "symmetric").double()


def ddpm(**kw) -> DDPM:
    return DDPM(DDPMConfig(data_kind="8bit", net="micro", **kw), (1, 8, 8)).double()


def seeded_losses(model: DDPM, x: torch.Tensor, seed: int):
    """model.losses(x) with its t and noise drawn from ``seed``; the same seed gives the same draws again."""
    with draws.global_batch(seed, torch.arange(len(x)), len(x)):
        return model.losses(x, step=0)


def seeded_draws(model: DDPM, x: torch.Tensor, seed: int):
    """The t, weight and noise that ``seeded_losses(model, x, seed)`` draws, in the order it draws them."""
    with draws.global_batch(seed, torch.arange(len(x)), len(x)):
        t, weight = model.diffusion.sample_timesteps(len(x), x.device)
        noise = draws.randn_like(x)
    return t, weight, noise


def linear_schedule(T: int):
    betas = np.linspace(1e-4, 0.02, T)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    beta_tilde = betas * (1.0 - abar_prev) / (1.0 - abar)  # Ho et al. eq. 7
    return betas, abar, beta_tilde


# ------------------------------------------------------------------------------------------ the losses
def test_hybrid_loss_trains_the_mean_by_the_simple_loss_only_and_sigma_by_lambda_vlb():
    """L_hybrid = L_simple + lambda L_vlb with the vlb's gradient stopped at the mean (Nichol & Dhariwal sec. 3.1,
    lambda = 0.001): d loss / d mean-output is exactly that of ||eps - eps_theta||^2 / D; d loss / d v is
    lambda * T * dL_t/dv / (D ln 2); and the loss's value is mse + lambda * T * L_t / (D ln 2)."""
    T, x = 20, digits(6)
    model = ddpm(timesteps=T)
    model.net = FixedOutput((6, 2, 8, 8)).double()
    terms = seeded_losses(model, x, seed=11)
    terms.loss.sum().backward()
    grad = model.net.out.grad
    t, weight, noise = seeded_draws(model, x, seed=11)
    assert torch.equal(weight, torch.full((6,), float(T), dtype=weight.dtype))
    mean_out, v = model.net.out.detach().split(1, dim=1)

    assert torch.allclose(grad[:, :1], 2.0 * (mean_out - noise) / D, rtol=1e-9, atol=1e-15)

    d = model.diffusion
    v_free = v.clone().requires_grad_()
    x_t = d.q_sample(x, t, noise)
    l_t, _ = d.vlb_terms(model.net, x, x_t, t, model_output=torch.cat([mean_out, v_free], dim=1))
    (l_t * T).sum().backward()
    expected_v = 0.001 * v_free.grad / (D * math.log(2))
    assert expected_v.abs().max() > 1e-6  # the vlb part does reach Sigma
    assert torch.allclose(grad[:, 1:], expected_v, rtol=1e-9, atol=1e-15)

    mse = (mean_out - noise).pow(2).flatten(1).mean(1)
    expected_loss = mse + 0.001 * T * l_t.detach() / (D * math.log(2))
    assert torch.allclose(terms.loss.detach(), expected_loss, rtol=1e-12)
    assert torch.allclose(terms.extras["mse"], mse, rtol=1e-12)


def test_the_configured_hybrid_lambda_is_the_one_the_loss_uses():
    """DDPMConfig.hybrid_lambda reaches the loss (the test above holds at the default, 0.001, which is also
    GaussianDiffusion's own default): with lambda = 0.25, loss = mse + 0.25 * T * L_t / (D ln 2)."""
    model = ddpm(timesteps=20, loss="hybrid", var_type="learned", hybrid_lambda=0.25)
    terms = seeded_losses(model, digits(4), seed=3)
    expected = terms.extras["mse"] + 0.25 * terms.terms["steps"].detach() / (D * math.log(2))
    assert torch.allclose(terms.loss.detach(), expected, rtol=1e-12)


def test_simple_and_vlb_losses_have_their_papers_values():
    """simple: ||eps - eps_theta||^2 / D (Ho eq. 14), no gradient through the reported bound terms;
    vlb: (T L_t + L_T) / (D ln 2), the bound in bits/dim."""
    T, x = 10, digits(5)
    for loss, var_type in [("simple", "fixed_large"), ("vlb", "learned")]:
        model = ddpm(timesteps=T, loss=loss, var_type=var_type)
        model.net = FixedOutput((5, 2 if var_type == "learned" else 1, 8, 8)).double()
        terms = seeded_losses(model, x, seed=5)
        t, _, noise = seeded_draws(model, x, seed=5)
        out = model.net.out.detach()
        d = model.diffusion
        x_t = d.q_sample(x, t, noise)
        l_t, _ = d.vlb_terms(model.net, x, x_t, t, model_output=out)
        assert torch.allclose(terms.terms["steps"].detach(), T * l_t, rtol=1e-12)
        if loss == "simple":
            assert torch.allclose(terms.loss, (out - noise).pow(2).flatten(1).mean(1), rtol=1e-12)
            assert not terms.terms["steps"].requires_grad
        else:
            expected = (T * l_t + terms.terms["prior"]) / (D * math.log(2))
            assert torch.allclose(terms.loss.detach(), expected, rtol=1e-12)


def test_uniform_t_draws_every_step_equally_often_with_weight_T():
    T, n = 5, 20_000
    d = GaussianDiffusion(np.linspace(1e-4, 0.02, T), loss_type="vlb")
    torch.manual_seed(0)
    t, weight = d.sample_timesteps(n, torch.device("cpu"))
    counts = torch.bincount(t, minlength=T).double()
    assert len(counts) == T and int(t.min()) == 0 and int(t.max()) == T - 1
    # each count is Binomial(n, 1/T): within 5 standard deviations of n/T
    assert torch.all((counts - n / T).abs() < 5 * math.sqrt(n * (1 / T) * (1 - 1 / T))), counts
    assert torch.all(weight == T)


def test_the_training_terms_are_an_unbiased_estimate_of_the_full_bound():
    """E_{t, eps}[losses(x).nll] = bound(x).nll: the logged training nelbo estimates the bound (Monte Carlo).

    Training scores the network's own x_0 prediction; evaluation clips it to [-1, 1] by default (a slightly
    different, also valid, reverse process), so the comparison is made with clipping off."""
    T, reps = 4, 400
    torch.manual_seed(0)
    model = ddpm(timesteps=T).eval()
    model.clip_denoised = False
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the U-Net's last layer starts at zero: make the test generic
    x = digits(3)
    with torch.no_grad():
        terms = model.losses(x.repeat(reps, 1, 1, 1), step=0)
        est = terms.nll.view(reps, 3)
        full = torch.stack([model.bound(x, generator=torch.Generator().manual_seed(s)).nll for s in range(10)])
    mean, se = est.mean(0), est.std(0) / math.sqrt(reps)
    target, target_se = full.mean(0), full.std(0) / math.sqrt(len(full))
    assert torch.all((mean - target).abs() < 4 * (se**2 + target_se**2).sqrt()), (mean, se, target, target_se)
    assert torch.all(se < 0.1 * target)  # the check above has teeth: a missing factor T or step moves it more
    summary = terms.summary()
    assert summary["nelbo"] == pytest.approx(float(terms.nll.mean()), rel=1e-9)
    assert summary["bpd"] == pytest.approx(summary["nelbo"] / (D * math.log(2)), rel=1e-9)


# ------------------------------------------------------------------------------------- Sigma and L_T
@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small", "learned"])
def test_reverse_variances_are_the_papers(var_type):
    """fixed_large: Sigma_t = beta_t, but beta-tilde_2 at t = 1 (as Ho et al.'s code); fixed_small: beta-tilde_t
    (its t = 1 value, 0, clipped to beta-tilde_2); learned with v = +1 / -1 / 0: log beta_t, log beta-tilde_t and
    their midpoint (Nichol & Dhariwal eq. 15)."""
    T = 10
    betas, _, beta_tilde = linear_schedule(T)
    log_tilde = np.log(np.append(beta_tilde[1], beta_tilde[1:]))
    loss = "hybrid" if var_type == "learned" else "simple"
    d = GaussianDiffusion(betas, var_type=var_type, loss_type=loss).double()
    x_t = torch.zeros(3, 2, dtype=torch.float64)
    for i in range(T):
        t = torch.full((3,), i)
        if var_type == "learned":
            v = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)[:, None].expand(3, 2)
            out = d.p_mean_variance(None, x_t, t, model_output=torch.cat([torch.zeros(3, 2, dtype=torch.float64), v], 1))
            expected = [math.log(betas[i]), log_tilde[i], 0.5 * (math.log(betas[i]) + log_tilde[i])]
        else:
            out = d.p_mean_variance(None, x_t, t, model_output=torch.zeros(3, 2, dtype=torch.float64))
            value = (math.log(betas[i]) if i > 0 else log_tilde[0]) if var_type == "fixed_large" else log_tilde[i]
            expected = [value] * 3
        assert torch.allclose(out["log_variance"][:, 0], torch.tensor(expected, dtype=torch.float64), rtol=1e-12)


@pytest.mark.parametrize("var_type", ["fixed_large", "fixed_small", "learned"])
def test_the_reverse_step_hands_back_the_networks_prediction_without_its_variance_channels(var_type):
    """p_mean_variance returns, as "model_output", what the network predicted for the mean (epsilon here): all
    of its output, or with a learned variance its first C channels, the v channels split off."""
    d = GaussianDiffusion(linear_schedule(10)[0], var_type=var_type,
                          loss_type="hybrid" if var_type == "learned" else "simple").double()
    x_t = torch.randn(3, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    channels = 4 if var_type == "learned" else 2
    output = torch.randn(3, channels, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = d.p_mean_variance(lambda x, t: output, x_t, torch.full((3,), 5))
    assert torch.equal(out["model_output"], output[:, :2])


def test_prior_term_is_the_kl_at_the_last_step_in_closed_form():
    """L_T = KL(N(sqrt(abar_T) x_0, (1 - abar_T) I) || N(0, I)), abar_T = prod_t (1 - beta_t) (Ho et al. eq. 5)."""
    T = 10
    betas, abar, _ = linear_schedule(T)
    d = GaussianDiffusion(betas, loss_type="vlb").double()
    x = digits(4)
    a = abar[-1]
    expected = 0.5 * ((1 - a) + a * x.pow(2) - 1 - math.log(1 - a)).flatten(1).sum(1)
    assert torch.allclose(d.prior_kl(x), expected, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- L_0
def _normal_cdf(z: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.erfc(-z / math.sqrt(2.0))


@pytest.mark.parametrize("level", [0, 1, 100, 128, 254, 255])
def test_discretized_decoder_gives_each_level_the_mass_of_its_own_bin(level):
    """P(x = -1 + 2k/255) = Phi((x + 1/255 - mu)/s) - Phi((x - 1/255 - mu)/s), with the edge levels taking the
    tails to -inf and +inf (Ho et al. eq. 13), computed here from the normal CDF directly."""
    torch.manual_seed(level)
    mean = torch.empty(50, dtype=torch.float64).uniform_(-1.1, 1.1)
    log_scale = torch.empty(50, dtype=torch.float64).uniform_(math.log(0.02), math.log(0.5))
    x = torch.full((50,), -1.0 + 2.0 * level / 255, dtype=torch.float64)
    s = log_scale.exp()
    upper = torch.ones_like(x) if level == 255 else _normal_cdf((x + 1 / 255 - mean) / s)
    lower = torch.zeros_like(x) if level == 0 else _normal_cdf((x - 1 / 255 - mean) / s)
    expected = torch.log(upper - lower)
    got = discretized_gaussian_log_likelihood(x, mean, log_scale)
    ok = (upper - lower) > 1e-12  # where the direct difference is still accurate
    assert ok.sum() > 10
    assert torch.allclose(got[ok], expected[ok], rtol=1e-7, atol=1e-9)


def test_the_ddpm_decoder_term_is_the_discretized_likelihood_at_the_reverse_step_mean_and_std():
    """L_0 = -sum_i log P(x_0,i | x_1) with the mean and the standard deviation exp(log_variance / 2) of p(x_0|x_1)."""
    model = ddpm(timesteps=10)
    model.net = FixedOutput((4, 2, 8, 8)).double()
    d, x = model.diffusion, digits(4)
    t = torch.zeros(4, dtype=torch.long)
    x_t = d.q_sample(x, t, torch.randn_like(x))
    with torch.no_grad():
        l_0, out = d.vlb_terms(model.net, x, x_t, t)
    s = torch.exp(0.5 * out["log_variance"])
    upper = torch.where(x > 0.999, torch.ones_like(x), _normal_cdf((x + 1 / 255 - out["mean"]) / s))
    lower = torch.where(x < -0.999, torch.zeros_like(x), _normal_cdf((x - 1 / 255 - out["mean"]) / s))
    expected = -torch.log(upper - lower).flatten(1).sum(1)
    assert torch.allclose(l_0, expected, rtol=1e-6)


def test_bound_terms_for_one_and_two_steps():
    """T = 1: the bound is L_0 + L_T, no KL columns; T = 2: one KL column (L_1)."""
    x = digits(2)
    one = ddpm(timesteps=1, loss="vlb").bound(x, generator=torch.Generator().manual_seed(0))
    assert set(one.terms) == {"decoder_nll", "prior"}
    two = ddpm(timesteps=2, loss="vlb").bound(x, generator=torch.Generator().manual_seed(0))
    assert set(two.terms) == {"decoder_nll", "kl", "prior"} and two.terms["kl"].shape == (2, 1)


def test_sample_defaults_progress_and_messages():
    model = ddpm(timesteps=6)
    model.net = FixedOutput((2, 2, 8, 8)).double()
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    default = model.sample(2, generator=gen(), sampler="ddim", steps=3)
    torch.testing.assert_close(default, model.sample(2, generator=gen(), sampler="ddim", steps=3, eta=0.0),
                               rtol=0, atol=0)  # DDIM's default eta is 0: deterministic
    for sampler, steps, calls in (("ancestral", None, 6), ("ddim", 3, 3)):
        seen = []
        model.sample(2, generator=gen(), sampler=sampler, steps=steps, progress=lambda k, n: seen.append((k, n)))
        assert seen == [(k, calls) for k in range(1, calls + 1)], sampler
    with pytest.raises(UserError, match="ancestral sampling runs all T=6 steps; use --sampler ddim for steps=3"):
        model.sample(2, sampler="ancestral", steps=3)
    with pytest.raises(UserError, match="eta=0.5 is DDIM's .*ancestral sampling has none: use --sampler ddim"):
        model.sample(2, sampler="ancestral", eta=0.5)  # not silently ignored
    with pytest.raises(UserError, match="unknown sampler 'euler'; choose ancestral or ddim"):
        model.sample(2, sampler="euler")


def test_sample_follows_the_models_clipping_setting():
    """Images clip the predicted x_0 to [-1, 1] by default; with clipping off the samplers get clip_denoised=False."""
    from elbox.samplers import ancestral_sample, ddim_sample

    model = ddpm(timesteps=5)
    model.net = FixedOutput((2, 2, 8, 8)).double()
    model.net.out.data *= 20  # predictions far outside [-1, 1]: clipping shows
    shape, gen = (2, 1, 8, 8), lambda: torch.Generator().manual_seed(2)  # noqa: E731
    for clip in (True, False):
        model.clip_denoised = clip
        for sampler, fn, kw in (("ancestral", ancestral_sample, {}), ("ddim", ddim_sample, {"steps": 3})):
            expected = fn(model.diffusion, model.net, shape, generator=gen(), dtype=torch.float64,
                          clip_denoised=clip, **kw)
            got = model.sample(2, generator=gen(), sampler=sampler, **kw)
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert not torch.allclose(model.sample(2, generator=gen()), ancestral_sample(
        model.diffusion, model.net, shape, generator=gen(), dtype=torch.float64, clip_denoised=True))


def test_the_vlb_loss_trains_mean_and_variance_through_one_network_pass():
    """loss='vlb': the gradient w.r.t. the whole network output is T dL_t/d(output) / (D ln 2), and the network
    runs once per call (the bound reuses the training pass's output)."""
    T, x = 10, digits(3)
    model = ddpm(timesteps=T, loss="vlb")
    model.net = FixedOutput((3, 2, 8, 8)).double()
    calls = []
    model.net.register_forward_hook(lambda *args: calls.append(1))
    terms = seeded_losses(model, x, seed=4)
    assert len(calls) == 1
    terms.loss.sum().backward()
    t, _, noise = seeded_draws(model, x, seed=4)
    out = model.net.out.detach().clone().requires_grad_()
    d = model.diffusion
    l_t, _ = d.vlb_terms(model.net, x, d.q_sample(x, t, noise), t, model_output=out)
    (T * l_t / (D * math.log(2))).sum().backward()
    assert out.grad[:, :1].abs().max() > 0 and out.grad[:, 1:].abs().max() > 0
    torch.testing.assert_close(model.net.out.grad, out.grad, rtol=1e-9, atol=1e-15)


def test_importance_sampling_records_each_training_terms_loss():
    """With timestep_sampler='importance', every training call records L_t of each drawn t (N&D sec. 3.3), so the
    history fills up and the sampler switches from uniform to importance sampling."""
    model = ddpm(timesteps=4, loss="vlb", timestep_sampler="importance")
    x = digits(8)
    for seed in range(40):
        seeded_losses(model, x, seed)
    d = model.diffusion
    assert int(d.loss_history_count.sum()) == min(4 * 10, 40 * 8) and bool((d.loss_history_count == 10).all())
    assert bool((d.loss_history > 0).all())


@pytest.mark.parametrize("kind, kw", [("8bit", dict(loss="hybrid")), ("8bit", dict(loss="simple", var_type="fixed_large")),
                                      ("continuous", dict(loss="vlb", var_type="fixed_small"))])
def test_a_ddpm_on_the_cpu_computes_on_the_cpu_whatever_the_default_device(kind, kw,
                                                                           on_the_cpu_under_another_default_device):
    # every step, term and sample, with the CPU and then "meta" (for a GPU) as the default device (conftest.py)
    model = DDPM(DDPMConfig(data_kind=kind, net="micro", timesteps=5, **kw), (1, 8, 8)).double()
    x = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(1)).double() / 127.5 - 1
    rows = torch.arange(len(x))  # made here: the trainer hands the global batch's rows in from the CPU

    def everything():
        bound = model.bound(x, generator=torch.Generator().manual_seed(0))
        with draws.global_batch(3, rows, len(x)):
            loss = model.losses(x, step=0).loss
        trajectory = model.trajectory_log_weight(x, generator=torch.Generator().manual_seed(4))
        return {"nll": bound.nll, "prior": model.diffusion.prior_kl(x), "loss": loss, "trajectory": trajectory,
                **{sampler: model.sample(2, generator=torch.Generator().manual_seed(2), sampler=sampler,
                                        steps=steps) for sampler, steps in (("ancestral", None), ("ddim", 3))}}

    on_the_cpu_under_another_default_device(everything)


@pytest.mark.parametrize("loss", ["vlb", "hybrid", "simple"])
def test_a_float32_ddpm_keeps_its_training_terms_and_loss_in_float32(loss):
    # the schedule's buffers are float64 (for the bound's precision), but what a training step computes comes back
    # in the data's dtype: a float64 term would turn the loss, and its backward pass, into float64 arithmetic
    model = DDPM(DDPMConfig(data_kind="8bit", net="micro", timesteps=5, loss=loss,
                            var_type="fixed_large" if loss == "simple" else "learned"), (1, 8, 8))
    x = torch.randint(0, 256, (3, 1, 8, 8), generator=torch.Generator().manual_seed(1)).float() / 127.5 - 1
    with draws.global_batch(0, torch.arange(len(x)), len(x)):
        trained = model.losses(x, step=0)
    with draws.global_batch(0, torch.arange(len(x)), len(x)):
        estimate = model.bound_estimate(x)
    dtypes = {f"{name}/{k}": v.dtype for name, terms in (("losses", trained), ("bound_estimate", estimate))
              for k, v in {**terms.terms, "loss": terms.loss, **terms.extras}.items()}
    assert set(dtypes.values()) == {torch.float32}, dtypes
    assert model.diffusion.prior_kl(x).dtype == torch.float32
