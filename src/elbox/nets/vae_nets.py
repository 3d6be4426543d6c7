"""The VAE's networks: pure ``nn.Module``s that know nothing of priors, likelihoods or the ELBO.

An encoder maps x to (mu, log sigma^2) of q_phi(z|x) = N(mu, diag sigma^2) (Kingma & Welling 2014, eq. 9); a
decoder maps z to ``out_channels`` raw parameter channels per pixel (what a ``decoders.Likelihood`` turns into
log p(x|z)).

- ``MLPEncoder`` / ``MLPDecoder``: the multilayer perceptrons of Kingma & Welling (2014, appendix C; one hidden
  layer of 500 tanh units on MNIST), with any number of hidden layers; they flatten any data shape.
- ``ConvEncoder`` / ``ConvDecoder``: a convolutional pair for images of any size and channel count: one stride-2
  stage per entry of ``channels`` (sizes rounded up, so odd sizes work), each followed by ``res_blocks`` residual
  blocks, and a linear map between the last feature map and z.
- ``ARContext``: a PixelCNN-style masked convolution over the pixels that come before each pixel in raster order
  (van den Oord et al. 2016), whose output the VAE adds to the decoder's parameters: an autoregressive decoder
  p(x|z) = prod_i p(x_i | z, x_<i) with a small receptive field, as in PixelVAE (Gulrajani et al. 2017); optionally
  conditioned on the decoder's output map too, so that z and the earlier pixels interact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU, "silu": nn.SiLU}


def _mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers between consecutive ``sizes``, with the activation after every layer but the last."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


class MLPEncoder(nn.Module):
    """x of any shape (B, ...) -> (mu, logvar), each (B, latent_dim)."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...], latent_dim: int, activation: str = "tanh") -> None:
        super().__init__()
        self.net = _mlp([in_dim, *hidden, 2 * latent_dim], activation)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mu, logvar = self.net(x.flatten(1)).chunk(2, dim=1)
        return mu, logvar


class MLPDecoder(nn.Module):
    """z (B, latent_dim) -> raw parameters (B, out_channels, *spatial), e.g. (B, 1, 28, 28) or (B, 2 * D)."""

    def __init__(
        self, latent_dim: int, hidden: tuple[int, ...], out_shape: tuple[int, ...], activation: str = "tanh"
    ) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        self.net = _mlp([latent_dim, *hidden, math.prod(out_shape)], activation)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z).view(z.shape[0], *self.out_shape)


class ResBlock(nn.Module):
    """x + conv3x3(act(conv3x3(act(x)))), channel count kept (He et al. 2016, pre-activation form)."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        act = ACTIVATIONS[activation]
        self.body = nn.Sequential(
            act(), nn.Conv2d(channels, channels, 3, padding=1), act(), nn.Conv2d(channels, channels, 3, padding=1)
        )

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def stage_sizes(size: tuple[int, int], stages: int) -> list[tuple[int, int]]:
    """The spatial sizes after 0, 1, ..., ``stages`` stride-2 convolutions (kernel 3, padding 1: ceil(s / 2))."""
    sizes = [tuple(size)]
    for _ in range(stages):
        h, w = sizes[-1]
        sizes.append(((h + 1) // 2, (w + 1) // 2))
    return sizes


class ConvEncoder(nn.Module):
    """x (B, C, H, W) -> (mu, logvar), each (B, latent_dim); one stride-2 stage per entry of ``channels``.

    With ``latent_channels`` > 0 the latent is spatial instead: (mu, logvar) each (B, latent_channels, h, w) at the
    last stage's size, from a 1x1 convolution (the latents of latent diffusion, Rombach et al. 2022).
    """

    def __init__(
        self,
        in_shape: tuple[int, int, int],
        channels: tuple[int, ...],
        latent_dim: int,
        res_blocks: int = 1,
        activation: str = "silu",
        latent_channels: int = 0,
    ) -> None:
        super().__init__()
        c, h, w = in_shape
        layers: list[nn.Module] = []
        prev = c
        for ch in channels:
            layers.append(nn.Conv2d(prev, ch, 3, stride=2, padding=1))
            layers.extend(ResBlock(ch, activation) for _ in range(res_blocks))
            prev = ch
        layers.append(ACTIVATIONS[activation]())
        self.features = nn.Sequential(*layers)
        fh, fw = stage_sizes((h, w), len(channels))[-1]
        self.spatial = latent_channels > 0
        if self.spatial:
            self.head = nn.Conv2d(prev, 2 * latent_channels, 1)
        else:
            self.head = nn.Linear(prev * fh * fw, 2 * latent_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)
        mu, logvar = self.head(h if self.spatial else h.flatten(1)).chunk(2, dim=1)
        return mu, logvar


class ConvDecoder(nn.Module):
    """z (B, latent_dim) -> raw parameters (B, out_channels, H, W): the mirror image of ``ConvEncoder`` (z of shape
    (B, latent_channels, h, w) with ``latent_channels`` > 0).

    Each stage doubles the size with a stride-2 transposed convolution whose ``output_padding`` (0 or 1) recovers
    the encoder's size exactly, so any H and W come back.
    """

    def __init__(
        self,
        latent_dim: int,
        channels: tuple[int, ...],
        out_shape: tuple[int, int, int],
        res_blocks: int = 1,
        activation: str = "silu",
        latent_channels: int = 0,
    ) -> None:
        super().__init__()
        out_channels, h, w = out_shape
        sizes = stage_sizes((h, w), len(channels))
        self.start = (channels[-1], *sizes[-1])
        self.spatial = latent_channels > 0
        if self.spatial:
            self.head = nn.Conv2d(latent_channels, channels[-1], 1)
        else:
            self.head = nn.Linear(latent_dim, math.prod(self.start))
        layers: list[nn.Module] = []
        widths = list(reversed(channels))
        for i, ch in enumerate(widths):
            layers.extend(ResBlock(ch, activation) for _ in range(res_blocks))
            layers.append(ACTIVATIONS[activation]())
            (sh, sw), (th, tw) = sizes[len(channels) - i], sizes[len(channels) - i - 1]
            out = widths[i + 1] if i + 1 < len(widths) else widths[-1]
            pad = (th - (2 * sh - 1), tw - (2 * sw - 1))
            layers.append(nn.ConvTranspose2d(ch, out, 3, stride=2, padding=1, output_padding=pad))
        layers.append(ACTIVATIONS[activation]())
        layers.append(nn.Conv2d(widths[-1], out_channels, 3, padding=1))
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(self.head(z) if self.spatial else self.head(z).view(z.shape[0], *self.start))


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the pixels before the centre in raster order (PixelCNN's mask "A"), or with
    ``centre=True`` also the centre (mask "B", for layers whose input at a pixel already depends only on the
    pixels before it).

    All channels of a pixel are masked together, so the pixels are ordered and the channels of one pixel are
    conditionally independent given everything before it.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, centre: bool = False) -> None:
        super().__init__(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        mask = torch.ones_like(self.weight)
        c = kernel_size // 2
        mask[:, :, c, c + centre :] = 0  # everything right of the centre, and the centre itself under mask A
        mask[:, :, c + 1 :] = 0  # every row below
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight * self.mask, self.bias)


class ARContext(nn.Module):
    """x (B, C, H, W) -> (B, out_channels, H, W), where output pixel i depends only on input pixels before i (and,
    when conditioned, on the decoder's output map, which depends on z alone).

    One masked ``kernel_size`` convolution (mask A), then ``layers`` residual masked 3x3 convolutions (mask B,
    pre-activation, as in PixelCNN: each sees one row further up and one column further each way), a nonlinearity
    and a 1x1 convolution. The last layer starts at zero, so a fresh model is a factorized decoder and learns how
    much context to use.

    With ``cond_channels`` > 0 the context is also conditioned on z, as in PixelVAE (Gulrajani et al. 2017): the
    decoder's output map p(z) (B, cond_channels, H, W) enters the first layer through an unmasked ``kernel_size``
    convolution. p depends on z alone, never on x, so it may be seen at every pixel, later ones included; the
    context's output at pixel i then depends on x_<i and z, and p(x|z) stays normalised.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, hidden: int, activation: str,
                 layers: int = 0, cond_channels: int = 0) -> None:
        super().__init__()
        self.masked = MaskedConv2d(in_channels, hidden, kernel_size)
        self.cond = (
            nn.Conv2d(cond_channels, hidden, kernel_size, padding=kernel_size // 2, bias=False)
            if cond_channels
            else None
        )
        self.blocks = nn.ModuleList(MaskedConv2d(hidden, hidden, 3, centre=True) for _ in range(layers))
        self.act = ACTIVATIONS[activation]()
        self.out = nn.Conv2d(hidden, out_channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @property
    def conditioned(self) -> bool:
        """Whether the output depends on z (through the decoder's output map) as well as on earlier pixels."""
        return self.cond is not None

    def first(self, x: Tensor) -> Tensor:
        """The first masked layer's output for x, before any conditioning: the part that depends on x alone."""
        return self.masked(x)

    def rest(self, h: Tensor, params: Tensor | None = None) -> Tensor:
        """The context from ``first(x)`` and the decoder's output map ``params`` (both of batch size B)."""
        if self.cond is not None:
            if params is None:
                raise ValueError("this context is conditioned on z: pass the decoder's output map")
            h = h + self.cond(params)
        for block in self.blocks:
            h = h + block(self.act(h))
        return self.out(self.act(h))

    def forward(self, x: Tensor, params: Tensor | None = None) -> Tensor:
        return self.rest(self.first(x), params)
