"""Training a VAE on the importance-weighted bound (VAEConfig.iwae_k, the IWAE of Burda et al. 2016): its loss is
-L_k of k fresh draws per example, its gradient that of L_k, its terms still the ELBO's."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from elbox.cli import main
from elbox.errors import UserError
from elbox.objectives.vae import VAE, VAEConfig

SMALL = dict(latent_dim=3, hidden=(16,), conv_channels=(4,), arch="conv-mlp", ar_kernel=3, ar_channels=4)


def small_vae(k: int, **kwargs) -> tuple[VAE, torch.Tensor]:
    torch.manual_seed(0)
    vae = VAE(VAEConfig(**{**SMALL, **kwargs}, iwae_k=k), (1, 5, 5)).double()
    with torch.no_grad():  # the context's last layer starts at zero: give it weights, so that it matters
        vae.context.out.weight.normal_(0.0, 1.0)
    x = (torch.rand(6, 1, 5, 5) < 0.4).double()
    return vae, x


def by_hand(vae: VAE, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """-L_k from its definition (Burda et al. eq. 8), each density its own torch.distributions object:
    -log 1/k sum_i p(x|z_i) p(z_i) / q(z_i|x), z_i = mu + sigma eps_i, eps (B, k, D); and -mean_i log p(x|z_i)."""
    mu, logvar = vae.encode(x)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    prior = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    log_w, log_px = [], []
    for i in range(eps.shape[1]):
        z = mu + torch.exp(0.5 * logvar) * eps[:, i]
        log_px.append(vae.log_px_given_z(x, z))
        log_w.append(log_px[-1] + prior.log_prob(z).sum(1) - q.log_prob(z).sum(1))
    return -(torch.logsumexp(torch.stack(log_w), dim=0) - math.log(eps.shape[1])), -torch.stack(log_px).mean(0)


@pytest.mark.parametrize("cond", [False, True])
def test_the_iwae_loss_is_minus_the_log_mean_weight_of_k_fresh_draws_and_has_its_gradient(cond):
    k = 5
    vae, x = small_vae(k, ar_cond=cond)
    torch.manual_seed(7)
    terms = vae.losses(x, step=0)
    torch.manual_seed(7)  # outside a trainer the draws come from the global RNG, (B, k, D) at once
    expected, decoder_nll = by_hand(vae, x, torch.randn(x.shape[0], k, 3, dtype=torch.float64))
    torch.testing.assert_close(terms.loss, expected, rtol=0, atol=1e-10)
    # the gradient is that of L_k, the encoder's too (through the reparameterised z and the log-ratio)
    params = list(vae.parameters())
    got = torch.autograd.grad(terms.loss.sum(), params)
    want = torch.autograd.grad(expected.sum(), params)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
    # the terms stay the ELBO's: decoder_nll averaged over the same k draws, the closed-form KL (K&W appendix B)
    assert set(terms.terms) == {"decoder_nll", "kl"} and terms.loss_unit == "nats"
    torch.testing.assert_close(terms.terms["decoder_nll"], decoder_nll, rtol=0, atol=1e-10)
    mu, logvar = vae.encode(x)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(mu, torch.exp(0.5 * logvar)),
                                           torch.distributions.Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(terms.terms["kl"], kl, rtol=0, atol=1e-10)


def test_the_iwae_loss_tightens_with_k_and_equals_the_elbo_loss_at_k_1():
    vae, x = small_vae(1)
    torch.manual_seed(3)
    elbo = vae.losses(x, step=0)
    torch.testing.assert_close(elbo.loss, elbo.nll)
    means = []
    for k in (1, 4, 64):
        vae.config = dataclasses.replace(vae.config, iwae_k=k)
        torch.manual_seed(3)
        with torch.no_grad():
            means.append(torch.stack([vae.losses(x, step=0).loss.mean() for _ in range(200)]).mean().item())
    # E[L_k] rises with k (Burda et al. theorem 1): the loss falls; at k = 1 it is the negative ELBO. The gaps
    # (0.18 and 0.10 nats here) are over five standard errors of these means (0.015, 0.013, 0.003)
    assert means[0] > means[1] + 0.07 and means[1] > means[2] + 0.07, means


@pytest.mark.parametrize("kwargs, match", [
    (dict(iwae_k=0), "iwae_k=0 is not allowed"),
    (dict(iwae_k=4, beta=0.5), "has no KL weight"),
    (dict(iwae_k=4, kl_warmup_steps=10), "has no KL weight"),
])
def test_bad_iwae_settings_are_user_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        VAEConfig(**kwargs)


def test_the_cli_trains_on_the_iwae_bound(tmp_path, capsys):
    tiny = ["train", "vae", "--hidden", "32", "--latent-dim", "2", "--steps", "20", "--batch-size", "32", "--log-every",
            "10", "--sample-every", "0", "--final-eval-examples", "16", "--quiet", "--seed", "0"]
    assert main([*tiny, "--iwae-k", "8", "--out", str(tmp_path / "iwae")]) == 0
    assert main([*tiny, "--out", str(tmp_path / "elbo")]) == 0
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("iwae", "elbo")}
    assert "iwae_k = 8" in (tmp_path / "iwae" / "config.toml").read_text()
    # the ELBO run trains on the negative ELBO it logs; the IWAE run on -L_8, below it (tighter) at every log
    assert rows["elbo"] and all(r["loss"] == pytest.approx(r["nelbo"], rel=1e-6) for r in rows["elbo"])
    assert rows["iwae"] and all(r["loss"] < r["nelbo"] - 0.05 for r in rows["iwae"]), rows["iwae"]
    capsys.readouterr()
    assert main([*tiny, "--iwae-k", "8", "--beta", "0.5", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "iwae_k=8" in err[0] and "beta=1" in err[0], err
    assert not (tmp_path / "bad").exists()
