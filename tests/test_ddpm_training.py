"""The DDPM learns: a few optimizer steps on the embedded digits lower the loss; every term is in nats."""

import torch

from elbox.data import load_dataset, to_model
from elbox.objectives.ddpm import DDPM, DDPMConfig


def _train(config: DDPMConfig, steps: int = 60, model: DDPM | None = None) -> list[float]:
    torch.manual_seed(0)
    data = to_model(load_dataset("digits").data, "symmetric")
    model = model or DDPM(config, tuple(data.shape[1:]))
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(steps):
        x = data[torch.randint(0, len(data), (64,), generator=g)]
        terms = model.losses(x, step=step)
        assert set(terms.terms) == {"steps", "prior"} and terms.loss.shape == (64,)
        opt.zero_grad()
        loss = terms.loss.mean()
        loss.backward()
        opt.step()
        losses.append(loss.detach().item())
    return losses


def test_a_few_steps_of_the_simple_loss_lower_it():
    losses = _train(DDPMConfig(data_kind="8bit", net="micro", timesteps=100, loss="simple", var_type="fixed_large"))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_a_few_steps_of_the_hybrid_loss_lower_it_and_change_every_parameter():
    config = DDPMConfig(data_kind="8bit", net="micro", timesteps=100)
    model = DDPM(config, (1, 8, 8))
    before = {k: v.clone() for k, v in model.named_parameters()}
    losses = _train(config, model=model)
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10])
    unchanged = [k for k, v in model.named_parameters() if torch.equal(before[k], v)]
    assert not unchanged, unchanged  # the gradient reaches every parameter, the variance head included


def test_the_initial_weights_are_a_function_of_the_seed():
    config = DDPMConfig(data_kind="8bit", net="micro", timesteps=100)
    weights = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        weights.append(DDPM(config, (1, 8, 8)).state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_the_bound_is_in_nats_and_bits_per_dim_is_its_reduction():
    torch.manual_seed(0)
    model = DDPM(DDPMConfig(data_kind="8bit", net="micro", timesteps=10), (1, 8, 8))
    x = to_model(load_dataset("digits", "test").data[:4], "symmetric")
    terms = model.bound(x, generator=torch.Generator().manual_seed(0))
    assert terms.terms["kl"].shape == (4, 9) and terms.terms["decoder_nll"].shape == (4,)
    total = terms.terms["decoder_nll"] + terms.terms["kl"].sum(1) + terms.terms["prior"]
    assert torch.allclose(terms.nll, total)
    assert torch.allclose(terms.bpd, total / (64 * torch.log(torch.tensor(2.0))))
