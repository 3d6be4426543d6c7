"""The DDPM U-Net of Ho et al. (2020), appendix B, written for elbox.

Appendix B: "Our neural network architecture follows the backbone of PixelCNN++, which is a U-Net based on a Wide
ResNet. We replaced weight normalization with group normalization. Our 32x32 models use four feature map
resolutions (32x32 to 4x4) ... two convolutional residual blocks per resolution level and self-attention blocks at
the 16x16 resolution between the convolutional blocks. Diffusion time t is specified by adding the Transformer
sinusoidal position embedding into each residual block." The CIFAR-10 model has 35.7 million parameters.

The layout (block order, which convolutions start at zero, one skip connection per down-path output) follows the
authors' released TensorFlow code (``diffusion_tf/models/unet.py``). The network knows nothing of noise schedules:
it maps (x_t, t) to a tensor of ``out_channels`` channels, and the objective decides what those channels mean
(epsilon, or epsilon and variance interpolation coefficients with ``out_channels = 2 * in_channels``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from elbox.errors import UserError
from elbox.nets.embeddings import timestep_embedding

#: Constructor keyword arguments by preset name (image size and channel counts come from the data).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # Ho et al. (2020), appendix B: the 35.7M-parameter CIFAR-10 model.
    "ddpm-cifar10": dict(
        base_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,), dropout=0.1
    ),
    # CPU-sized, for 28x28 (28 -> 14 -> 7) and 32x32 (32 -> 16 -> 8) data. The two have no level resolution in
    # common, so attention is only the middle block's, at the 7x7 or 8x8 bottleneck.
    "small": dict(base_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(), dropout=0.1),
    # 8x8 data and fast tests: attention at the 4x4 level.
    "tiny": dict(
        base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), dropout=0.0, num_groups=8
    ),
    # The smallest sensible net, for unit tests: no attention outside the middle block.
    "micro": dict(
        base_channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0, num_groups=8
    ),
}


#: the devices whose autocast GroupNorm runs in the autocast dtype (``GroupNorm``)
NORM_IN_AUTOCAST_DTYPE: tuple[str, ...] = ("cuda",)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm``, but under CUDA autocast (bf16/fp16) in the autocast dtype, as it runs under CPU autocast.

    CUDA autocast runs group_norm in float32: each of the U-Net's GroupNorms cast its bf16 input up, and SiLU then
    ran in float32 too, before the next convolution cast back down. The CUDA kernel keeps its statistics in float32
    whatever the input, and the convolution takes bf16 either way, so running the norm and SiLU in bf16 changes
    the arithmetic only by rounding. It saves two casts and half the bytes of each norm and SiLU, which an unfused
    step spends its time on (issue 13: bf16 trained slower than fp32; not yet timed on a GPU: ``gpu_check.py``'s
    cifar stage times it against autocast's float32 norm). timm's ``fast_norm`` does the same. Outside autocast,
    and on a CPU (whose autocast already keeps group_norm in bf16), it is ``nn.GroupNorm``."""

    def forward(self, x: Tensor) -> Tensor:
        device = x.device.type
        if device in NORM_IN_AUTOCAST_DTYPE and torch.is_autocast_enabled(device):
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype),
                                    self.eps)
        return super().forward(x)


def group_norm(channels: int, num_groups: int) -> GroupNorm:
    """GroupNorm over ``channels`` with ``num_groups`` groups, or the largest divisor of ``channels`` below it.

    Appendix B replaces PixelCNN++'s weight normalization by group normalization (32 groups in the reference
    code); the fallback lets small presets use channel counts such as 48 (24 groups).
    """
    groups = max(g for g in range(1, min(num_groups, channels) + 1) if channels % g == 0)
    return GroupNorm(groups, channels, eps=1e-6)


class Dropout(nn.Dropout):
    """``nn.Dropout`` (Srivastava et al. 2014): in training, each element is kept with probability 1 - p and scaled
    by 1 / (1 - p). On a CPU the keep mask is one float32 uniform per element compared with p: the CPU's
    ``bernoulli_`` behind ``F.dropout`` runs on one thread, ``torch.rand`` on all of them, and the U-Net's training
    step on this project's 2-core CPU spent ~12% of its time in dropout (``benchmarks/speed.py``, small preset).
    The distribution is the same up to float32 rounding of p; the random stream differs from ``F.dropout``'s.
    Elsewhere (a GPU's fused kernel) and in eval mode, ``F.dropout`` as it is."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return super().forward(x)
        keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= self.p  # P(keep) = 1 - p
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))


def zero_init(module: nn.Module) -> nn.Module:
    """Set all parameters of ``module`` to zero (the reference code's ``init_scale=0.``) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Wide-ResNet block with the time embedding added between its two convolutions (appendix B).

    GroupNorm, SiLU, conv3x3, + Linear(SiLU(emb)), GroupNorm, SiLU, dropout, conv3x3 (zero-initialised, so the
    block starts as the identity), plus a 1x1 projection of the input when the channel count changes.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, num_groups: int) -> None:
        super().__init__()
        self.norm1 = group_norm(in_ch, num_groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = group_norm(out_ch, num_groups)
        self.dropout = Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Residual self-attention over the H*W positions (appendix B, "self-attention blocks at 16x16").

    GroupNorm, a 1x1 conv to queries, keys and values, scaled dot-product attention with ``num_heads`` heads, and
    a zero-initialised 1x1 output projection (as ``proj_out`` in the reference code).
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = group_norm(channels, num_groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        heads = self.num_heads
        # (B, 3C, H, W) -> (3, B, heads, H*W, C/heads); a view when x is channels_last. The fused attention
        # kernels (flash on the CPU, flash/memory-efficient on GPUs) need each head's features contiguous (last
        # stride 1); from NCHW they are H*W apart, which falls back to the unfused math. So copy once -- except under
        # bf16 autocast on a CPU, where torch's flash kernel is the slower one (measured on this project's CPU, fwd +
        # bwd at 16-64 positions: 1.5-2.4x the math path's time; at 256 about equal), so the math path is kept there.
        qkv = self.qkv(self.norm(x)).permute(0, 2, 3, 1).reshape(b, height * width, 3, heads, c // heads)
        if qkv.stride(-1) != 1 and not (qkv.device.type == "cpu" and torch.is_autocast_enabled("cpu")):
            qkv = qkv.contiguous()
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        h = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C/heads)) v
        h = h.transpose(1, 2).reshape(b, height, width, c).permute(0, 3, 1, 2)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a strided 3x3 convolution (the reference code's ``resamp_with_conv=True``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """``emb`` is unused; it is accepted so that the down path is a uniform list of (x, emb) -> x modules."""
        return self.conv(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour interpolation followed by a 3x3 convolution."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """One ResBlock, then self-attention if this resolution has it, then an upsample if this ends an up level."""

    def __init__(self, res: ResBlock, attn: nn.Module | None = None, upsample: nn.Module | None = None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()
        self.upsample = upsample if upsample is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.upsample(self.attn(self.res(x, emb)))


class UNet(nn.Module):
    """The DDPM U-Net (Ho et al. 2020, appendix B): ``forward(x_t, t)`` -> (B, out_channels, H, W).

    Levels run at resolutions image_size / 2^i with ``base_channels * channel_mult[i]`` channels. The down path
    has ``num_res_blocks`` blocks per level and a strided-conv downsample between levels; every output on it
    (including the input conv's and each downsample's) is a skip connection. The middle is ResBlock, attention,
    ResBlock. The up path has ``num_res_blocks + 1`` blocks per level, each concatenating one skip, and ends each
    level but the last with an upsample. Attention follows every block at the resolutions in ``attn_resolutions``.
    """

    def __init__(
        self,
        *,
        image_size: int,
        in_channels: int,
        out_channels: int,
        base_channels: int = 128,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_heads: int = 1,
        num_groups: int = 32,
    ) -> None:
        super().__init__()
        channel_mult, attn_resolutions = tuple(channel_mult), tuple(attn_resolutions)
        _validate(
            image_size,
            in_channels,
            out_channels,
            base_channels,
            channel_mult,
            num_res_blocks,
            attn_resolutions,
            dropout,
            num_heads,
            num_groups,
        )
        self.image_size, self.in_channels, self.out_channels = image_size, in_channels, out_channels
        self.base_channels = base_channels
        emb_dim = 4 * base_channels

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, cout, emb_dim, dropout, num_groups)

        def attn(ch: int, resolution: int) -> nn.Module | None:
            return AttentionBlock(ch, num_heads, num_groups) if resolution in attn_resolutions else None

        # Sinusoidal embedding of dimension ch -> Linear, SiLU, Linear to 4 ch (the reference's dense0, dense1).
        self.time_embed = nn.Sequential(nn.Linear(base_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(in_channels, base_channels, 3, padding=1)

        # Down path: remember each output's channel count, since the up path concatenates them back in.
        self.down = nn.ModuleList()
        skip_channels, ch, resolution = [base_channels], base_channels, image_size
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(Block(res(ch, base_channels * mult), attn(base_channels * mult, resolution)))
                ch = base_channels * mult
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)
                resolution //= 2

        self.middle = nn.ModuleList(
            [
                Block(res(ch, ch), AttentionBlock(ch, num_heads, num_groups)),
                Block(res(ch, ch)),
            ]
        )

        # Up path: each block takes one skip; the last block of every level but the top one upsamples.
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                cout = base_channels * mult
                upsample = Upsample(cout) if level != 0 and i == num_res_blocks else None
                self.up.append(Block(res(ch + skip_channels.pop(), cout), attn(cout, resolution), upsample))
                ch = cout
            resolution *= 2

        self.norm_out = group_norm(ch, num_groups)
        self.conv_out = zero_init(nn.Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Map x_t (B, C, H, W) and timesteps t (B,) (or a scalar, shared by the batch: embedded once, one row that
        broadcasts) to (B, out_channels, H, W)."""
        emb = timestep_embedding(t.reshape(-1), self.base_channels).to(self.conv_in.weight.dtype)
        emb = self.time_embed(emb)

        h = self.conv_in(x)
        skips = [h]
        for module in self.down:
            h = module(h, emb)
            skips.append(h)
        for block in self.middle:
            h = block(h, emb)
        for block in self.up:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


def _validate(
    image_size: int,
    in_channels: int,
    out_channels: int,
    base_channels: int,
    channel_mult: tuple[int, ...],
    num_res_blocks: int,
    attn_resolutions: tuple[int, ...],
    dropout: float,
    num_heads: int,
    num_groups: int,
) -> None:
    """Raise UserError, with one line naming the value and what is allowed, for a U-Net that cannot be built."""
    for name, value in [
        ("in_channels", in_channels),
        ("out_channels", out_channels),
        ("base_channels", base_channels),
        ("num_res_blocks", num_res_blocks),
        ("num_heads", num_heads),
        ("num_groups", num_groups),
        ("image_size", image_size),
    ]:
        if not (isinstance(value, int) and value >= 1):
            raise UserError(f"U-Net {name} {value!r} is not allowed; use a positive integer")
    if not channel_mult or not all(isinstance(m, int) and m >= 1 for m in channel_mult):
        raise UserError(f"U-Net channel_mult {channel_mult!r} is not allowed; use one or more positive integers")
    if not 0.0 <= dropout < 1.0:
        raise UserError(f"U-Net dropout {dropout!r} is not allowed; use a value in [0, 1)")
    factor = 2 ** (len(channel_mult) - 1)
    if image_size % factor != 0:
        raise UserError(
            f"image size {image_size} is not divisible by {factor}, the U-Net's total downsampling for channel_mult "
            f"{channel_mult}; use an image size that is a multiple of {factor} or fewer levels"
        )
    reachable = tuple(image_size // 2**i for i in range(len(channel_mult)))
    for resolution in attn_resolutions:
        if resolution not in reachable:
            raise UserError(
                f"attention resolution {resolution!r} is not one of the U-Net's resolutions {reachable} "
                f"for image size {image_size} and channel_mult {channel_mult}; choose attn_resolutions from those"
            )
    # Attention runs at the listed resolutions and in the middle block, at the lowest resolution.
    for level, (resolution, mult) in enumerate(zip(reachable, channel_mult, strict=True)):
        ch = base_channels * mult
        if (resolution in attn_resolutions or level == len(channel_mult) - 1) and ch % num_heads != 0:
            raise UserError(
                f"U-Net num_heads {num_heads} does not divide the {ch} channels of the attention at {resolution}x"
                f"{resolution}; use a number of heads that divides the channel count of every attention level"
            )
