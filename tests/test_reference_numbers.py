"""Stored reference numbers: for fixed seeds and tiny models, the training losses, the bound's terms, IWAE
estimates and a few sampled values of every model variant, compared with ``reference_numbers.json``.

Like diffusers' scheduler tests, these make a silent change in any number fail loudly. The closed-form tests say
*what* the numbers must be; these say that they did not move. When a change is meant to move them (a new default,
a fix), regenerate the file and say why in the commit:

    ELBOX_REGENERATE_REFERENCE=1 python -m pytest tests/test_reference_numbers.py

Everything runs in float64 on the CPU, so the numbers do not depend on the processor's vector width.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from elbox import draws
from elbox.data import load_dataset, to_model
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.vae import VAE, VAEConfig

REFERENCE = Path(__file__).with_name("reference_numbers.json")
REGENERATE = bool(os.environ.get("ELBOX_REGENERATE_REFERENCE"))

DDPM_VARIANTS = {
    "hybrid-learned-eps": dict(),
    "simple-fixed_large-eps": dict(loss="simple", var_type="fixed_large"),
    "vlb-fixed_small-x0-cosine": dict(loss="vlb", var_type="fixed_small", mean_type="x0", schedule="cosine"),
    "vlb-learned-v-importance": dict(loss="vlb", mean_type="v", timestep_sampler="importance"),
}
VAE_VARIANTS = {
    "mlp-bernoulli": dict(hidden=(16,), latent_dim=3),
    "conv-discretized-logistic": dict(arch="conv", conv_channels=(4, 8), latent_dim=3,
                                      decoder="discretized-logistic"),
    "mlp-discretized-gaussian-ar": dict(hidden=(16,), latent_dim=3, decoder="discretized-gaussian", ar_kernel=3,
                                        ar_channels=4),
    "mlp-gaussian-learned": dict(hidden=(16,), latent_dim=3, decoder="gaussian", sigma_mode="learned",
                                 decoder_sigma=0.3, activation="silu"),
}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Seeded weights, nudged so that zero-initialised last layers do not hide anything."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.double().eval()


def _digits(n: int, data_range: str) -> torch.Tensor:
    return to_model(load_dataset("digits", "test").data[:n], data_range,
                    generator=torch.Generator().manual_seed(0)).double()


def _losses(model, x: torch.Tensor, step: int = 3) -> dict[str, list[float]]:
    with draws.global_batch(7, torch.arange(len(x)), len(x)):
        terms = model.losses(x, step=step)
    out = {f"losses/{k}": v.detach() for k, v in terms.totals().items()}
    out["losses/loss"] = terms.loss.detach()
    return out


def ddpm_numbers(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = _perturbed(DDPM(DDPMConfig(data_kind="8bit", net="micro", timesteps=10, **DDPM_VARIANTS[name]), (1, 8, 8)))
    x = _digits(3, "symmetric")
    if model.config.timestep_sampler == "importance":  # a full loss history, so importance sampling is used
        for t in range(10):
            model.diffusion.update_loss_history(torch.full((10,), t), torch.arange(10, dtype=torch.float64) + t)
    out = _losses(model, x)
    bound = model.bound(x, generator=torch.Generator().manual_seed(0))
    out.update({f"bound/{k}": v for k, v in bound.totals().items()})
    out["bound/kl-per-step"] = bound.terms["kl"].mean(0)
    gen = torch.Generator().manual_seed(0)
    out["sample/ancestral"] = model.sample(2, generator=gen).flatten()[::7]
    out["sample/ddim-eta0.5-4steps"] = model.sample(2, generator=gen, sampler="ddim", steps=4, eta=0.5).flatten()[::7]
    return out


def vae_numbers(name: str) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = _perturbed(VAE(VAEConfig(**VAE_VARIANTS[name]), (1, 8, 8)))
    x = _digits(3, model.data_range)
    out = _losses(model, x)
    out["iwae/k=7"] = model.iwae_bound(x, 7, chunk=3, generator=torch.Generator().manual_seed(0)).detach()
    bound = model.bound(x, generator=torch.Generator().manual_seed(0))
    out.update({f"bound/{k}": v.detach() for k, v in bound.totals().items()})
    gen = torch.Generator().manual_seed(0)
    out["sample/prior"] = model.sample(2, generator=gen).flatten()[::7]
    out["reconstruct"] = model.reconstruct(x).flatten()[::11]
    return out


CASES = {f"ddpm/{n}": (ddpm_numbers, n) for n in DDPM_VARIANTS} | {f"vae/{n}": (vae_numbers, n) for n in VAE_VARIANTS}


@pytest.fixture(scope="module")
def reference():
    stored = json.loads(REFERENCE.read_text()) if REFERENCE.is_file() else {}
    yield stored
    if REGENERATE:
        REFERENCE.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")


@pytest.mark.parametrize("case", list(CASES))
def test_numbers_match_the_stored_reference(case, reference):
    fn, name = CASES[case]
    numbers = {k: [float(x) for x in v.reshape(-1)] for k, v in fn(name).items()}
    if REGENERATE:
        reference[case] = numbers
        return
    assert case in reference, f"no stored numbers for {case}; regenerate (see this file's docstring)"
    assert set(numbers) == set(reference[case])
    for key, values in numbers.items():
        assert values == pytest.approx(reference[case][key], rel=1e-7, abs=1e-9), f"{case} {key}"
