"""The bound's terms only where a metrics line reads them (issue 13: "the bound's extra terms computed only when
logged"). A DDPM trained on the simple loss reports the bound's single-t estimate beside its loss but does not train
on it: the trainer asks for it (``objectives.base.loss_only`` left closed) only at the steps that write a metrics
line. Training itself must not change: the same weights bit for bit and the same metrics lines as a run that
computes the bound at every step."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch
from test_train import flaky_run, metrics, tensors

from elbox.config import DataConfig, RunConfig, TrainConfig
from elbox.objectives.ddpm import DDPMConfig
from elbox.objectives.diffusion import GaussianDiffusion
from elbox.objectives.latent import LDMConfig
from elbox.objectives.terms import Terms
from elbox.objectives.vae import VAE, VAEConfig
from elbox.training import loop
from elbox.training.loop import train


def bound_terms_per_step(monkeypatch) -> tuple[dict[int, int], dict[int, bool]]:
    """How many times each step (counted from 1) computed a diffusion term L_t (``vlb_terms``), and whether the
    terms it handed the trainer hold the bound."""
    calls: dict[int, int] = {}
    has_bound: dict[int, bool] = {}
    current = [0]
    real_step, real_vlb = loop.train_step, GaussianDiffusion.vlb_terms

    def train_step(step, *args, **kwargs):
        current[0] = step + 1
        calls[step + 1] = 0
        done = real_step(step, *args, **kwargs)
        has_bound[step + 1] = all(terms.has_bound for terms in done.terms)
        return done

    def vlb_terms(self, *args, **kwargs):
        calls[current[0]] += 1
        return real_vlb(self, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", train_step)
    monkeypatch.setattr(GaussianDiffusion, "vlb_terms", vlb_terms)
    return calls, has_bound


def always_the_bound(monkeypatch) -> None:
    """The trainer as it was: the bound's terms at every step."""
    monkeypatch.setattr(loop, "loss_only", contextlib.nullcontext)


def run_config(model: str, model_config, **train) -> RunConfig:
    return RunConfig(model=model, model_config=model_config, data=DataConfig(),
                     train=TrainConfig(batch_size=16, num_samples=4, final_eval_examples=0, quiet=True,
                                       sample_every=0, **train))


def without_speed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]


@pytest.mark.parametrize("loss,var_type,computed", [
    ("simple", "fixed_large", {3, 6, 7}),  # the metrics lines' steps: every 3rd and the last
    ("hybrid", "learned", set(range(1, 8))),  # its loss is partly the bound: every step
    ("vlb", "learned", set(range(1, 8))),
], ids=["simple", "hybrid", "vlb"])
def test_the_bound_is_computed_at_logged_steps_when_the_loss_does_not_need_it(monkeypatch, tmp_path, loss, var_type,
                                                                             computed):
    model_config = DDPMConfig(net="micro", timesteps=20, loss=loss, var_type=var_type)
    cfg = run_config("ddpm", model_config, steps=7, log_every=3, checkpoint_every=10, grad_accum=2)
    runs = {}
    for mode in ("every step", "when logged"):
        if mode == "every step":
            always_the_bound(monkeypatch)
        calls, has_bound = bound_terms_per_step(monkeypatch)
        train(cfg, tmp_path / mode)
        runs[mode] = calls, has_bound
        monkeypatch.undo()
    assert runs["every step"] == ({s: 2 for s in range(1, 8)}, {s: True for s in range(1, 8)})  # 2 micro-batches
    assert runs["when logged"] == ({s: 2 if s in computed else 0 for s in range(1, 8)},
                                   {s: s in computed for s in range(1, 8)})
    # training is the same, and so is what it says
    rows = [without_speed(metrics(tmp_path / mode)) for mode in ("every step", "when logged")]
    assert rows[0] == rows[1] and [r["step"] for r in rows[1]] == [3, 6, 7]
    assert all({"bpd", "nelbo", "steps", "prior", "mse", "loss"} <= r.keys() for r in rows[1])
    for name in ("model", "ema", "optimizer"):
        a, b = tensors(tmp_path / "every step", 7, name), tensors(tmp_path / "when logged", 7, name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.parametrize("end_to_end,per_step", [(False, {1: 0, 2: 1, 3: 0, 4: 1}),
                                                 (True, {s: 1 for s in range(1, 5)})], ids=["two-stage", "end-to-end"])
def test_latent_diffusion_with_a_simple_loss_prior(monkeypatch, tmp_path, end_to_end, per_step):
    """Two stages: the prior's bound only at logged steps, and then the whole one (the VAE's half alone is none).
    End to end: the bound the loss needs is ``bound_estimate``'s, so the prior's own losses never compute theirs
    (they were dropped: one L_t a step, not two)."""
    vae = tmp_path / "vae"
    train(run_config("vae", VAEConfig(hidden=(16,), latent_dim=3), steps=2), vae)
    cfg = run_config("ldm", LDMConfig(vae=str(vae), timesteps=10, end_to_end=end_to_end, loss="simple",
                                      var_type="fixed_large"), steps=4, log_every=2, checkpoint_every=10)
    for mode in ("every step", "when logged"):
        if mode == "every step":
            always_the_bound(monkeypatch)
        calls, has_bound = bound_terms_per_step(monkeypatch)
        decoded = []  # the VAE's half of the bound: a decoder pass
        real_decoder = VAE.log_px_given_z
        monkeypatch.setattr(VAE, "log_px_given_z",
                            lambda self, *a, **k: decoded.append(1) or real_decoder(self, *a, **k))
        train(cfg, tmp_path / mode)
        if mode == "when logged":
            assert calls == per_step
            assert has_bound == {s: end_to_end or s % 2 == 0 for s in range(1, 5)}  # the whole bound, or none
            assert len(decoded) == sum(per_step.values())  # the VAE's half only with the prior's
        monkeypatch.undo()
    rows = [without_speed(metrics(tmp_path / mode)) for mode in ("every step", "when logged")]
    assert rows[0] == rows[1] and [r["step"] for r in rows[1]] == [2, 4]
    assert all({"bpd", "prior/steps", "prior/prior", "prior/mse"} <= r.keys() for r in rows[1])
    a, b = tensors(tmp_path / "every step", 4, "model"), tensors(tmp_path / "when logged", 4, "model")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_nonfinite_loss_between_logged_steps_is_still_caught_and_logged_without_a_bound(monkeypatch, tmp_path):
    """The NaN/Inf check reads the loss (and the bound where it is there): an Inf loss at an unlogged step of a
    simple-loss run is skipped and written down with what the step computed."""
    cfg, run = flaky_run(monkeypatch, tmp_path, {2: "loss"}, steps=5, on_nonfinite="skip")
    cfg = dataclasses.replace(cfg, model_config=DDPMConfig(net="micro", timesteps=20, loss="simple",
                                                           var_type="fixed_large"),
                              train=dataclasses.replace(cfg.train, log_every=4, checkpoint_every=10))
    result = train(cfg, run)
    assert result.skipped == 1
    rows = without_speed(metrics(run))
    assert [r["step"] for r in rows] == [3, 4, 5]
    assert rows[0]["nonfinite"] == "the loss" and rows[0]["loss"] is None and "bpd" not in rows[0]
    assert "bpd" in rows[1] and "bpd" in rows[2]


def test_terms_of_a_loss_alone():
    loss = torch.tensor([1.0, 3.0])
    terms = Terms(terms={}, dims=4, loss=loss, extras={"mse": loss}, loss_unit="mean squared error per dimension")
    assert not terms.has_bound and terms.batch_size == 2
    assert terms.summary() == {"loss": 2.0, "mse": 2.0}
    assert Terms.cat([terms, terms]).summary() == {"loss": 2.0, "mse": 2.0}
    with pytest.raises(ValueError, match="loss only"):
        terms.nll
    with pytest.raises(ValueError, match="at least one named term"):
        Terms(terms={}, dims=4)
    assert Terms(terms={"kl": loss}, dims=4).has_bound
