"""End-to-end latent diffusion (``LDMConfig.end_to_end``): the VAE trained on the whole bound, with the DDPM prior's
cross-entropy term E_q(z|x)[L_DDPM(s z)] sending its gradient to the encoder (LSGM, Vahdat et al. 2021), while the
prior trains on its own loss. Checked: the prior's single-t bound estimate and its gradient in z against the full
sum over t (Monte Carlo); the split of the gradient between the VAE and the prior; a bound that tightens when an
inexact encoder is trained through it; the CLI."""

import math

import pytest
import torch
from test_latent import ExactGaussianDenoiser, exact_posterior_linear_gaussian, mean_bound

from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.latent import LDM, LDMConfig
from elbox.objectives.vae import VAE, VAEConfig


def random_prior(timesteps: int = 6) -> DDPM:
    """A continuous DDPM over 2-D vectors whose network is far from its (zero) initialisation, so its output
    depends on x_t and a gradient that skipped the network would be seen."""
    torch.manual_seed(0)
    prior = DDPM(DDPMConfig(timesteps=timesteps, net="mlp", data_kind="continuous"), (2,)).double()
    with torch.no_grad():
        for p in prior.net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return prior


def full_sum(prior: DDPM, x: torch.Tensor) -> torch.Tensor:
    """sum over every t of L_t (one x_t ~ q(x_t|x_0) each) + L_T, differentiable in x: Ho et al. eq. 5."""
    d = prior.diffusion
    total = d.prior_kl(x)
    for i in range(d.num_timesteps):
        t = torch.full((x.shape[0],), i, dtype=torch.long)
        total = total + d.vlb_terms(prior.net, x, d.q_sample(x, t, torch.randn_like(x)), t)[0]
    return total


def test_the_priors_bound_estimate_and_its_gradient_in_x_are_unbiased_and_leave_the_network_alone():
    """E[weight L_t + L_T] = the bound (DDPM.bound), and E[its gradient in x] = the gradient of the full sum, per
    example (x repeated; each copy's gradient is one draw); the network's weights get no gradient from it."""
    prior = random_prior()
    x = torch.tensor([[0.5, -1.0], [1.5, 0.2], [-0.7, 0.9]], dtype=torch.float64)
    n = 20_000
    torch.manual_seed(1)
    copies = x.repeat(n, 1).requires_grad_()
    estimate = prior.bound_estimate(copies)
    assert set(estimate.terms) == {"steps", "prior"}
    estimate.nll.sum().backward()
    assert all(p.grad is None for p in prior.net.parameters())
    value, grad = estimate.nll.detach().view(n, 3), copies.grad.view(n, 3, 2)
    exact = prior.bound(x.repeat(2000, 1), generator=torch.Generator().manual_seed(2)).nll.view(2000, 3)
    se = torch.sqrt(value.var(0) / n + exact.var(0) / 2000)
    assert torch.all((value.mean(0) - exact.mean(0)).abs() < 5 * se), (value.mean(0) - exact.mean(0), se)

    m = 4000
    copies = x.repeat(m, 1).requires_grad_()
    full_sum(prior, copies).sum().backward()
    full = copies.grad.view(m, 3, 2)
    se = torch.sqrt(grad.var(0) / n + full.var(0) / m)
    assert torch.all((grad.mean(0) - full.mean(0)).abs() < 5 * se), (grad.mean(0) - full.mean(0), se)
    assert torch.all(full.mean(0).norm(dim=1) > 10 * se.norm(dim=1))  # a gradient the test can see, not noise


def test_the_bound_estimate_runs_the_denoiser_without_dropout_as_the_bound_does():
    """In training mode too: the VAE follows the gradient of the bound that is evaluated (dropout off), and the
    network is left in the mode it was in."""
    torch.manual_seed(0)
    prior = DDPM(DDPMConfig(timesteps=4, net="micro", dropout=0.5, data_kind="continuous"), (1, 8, 8))
    with torch.no_grad():
        for p in prior.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 1, 8, 8)
    values = []
    for training in (True, False):
        prior.train(training)
        torch.manual_seed(3)
        values.append(prior.bound_estimate(x).nll)
        assert prior.net.training is training
    torch.testing.assert_close(values[0], values[1], rtol=0, atol=0)


def end_to_end(vae: VAE, scale: float = 0.5, timesteps: int = 10, **options) -> LDM:
    return LDM(LDMConfig(timesteps=timesteps, latent_scale=scale, end_to_end=True, **options), vae.data_shape, vae=vae)


def test_end_to_end_the_vae_trains_on_the_bound_and_the_prior_on_its_own_loss():
    """The terms are the bound's single-draw estimate at one z ~ q(z|x); the loss adds it, in bits/dim, to the
    prior's loss on the same z detached. Its gradient: the prior's weights exactly that of the prior's loss alone;
    every weight of the VAE a gradient (in the two-stage model, none)."""
    torch.manual_seed(0)
    vae = VAE(VAEConfig(hidden=(16,), latent_dim=4, decoder="gaussian"), (6,))
    model = end_to_end(vae)
    assert all(p.requires_grad for p in model.vae.parameters())
    with torch.no_grad():  # away from the zero-initialised output layer, so the prior's loss depends on z
        for p in model.prior.parameters():
            p.add_(0.02 * torch.randn_like(p))
    x = torch.randn(32, 6)
    torch.manual_seed(1)
    terms = model.losses(x, step=0)
    terms.loss.mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vae.parameters())
    vae_grads = {name: p.grad.clone() for name, p in model.vae.named_parameters()}

    torch.manual_seed(1)  # the same draws again, by hand: z, then the prior's loss, then the bound's estimate
    z, logvar = model._encode(x, None)
    prior = model.prior.losses((z * 0.5).detach(), step=0)
    estimate = model.prior.bound_estimate(z * 0.5)
    nll = (-vae.log_px_given_z(x, z) - 0.5 * (1 + math.log(2 * math.pi) + logvar).sum(1) - 4 * math.log(0.5)
           + estimate.nll)
    torch.testing.assert_close(terms.nll, nll)
    torch.testing.assert_close(terms.loss, prior.loss + nll / (6 * math.log(2)))
    assert set(terms.terms) == {"decoder_nll", "neg_entropy", "log_scale", "prior/steps", "prior/prior"}
    assert set(terms.extras) == {"prior/mse"} and "bits/dim" in terms.loss_unit
    grads = {name: p.grad.clone() for name, p in model.prior.named_parameters()}
    model.zero_grad()
    (prior.loss.mean() + (nll / (6 * math.log(2))).mean()).backward(retain_graph=True)
    for name, p in model.named_parameters():  # the VAE: the bound's gradient only; the prior: its loss's only
        torch.testing.assert_close(p.grad, vae_grads[name[4:]] if name.startswith("vae.") else grads[name[6:]],
                                   msg=name)
    model.zero_grad()
    prior.loss.mean().backward()
    assert all(p.grad is None or not p.grad.any() for p in model.vae.parameters())

    model.train()
    assert model.vae.training  # the VAE follows the trainer's mode end to end (frozen, it stays in eval)
    frozen = LDM(LDMConfig(timesteps=10, latent_scale=0.5), (6,), vae=VAE(VAEConfig(hidden=(16,), latent_dim=4), (6,)))
    assert not any(p.requires_grad for p in frozen.vae.parameters())


def test_evaluating_an_end_to_end_model_builds_no_autograd_graph():
    """bound() and iwae_bound() of an end-to-end model (the VAE's weights trainable) record nothing for autograd:
    not in the encoder, the decoder or any term."""
    torch.manual_seed(0)
    model = end_to_end(VAE(VAEConfig(hidden=(8,), latent_dim=3, decoder="gaussian"), (5,)), timesteps=4)
    outputs = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: outputs.append(out)) for m in (model.vae.encoder,
                                                                                          model.vae.decoder)]
    x = torch.randn(3, 5)
    terms = model.bound(x, generator=torch.Generator().manual_seed(0))
    estimate = model.iwae_bound(x, 2, generator=torch.Generator().manual_seed(0))
    for h in hooks:
        h.remove()
    flat = [t for out in outputs for t in (out if isinstance(out, tuple) else (out,))]
    assert len(flat) >= 4 and not any(t.requires_grad for t in flat)
    assert not any(v.requires_grad for v in terms.terms.values()) and not estimate.requires_grad
    with torch.enable_grad():  # while training: the graph is there
        assert model.losses(x, step=0).terms["decoder_nll"].requires_grad


def test_training_an_inexact_encoder_end_to_end_tightens_the_bound_to_the_true_nll():
    """An exact decoder and an exact DDPM prior for N(0, I) latents; the encoder's mean shifted by 0.5 and its
    variance inflated 2x, so the bound is loose. Adam on the encoder alone, through the end-to-end loss (so the
    prior's term is the only pull towards N(0, I)), brings the bound back to -log p(x)."""
    vae, p_x = exact_posterior_linear_gaussian(sigma=1.5)  # a wide decoder: the prior's pull matters
    with torch.no_grad():
        vae.encoder.net[0].bias[:2] += 0.5
        vae.encoder.net[0].bias[2:] += math.log(2.0)
    model = end_to_end(vae, scale=1.0, timesteps=20, schedule="cosine", net="mlp").double()
    model.prior.net = ExactGaussianDenoiser(model.prior.diffusion, v=1.0)
    x_test = p_x.sample((6,))
    before, _ = mean_bound(model.eval(), x_test)
    gap_before = before + p_x.log_prob(x_test)
    assert torch.all(gap_before > 0.3)

    opt = torch.optim.Adam(vae.encoder.parameters(), lr=0.02)
    model.train()
    torch.manual_seed(0)
    for step in range(300):
        opt.zero_grad()
        model.losses(p_x.sample((256,)), step=step).loss.mean().backward()
        opt.step()
    after, se = mean_bound(model.eval(), x_test)
    gap_after = after + p_x.log_prob(x_test)
    assert torch.all(gap_after.abs() < 0.05 + 5 * se), (gap_before, gap_after, se)


@pytest.fixture(scope="session")
def vae_run(tmp_path_factory):
    from elbox.cli import main

    run = tmp_path_factory.mktemp("e2e") / "vae"
    assert main(["train", "vae", "--out", str(run), "--hidden", "16", "--latent-dim", "3", "--steps", "2",
                 "--batch-size", "16", "--final-eval-examples", "0", "--num-samples", "4", "--quiet",
                 "--device", "cpu"]) == 0
    return run


@pytest.mark.parametrize("flag", ["--end-to-end", "--no-end-to-end"])
def test_elbox_train_ldm_end_to_end_changes_the_vae_and_two_stages_keep_it(vae_run, tmp_path, flag):
    import elbox
    from elbox import checkpoint as ckpt
    from elbox.cli import main

    run = tmp_path / "ldm"
    assert main(["train", "ldm", "--vae", str(vae_run), "--out", str(run), flag, "--timesteps", "4", "--steps", "3",
                 "--batch-size", "16", "--final-eval-examples", "8", "--num-samples", "4", "--quiet", "--device",
                 "cpu", "--ema-decay", "0"]) == 0
    model = elbox.load(run)
    assert model.config.end_to_end is (flag == "--end-to-end")
    first = ckpt.load_checkpoint(vae_run, with_training_state=False).ema
    changed = [name for name, value in model.vae.state_dict().items() if not torch.equal(value, first[name])]
    if flag == "--end-to-end":
        assert changed == list(model.vae.state_dict())  # every weight of the VAE trained
    else:
        assert changed == []


@pytest.mark.parametrize("e2e", [False, True], ids=["two-stage", "end-to-end"])
def test_compile_reaches_the_networks_inside_the_vae_and_the_prior(e2e):
    """``--compile`` on latent diffusion compiles its parts' networks (the encoder, the decoder, the prior's
    denoiser; a part's own forward is never called), and the loss is the same, end to end as well (where the
    denoiser also runs on detached weights)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from elbox.compiling import compile_networks

    torch.manual_seed(0)
    model = LDM(LDMConfig(timesteps=4, latent_scale=1.0, end_to_end=e2e), (6,),
                vae=VAE(VAEConfig(hidden=(16,), latent_dim=3), (6,)))
    x = torch.rand(4, 6)
    torch.manual_seed(2)
    eager = model.losses(x, step=0).loss
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_networks(model, "aot_eager")
        torch.manual_seed(2)
        compiled = model.losses(x, step=0).loss
        compiled.mean().backward()
        assert counters["frames"]["ok"] >= 3, dict(counters["frames"])
        graphs = counters["stats"]["unique_graphs"]
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(1, 4):  # new weights each step: no recompilation (the detached copies included)
            opt.step()
            opt.zero_grad()
            model.losses(x, step=step).loss.mean().backward()
        assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])
    finally:
        torch._dynamo.reset()
        counters.clear()
    assert all(m._compiled_call_impl is not None for m in (model.vae.encoder, model.vae.decoder, model.prior.net))
    torch.testing.assert_close(compiled, eager)


def test_the_bound_estimate_is_one_steps_term_clipped_as_the_bound_clips_it():
    """On 8-bit images, where the bound clips the predicted x_0 to [-1, 1] (``clip_denoised``): the estimate, replayed
    from its seed, is exactly weight * L_t (clipped) + L_T at its draw of t and x_t, and it counts the image's
    dimensions (its bits/dim are per pixel). A network far from its initialisation, so that clipping changes L_t."""
    from elbox import draws

    torch.manual_seed(0)
    ddpm = DDPM(DDPMConfig(timesteps=20, net="micro", data_kind="8bit"), (1, 8, 8)).double()
    with torch.no_grad():
        for p in ddpm.net.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 256, (6, 1, 8, 8)).double() / 127.5 - 1
    torch.manual_seed(5)
    estimate = ddpm.bound_estimate(x)
    torch.manual_seed(5)
    d = ddpm.diffusion
    t, weight = d.sample_timesteps(6, x.device)
    x_t = d.q_sample(x, t, draws.randn_like(x))
    with torch.no_grad():
        clipped, unclipped = (d.vlb_terms(ddpm.net, x, x_t, t, clip_denoised=clip)[0] for clip in (True, False))
    assert not torch.allclose(clipped, unclipped)  # clipping matters at these draws
    assert torch.allclose(estimate.terms["steps"], weight * clipped)
    assert torch.allclose(estimate.terms["prior"], d.prior_kl(x))
    assert estimate.dims == 64 and torch.allclose(estimate.bpd, estimate.nll / (64 * math.log(2)))
