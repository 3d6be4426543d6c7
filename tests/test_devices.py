"""A seed means the same numbers on every device: sampling with a CPU ``torch.Generator`` gives the same samples
whether the model sits on the CPU or on a GPU (up to float rounding).

These tests need a CUDA GPU and are skipped without one (so in CI); ``benchmarks/gpu_check.py`` runs the test
suite on the lent GPU. On the CPU, ``test_seeded_draws_repeat_at_any_precision_...`` covers the helpers.
"""

import pytest
import torch

from elbox.draws import rand_from, randn_from
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.decoders import DECODERS
from elbox.objectives.vae import VAE, VAEConfig

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def exact_fp32():
    """TF32 off, so the GPU computes in true float32 like the CPU."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_seeded_draws_repeat_at_any_precision_and_leave_the_global_rng_alone():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = randn_from(torch.Generator().manual_seed(1), (3, 4), "cpu", torch.float64)
    b = randn_from(torch.Generator().manual_seed(1), (3, 4), "cpu", torch.float32)
    u = rand_from(torch.Generator().manual_seed(1), (1000,), "cpu")
    assert torch.equal(a, b.double()) and a.dtype == torch.float64 and a.shape == (3, 4)  # any precision: same draws
    assert 0 <= u.min() and u.max() < 1
    assert torch.equal(torch.get_rng_state(), before)


@cuda
@pytest.mark.parametrize("decoder", sorted(DECODERS))
def test_vae_samples_are_the_same_on_cpu_and_gpu(decoder, exact_fp32):
    torch.manual_seed(0)
    vae = VAE(VAEConfig(decoder=decoder, arch="mlp", hidden=(64,), latent_dim=4), (1, 8, 8))
    cpu = vae.sample(16, generator=torch.Generator().manual_seed(3))
    gpu = vae.cuda().sample(16, generator=torch.Generator().manual_seed(3))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)


@cuda
@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
def test_ddpm_samples_and_bound_are_the_same_on_cpu_and_gpu(sampler, exact_fp32):
    torch.manual_seed(0)
    ddpm = DDPM(DDPMConfig(data_kind="8bit", net="micro", timesteps=50), (1, 8, 8))
    for p in ddpm.parameters():  # a fresh U-Net's zero-initialised output layer would hide differences
        p.data.add_(0.05 * torch.randn_like(p))
    x = torch.round(torch.rand(8, 1, 8, 8) * 255) / 127.5 - 1
    cpu_s = ddpm.sample(8, sampler=sampler, generator=torch.Generator().manual_seed(1))
    cpu_b = ddpm.bound(x, generator=torch.Generator().manual_seed(2)).nll
    ddpm.cuda()
    gpu_s = ddpm.sample(8, sampler=sampler, generator=torch.Generator().manual_seed(1))
    gpu_b = ddpm.bound(x.cuda(), generator=torch.Generator().manual_seed(2)).nll
    torch.testing.assert_close(gpu_s.cpu(), cpu_s, rtol=0, atol=1e-4)
    torch.testing.assert_close(gpu_b.cpu(), cpu_b, rtol=1e-5, atol=0)


@cuda
def test_a_checkpoint_carries_the_gpus_generator_state_and_a_cpu_runs_carries_none():
    """Training on a GPU, the checkpoint's generator states include that GPU's (dropout and the timesteps are drawn
    there), and restoring them replays its draws; a CPU run's states have only torch's own."""
    from elbox.checkpoint import restore_rng_states, rng_states

    device = torch.device("cuda")
    torch.cuda.manual_seed(3)
    states = rng_states(device)
    assert set(states) == {"torch", "cuda"}
    assert torch.equal(states["cuda"], torch.cuda.get_rng_state(device))
    first = torch.randn(8, device=device)
    restore_rng_states(states, device)
    assert torch.equal(torch.randn(8, device=device), first)
    assert set(rng_states(torch.device("cpu"))) == {"torch"}
