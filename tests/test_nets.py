"""Networks: the DDPM U-Net (Ho et al. 2020, appendix B), the MLP denoiser and the timestep embedding."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from elbox.errors import UserError
from elbox.nets import unet
from elbox.nets.embeddings import timestep_embedding
from elbox.nets.mlp import MLPDenoiser
from elbox.nets.unet import UNET_PRESETS, Dropout, UNet, group_norm


def randomise_zero_init(model: nn.Module, std: float = 0.05) -> nn.Module:
    """Give the zero-initialised weight matrices random values, so the output (and gradients) depend on every layer."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(0.0, std)
    return model


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- the timestep embedding ----------------------------------------------------------------------------------


def test_timestep_embedding_matches_the_transformer_formula() -> None:
    t = torch.tensor([0, 1, 999])
    emb = timestep_embedding(t, 8)
    assert emb.shape == (3, 8) and emb.dtype == torch.float32
    # sin(t w_i) then cos(t w_i), w_i = 10000^(-i/4)
    for i in range(4):
        w = 10000.0 ** (-i / 4)
        assert emb[2, i].item() == pytest.approx(math.sin(999 * w), abs=1e-4)
        assert emb[2, 4 + i].item() == pytest.approx(math.cos(999 * w), abs=1e-4)
    assert torch.equal(emb[0], torch.tensor([0.0] * 4 + [1.0] * 4))


def test_timestep_embedding_takes_real_t_and_odd_dim() -> None:
    emb = timestep_embedding(torch.tensor([0.5, 0.25]), 7)
    assert emb.shape == (2, 7)
    assert torch.all(emb[:, -1] == 0)
    assert not torch.equal(emb[0], emb[1])


# --- the U-Net ------------------------------------------------------------------------------------------------


def test_ddpm_cifar10_has_the_papers_parameter_count() -> None:
    # Ho et al. (2020), appendix B: "Our CIFAR10 model has 35.7 million parameters."
    model = UNet(image_size=32, in_channels=3, out_channels=3, **UNET_PRESETS["ddpm-cifar10"])
    assert num_params(model) == pytest.approx(35.7e6, rel=0.01)
    assert num_params(model) == 35_746_307


@pytest.mark.parametrize(
    ("preset", "size", "batch"),
    [("ddpm-cifar10", 32, 1), ("small", 28, 2), ("small", 32, 2), ("tiny", 8, 3), ("micro", 8, 3)],
)
def test_output_shape_for_each_preset(preset: str, size: int, batch: int) -> None:
    model = UNet(image_size=size, in_channels=3, out_channels=6, **UNET_PRESETS[preset]).eval()
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        out = model(x, torch.randint(0, 1000, (batch,)))
    assert out.shape == (batch, 6, size, size)
    # The final conv starts at zero (reference code's init_scale=0.), so the untrained net predicts 0.
    assert not out.any()


def test_time_embedding_changes_the_output() -> None:
    model = randomise_zero_init(UNet(image_size=8, in_channels=1, out_channels=2, **UNET_PRESETS["tiny"])).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        early = model(x, torch.tensor([1, 1]))
        late = model(x, torch.tensor([700, 700]))
        real = model(x, torch.tensor([1.5, 1.5]))
    assert not torch.allclose(early, late)
    assert not torch.allclose(early, real)
    # a scalar t is shared by the batch: embedded once, as one row (the same up to float rounding: 1.2e-6 seen)
    torch.testing.assert_close(model(x, torch.tensor(1)), early, rtol=1e-5, atol=1e-5)


def test_gradients_reach_every_parameter() -> None:
    model = randomise_zero_init(UNet(image_size=8, in_channels=1, out_channels=1, **UNET_PRESETS["tiny"]))
    model(torch.randn(4, 1, 8, 8), torch.randint(0, 1000, (4,))).square().mean().backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_training_from_zero_init_makes_the_output_depend_on_t() -> None:
    # Step 1 moves only the output conv (every other gradient passes through its zero weights); t enters the
    # residual branches, whose zero-initialised last convs start to move at step 2.
    torch.manual_seed(0)
    model = UNet(image_size=8, in_channels=1, out_channels=1, **UNET_PRESETS["micro"])
    x, t = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randn_like(x)
    for _ in range(2):
        opt.zero_grad()
        (model(x, t) - target).square().mean().backward()
        opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(x[:1], torch.tensor([3])), model(x[:1], torch.tensor([900])))


def test_channels_last_gives_the_same_output() -> None:
    model = randomise_zero_init(UNet(image_size=8, in_channels=2, out_channels=2, **UNET_PRESETS["tiny"])).eval()
    x, t = torch.randn(2, 2, 8, 8), torch.tensor([5, 50])
    with torch.no_grad():
        ref = model(x, t)
        out = model.to(memory_format=torch.channels_last)(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_the_unets_dropout_keeps_each_element_with_probability_1_minus_p_and_scales_it(p: float) -> None:
    """Srivastava et al. (2014), inverted: kept elements are x / (1 - p), dropped ones 0, and the gradient is the
    same mask; the keep rate is 1 - p within 5 standard errors over 10^6 elements; eval mode is the identity."""
    torch.manual_seed(0)
    drop = Dropout(p)
    x = torch.rand(1000, 1000, dtype=torch.float64) + 1.0  # nonzero, so a dropped element shows as 0
    x.requires_grad_(True)
    y = drop(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / (1 - p), rtol=1e-12, atol=0)
    n = kept.numel()
    assert abs(kept.double().mean().item() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
    y.sum().backward()
    torch.testing.assert_close(x.grad, kept.double() / (1 - p), rtol=1e-12, atol=0)
    assert not torch.equal(drop(x), y)  # a fresh mask per call
    drop.eval()
    assert torch.equal(drop(x), x)


def test_group_norm_falls_back_to_a_divisor_of_the_channel_count() -> None:
    model = UNet(
        image_size=8,
        in_channels=1,
        out_channels=1,
        base_channels=48,
        channel_mult=(1,),
        num_res_blocks=1,
        attn_resolutions=(8,),
        num_groups=32,
    )
    groups = {m.num_channels: m.num_groups for m in model.modules() if isinstance(m, nn.GroupNorm)}
    assert groups == {48: 24, 96: 32}  # 96 = 48 + 48 at the concatenation in the up path


class GroupNormCalls(TorchFunctionMode):
    """The dtypes group_norm is called with, and whether autocast is on at the call (then autocast decides its
    precision: float32 on CUDA)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "group_norm":
            given = {**dict(zip(("input", "num_groups", "weight", "bias"), args)), **(kwargs or {})}
            x, weight, bias = given["input"], given["weight"], given["bias"]
            self.calls.append((x.dtype, weight.dtype, bias.dtype, torch.is_autocast_enabled(x.device.type)))
        return func(*args, **(kwargs or {}))


def test_group_norm_runs_in_the_autocast_dtype_where_autocast_would_run_it_in_float32(monkeypatch) -> None:
    """CUDA autocast runs group_norm in float32 (casting bf16 activations up, and SiLU after it then runs in float32
    too); the U-Net's GroupNorm runs it in the autocast dtype instead, with autocast off for the call. Tried on the
    CPU by naming the CPU among the devices it does that on; by default the CPU's GroupNorm is nn.GroupNorm."""
    torch.manual_seed(0)
    norm, plain = group_norm(32, 8), nn.GroupNorm(8, 32, eps=1e-6)
    with torch.no_grad():
        for p, q in zip(norm.parameters(), plain.parameters()):
            p.normal_()
            q.copy_(p)
    x = torch.randn(4, 32, 8, 8, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), GroupNormCalls() as mode:  # the default: the CPU as it was
        assert torch.equal(norm(x), plain(x))
    assert mode.calls == [(torch.bfloat16, torch.float32, torch.float32, True)] * 2

    monkeypatch.setattr(unet, "NORM_IN_AUTOCAST_DTYPE", ("cpu",))
    with GroupNormCalls() as mode:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = norm(x.float().requires_grad_())
        full = norm(x.float())  # outside autocast: nn.GroupNorm as it is
    assert mode.calls == [(torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
                          (torch.float32, torch.float32, torch.float32, False)]
    assert low.dtype == torch.bfloat16 and torch.equal(full, plain(x.float()))
    torch.testing.assert_close(low.float(), full, atol=0.05, rtol=0.02)  # bf16 rounding of the same norm
    low.float().pow(2).sum().backward()
    assert norm.weight.grad.dtype == torch.float32 and norm.bias.grad.abs().sum() > 0


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("channels_last", [False, True])
def test_attention_takes_the_fused_kernel_and_computes_softmax_attention(heads: int, channels_last: bool) -> None:
    """From NCHW as from channels-last, the heads' features reach scaled_dot_product_attention contiguous, so the
    fused (flash) kernel runs, not the unfused math path (issue 13: it had been the math path, 7% of a CPU step);
    and the block still equals x + proj(softmax(q k^T / sqrt(d)) v) written out."""
    from torch.profiler import profile

    from elbox.nets.unet import AttentionBlock

    torch.manual_seed(0)
    block = AttentionBlock(32, heads, 8)
    nn.init.normal_(block.proj_out.weight)  # zero-initialised: the attention would not show in the output
    x = torch.randn(3, 32, 6, 5)
    if channels_last:
        x, block = x.contiguous(memory_format=torch.channels_last), block.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    with profile() as prof:
        out = block(x)
        out.sum().backward()
    ops = {e.key for e in prof.key_averages()}
    assert "aten::_scaled_dot_product_attention_math" not in ops, sorted(o for o in ops if "attention" in o)
    assert any("flash_attention" in o for o in ops), sorted(o for o in ops if "attention" in o)

    qkv = block.qkv(block.norm(x)).flatten(2)  # (B, 3C, HW)
    q, k, v = (t.reshape(3, heads, 32 // heads, 30).transpose(-1, -2) for t in qkv.chunk(3, dim=1))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(32 // heads), dim=-1)
    h = (weights @ v).transpose(-1, -2).reshape(3, 32, 6, 5)
    torch.testing.assert_close(out, x + block.proj_out(h), rtol=1e-5, atol=1e-5)


def test_multi_head_attention_runs() -> None:
    model = UNet(
        image_size=8,
        in_channels=1,
        out_channels=1,
        base_channels=16,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attn_resolutions=(8, 4),
        num_heads=4,
        dropout=0.0,
    )
    assert model(torch.randn(2, 1, 8, 8), torch.tensor([0, 1])).shape == (2, 1, 8, 8)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(image_size=28, channel_mult=(1, 2, 2, 2)), "image size 28 is not divisible by 8"),
        (dict(image_size=32, channel_mult=(1, 2), attn_resolutions=(8,)), "attention resolution 8"),
        (dict(image_size=8, base_channels=0), "base_channels 0"),
        (dict(image_size=8, dropout=1.0), "dropout 1.0"),
        (dict(image_size=8, channel_mult=()), "channel_mult ()"),
        (dict(image_size=8, base_channels=16, channel_mult=(1,), attn_resolutions=(), num_heads=3), "num_heads 3"),
    ],
)
def test_bad_configuration_raises_a_one_line_user_error(kwargs: dict, needle: str) -> None:
    kwargs = {"in_channels": 1, "out_channels": 1, "attn_resolutions": (), **kwargs}
    with pytest.raises(UserError) as info:
        UNet(**kwargs)
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


# --- the MLP denoiser -----------------------------------------------------------------------------------------


def test_mlp_denoiser_shape_and_time_dependence() -> None:
    model = randomise_zero_init(MLPDenoiser(dim=2, out_dim=4, hidden=32, depth=2, time_dim=16))
    x = torch.randn(5, 2)
    assert model(x, torch.randint(0, 1000, (5,))).shape == (5, 4)
    assert not torch.allclose(model(x, torch.full((5,), 3)), model(x, torch.full((5,), 800)))
    assert not torch.allclose(model(x, torch.full((5,), 0.1)), model(x, torch.full((5,), 0.9)))


@pytest.mark.parametrize("net", ["mlp", "unet"])
def test_a_scalar_t_is_embedded_once_and_means_that_t_for_every_row(net: str) -> None:
    """Samplers and the bound pass one t for the batch: the time-embedding MLP then runs on one row (not B), and
    the output is that of t repeated B times."""
    if net == "mlp":
        model, x = randomise_zero_init(MLPDenoiser(dim=3, out_dim=3, hidden=32, time_dim=16)), torch.randn(7, 3)
    else:
        model = randomise_zero_init(UNet(image_size=8, in_channels=1, out_channels=1, **UNET_PRESETS["tiny"]))
        x = torch.randn(7, 1, 8, 8)
    rows = []
    model.time_embed[0].register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    with torch.no_grad():
        shared, repeated = model(x, torch.tensor(400)), model(x, torch.full((7,), 400))
    assert rows == [1, 7]
    torch.testing.assert_close(shared, repeated, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(shared, model(x, torch.tensor(401)), rtol=1e-5, atol=1e-5)


def test_mlp_denoiser_starts_at_zero_and_gradients_reach_every_parameter() -> None:
    model = MLPDenoiser(dim=2, out_dim=2)
    x, t = torch.randn(16, 2), torch.randint(0, 1000, (16,))
    assert not model(x, t).any()
    randomise_zero_init(model)(x, t).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()] == []


def test_mlp_denoiser_rejects_bad_sizes() -> None:
    with pytest.raises(UserError, match="depth 0"):
        MLPDenoiser(dim=2, out_dim=2, depth=0)
