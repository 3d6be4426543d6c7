"""The variational autoencoder as an ELBO model (Kingma & Welling 2014).

    log p(x) >= E_q[log p_theta(x|z)] - KL(q_phi(z|x) || p(z))                       (K&W eq. 3)

with the prior p(z) = N(0, I), the encoder q_phi(z|x) = N(mu(x), diag sigma^2(x)) sampled by reparameterisation
z = mu + sigma * eps, eps ~ N(0, I) (K&W eq. 10), the KL in closed form (K&W appendix B) and a decoder likelihood
p_theta(x|z) chosen by name (``elbox.objectives.decoders``). The bound is returned as two per-example terms in
nats: ``decoder_nll`` = -log p_theta(x|z) at one z sample and ``kl``. A beta weight and a KL warm-up change only
the training ``loss``, never the reported terms.

``iwae_bound`` is the importance-weighted estimate of log p(x) used to report test likelihoods (Burda et al. 2016).

Options beyond Kingma & Welling: a conv encoder with the mlp decoder (``arch="conv-mlp"``), and an autoregressive
decoder p(x|z) = prod_i p(x_i | z, x_<i) whose context is a small stack of masked convolutions over earlier
pixels (``ar_kernel``, ``ar_layers``; PixelVAE, Gulrajani et al. 2017), optionally conditioned on z (``ar_cond``).
Both keep scoring cheap: the decoder runs once per importance sample, the encoder and the context once per example
(a context conditioned on z runs its layers after the first once per sample).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from elbox import draws
from elbox.errors import UserError
from elbox.nets.vae_nets import ACTIVATIONS, ARContext, ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder, stage_sizes
from elbox.objectives.base import ELBOModel
from elbox.objectives.decoders import DECODERS, build_likelihood
from elbox.objectives.gaussian import standard_normal_kl
from elbox.objectives.terms import Terms
from elbox.typecheck import check_fields

#: the scale mode "auto" resolves to, per decoder: a fixed sigma for the Gaussian density (the classic MSE VAE);
#: a learned per-pixel scale for the discretized decoders, whose bits/dim are meant to be compared with a DDPM's.
AUTO_SIGMA_MODE = {
    "gaussian": "fixed",
    "discretized-gaussian": "learned-pixel",
    "discretized-logistic": "learned-pixel",
}


Arch = Literal["mlp", "conv", "conv-mlp"]
Activation = Literal["tanh", "relu", "elu", "silu"]
DecoderName = Literal["bernoulli", "gaussian", "discretized-gaussian", "discretized-logistic"]
SigmaMode = Literal["auto", "fixed", "learned", "learned-pixel"]


@dataclass
class VAEConfig:
    """The VAE: its networks, its decoder likelihood p(x|z) and the weight of its KL term.

    ``sigma_mode`` applies to the gaussian and discretized decoders (bernoulli has no scale): "fixed" uses
    ``decoder_sigma``; "learned" learns one global sigma starting at ``decoder_sigma``; "learned-pixel" lets the
    decoder network output a sigma per pixel, starting near ``decoder_sigma``; "auto" is fixed for gaussian and
    learned-pixel for the discretized decoders (``AUTO_SIGMA_MODE``).

    ``arch="conv-mlp"`` pairs a conv encoder (run once per example) with the mlp decoder (run once per importance
    sample): a better posterior at the evaluation cost of the mlp. ``ar_kernel`` > 0 makes the decoder
    autoregressive over pixels, p(x|z) = prod_i p(x_i | z, x_<i): a masked convolution of that size over the
    pixels before i (raster order) adds to the decoder's parameters (PixelVAE, Gulrajani et al. 2017, with one
    small masked layer, or ``ar_layers`` more masked 3x3 layers after it). It is cheap to train and to score, but
    decoding then draws the pixels one by one. With ``ar_cond`` the context sees z as well (through the decoder's
    output map, at every pixel), so z and the earlier pixels interact rather than only add their logits; scoring
    then runs the context's later layers once per importance sample.

    ``iwae_k`` > 1 trains on the importance-weighted bound L_k with k samples of z per example (the IWAE, Burda et
    al. 2016, eq. 8) instead of the ELBO (L_1): a tighter bound on log p(x), whose maximum pulls the model towards
    a higher likelihood rather than towards a posterior that q can match. Each step runs the decoder k times. The
    reported terms stay those of the ELBO (averaged over the k samples); only the training loss changes.
    """

    arch: Arch = "mlp"  # networks: mlp (Kingma & Welling; any shape), conv (images), conv-mlp (conv enc., mlp dec.)
    latent_dim: int = 50  # the size of z
    latent_channels: int = 0  # arch conv: a spatial z of this many channels at the last stage's size (0: a vector z)
    hidden: tuple[int, ...] = (500, 500)  # mlp hidden layer sizes (the decoder mirrors them)
    conv_channels: tuple[int, ...] = (32, 64)  # conv widths, one stride-2 stage each (the decoder mirrors them)
    res_blocks: int = 1  # conv residual blocks per stage
    activation: Activation = "tanh"  # the nonlinearity of both networks: tanh, relu, elu or silu
    decoder: DecoderName = "bernoulli"  # p(x|z): bernoulli, gaussian, discretized-gaussian or discretized-logistic
    sigma_mode: SigmaMode = "auto"  # gaussian/discretized scale: fixed, learned (global), learned-pixel or auto
    decoder_sigma: float = 1.0  # that scale (its initial value when learned), in data-range units
    beta: float = 1.0  # weight of the KL in the training loss (1: the ELBO; the reported terms never change)
    kl_warmup_steps: int = 0  # the KL weight rises linearly from 0 to beta over this many steps (0: off)
    ar_kernel: int = 0  # autoregressive decoder: masked-conv context over earlier pixels, odd kernel (0: factorized)
    ar_channels: int = 16  # hidden channels of that context
    ar_layers: int = 0  # residual masked 3x3 layers after the first (0: one masked layer, the context's default)
    ar_cond: bool = False  # z conditions the context too: the decoder's output map enters it (PixelVAE)
    iwae_k: int = 1  # train on the importance-weighted bound with this many samples (IWAE; 1: the ELBO)

    def __post_init__(self) -> None:
        check_fields(self)  # every field its annotated type; a choice (Literal) one of its values
        assert set(typing.get_args(Activation)) <= set(ACTIVATIONS)
        assert set(typing.get_args(DecoderName)) == set(DECODERS)
        assert set(typing.get_args(Arch)) == set(ARCHS)
        if not 1 <= self.latent_dim <= 65536:
            raise UserError(f"latent_dim={self.latent_dim} is not allowed; use an integer from 1 to 65536")
        for name in ("hidden", "conv_channels"):
            if any(c > 65536 for c in getattr(self, name)) or len(getattr(self, name)) > 64:
                raise UserError(f"{name}={list(getattr(self, name))} is too large; use at most 64 sizes of at most 65536")
        if self.latent_channels > 4096 or self.ar_channels > 4096 or self.ar_kernel > 63:
            raise UserError("latent_channels and ar_channels must be <= 4096 and ar_kernel <= 63")
        if self.latent_channels < 0:
            raise UserError(f"latent_channels={self.latent_channels} is not allowed; use 0 (a vector z) or >= 1")
        if self.latent_channels and self.arch != "conv":
            raise UserError(f"latent_channels={self.latent_channels} (a spatial z) needs arch='conv'; got {self.arch!r}")
        if any(h < 1 for h in self.hidden):
            raise UserError(f"hidden={list(self.hidden)} is not allowed; every hidden size must be >= 1")
        if not self.conv_channels or any(c < 1 for c in self.conv_channels):
            raise UserError(f"conv_channels={list(self.conv_channels)} is not allowed; give one or more widths >= 1")
        if self.res_blocks < 0:
            raise UserError(f"res_blocks={self.res_blocks} is not allowed; use an integer >= 0")
        if not (self.decoder_sigma > 0 and math.isfinite(self.decoder_sigma)):
            raise UserError(f"decoder_sigma must be > 0 (a standard deviation); got {self.decoder_sigma}")
        if not (self.beta >= 0 and math.isfinite(self.beta)):
            raise UserError(f"beta={self.beta} is not allowed; use a number >= 0 (1 is the ELBO)")
        if self.kl_warmup_steps < 0:
            raise UserError(f"kl_warmup_steps={self.kl_warmup_steps} is not allowed; use an integer >= 0 (0: off)")
        if self.ar_kernel != 0 and (self.ar_kernel < 3 or self.ar_kernel % 2 == 0):
            raise UserError(f"ar_kernel={self.ar_kernel} is not allowed; use 0 (off) or an odd size >= 3")
        if self.ar_channels < 1:
            raise UserError(f"ar_channels={self.ar_channels} is not allowed; use an integer >= 1")
        if not 0 <= self.ar_layers <= 64:
            raise UserError(f"ar_layers={self.ar_layers} is not allowed; use an integer from 0 to 64")
        if self.ar_layers and not self.ar_kernel:
            raise UserError(f"ar_layers={self.ar_layers} needs an autoregressive context: set ar_kernel (an odd size "
                            ">= 3) too, or ar_layers=0")
        if not 1 <= self.iwae_k <= 4096:
            raise UserError(f"iwae_k={self.iwae_k} is not allowed; use an integer from 1 (the ELBO) to 4096")
        if self.iwae_k > 1 and (self.beta != 1 or self.kl_warmup_steps):
            raise UserError(f"iwae_k={self.iwae_k} trains the importance-weighted bound, which has no KL weight; "
                            "use beta=1 and kl_warmup_steps=0 with it, or iwae_k=1")
        if self.ar_cond and not self.ar_kernel:
            raise UserError("ar_cond=True needs an autoregressive context: set ar_kernel (an odd size >= 3) too, "
                            "or ar_cond=False")

    @property
    def resolved_sigma_mode(self) -> str:
        """``sigma_mode`` with "auto" replaced by the decoder's default (see ``AUTO_SIGMA_MODE``)."""
        if self.sigma_mode == "auto":
            return AUTO_SIGMA_MODE.get(self.decoder, "fixed")
        return self.sigma_mode


def _mlp_encoder(c: VAEConfig, data_shape: tuple[int, ...]) -> nn.Module:
    return MLPEncoder(math.prod(data_shape), c.hidden, c.latent_dim, c.activation)


def _conv_encoder(c: VAEConfig, data_shape: tuple[int, ...]) -> nn.Module:
    return ConvEncoder(data_shape, c.conv_channels, c.latent_dim, c.res_blocks, c.activation, c.latent_channels)


def _mlp_decoder(c: VAEConfig, out_shape: tuple[int, ...]) -> nn.Module:
    return MLPDecoder(c.latent_dim, tuple(reversed(c.hidden)), out_shape, c.activation)


def _conv_decoder(c: VAEConfig, out_shape: tuple[int, ...]) -> nn.Module:
    return ConvDecoder(c.latent_dim, c.conv_channels, out_shape, c.res_blocks, c.activation, c.latent_channels)


#: ``VAEConfig.arch`` -> (encoder builder (config, data shape), decoder builder (config, output shape))
ARCHS = {
    "mlp": (_mlp_encoder, _mlp_decoder),
    "conv": (_conv_encoder, _conv_decoder),
    "conv-mlp": (_conv_encoder, _mlp_decoder),
}


class VAE(ELBOModel):
    """A VAE on data of shape (C, H, W) or (D,), trained and evaluated in the decoder's data range."""

    kind = "vae"
    sample_modes = ("prior", "reconstruct", "interpolate", "manifold")
    has_iwae = True

    def __init__(self, config: VAEConfig, data_shape: tuple[int, ...]) -> None:
        super().__init__(config, data_shape)
        shape = self.data_shape
        if config.arch != "mlp" and len(shape) != 3:
            raise UserError(f"arch {config.arch!r} needs image data of shape (C, H, W); got shape {shape} (use 'mlp')")
        if config.ar_kernel and len(shape) != 3:
            raise UserError(f"ar_kernel={config.ar_kernel} needs image data of shape (C, H, W); got shape {shape}")
        self.likelihood = build_likelihood(
            config.decoder, shape[0], config.resolved_sigma_mode, config.decoder_sigma
        )
        out_shape = (self.likelihood.params_per_dim * shape[0], *shape[1:])
        build_encoder, build_decoder = ARCHS[config.arch]
        self.encoder = build_encoder(config, shape)
        self.decoder = build_decoder(config, out_shape)
        self.context = (
            ARContext(shape[0], out_shape[0], config.ar_kernel, config.ar_channels, config.activation,
                      config.ar_layers, out_shape[0] if config.ar_cond else 0)
            if config.ar_kernel
            else None
        )

    @property
    def data_range(self) -> str:
        return self.likelihood.data_range

    @property
    def discrete(self) -> bool:
        """Bernoulli and the discretized decoders give probabilities; the Gaussian decoder a density of x."""
        return self.config.decoder != "gaussian"

    @property
    def latent_dim(self) -> int:
        """The number of latent dimensions (of a spatial z: channels x height x width)."""
        return math.prod(self.latent_shape)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one z: (latent_dim,), or (latent_channels, h, w) for a spatial z."""
        c = self.config
        if not c.latent_channels:
            return (c.latent_dim,)
        return (c.latent_channels, *stage_sizes(self.data_shape[1:], len(c.conv_channels))[-1])

    # ---- the pieces of the bound ---------------------------------------------------------------------------

    def check_values(self, x: Tensor) -> None:
        self.likelihood.check_data(x)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The parameters (mu, log sigma^2) of q_phi(z|x), each of shape (B, *latent_shape)."""
        return self.encoder(x)

    def decoder_params(self, z: Tensor) -> Tensor:
        """The decoder network's raw output for z (B, latent_dim) (before any autoregressive context)."""
        return self.decoder(z)

    def decode(self, z: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """The decoder's mean for z (B, latent_dim), shape (B, *data_shape), in the data range.

        Bernoulli: the probabilities; gaussian: the mean (clamped to [0, 1] for images, so that it can be shown);
        discretized: the location clamped to [-1, 1] (the mode of the discretized distribution, up to rounding to
        the 8-bit grid). With an autoregressive decoder the pixels are drawn one by one in raster order, each from
        p(x_i | z, x_<i), and what is returned is each pixel's conditional mean along that draw (``generator``
        seeds the draw).
        """
        params = self.decoder(z)
        if self.context is None:
            mean = self.likelihood.mean(params)
        else:
            mean = self._decode_autoregressive(params, generator)
        if len(self.data_shape) == 3:
            mean = torch.clamp(mean, self.likelihood.low, self.likelihood.high)
        return mean

    def _decode_autoregressive(self, params: Tensor, generator: torch.Generator | None) -> Tensor:
        with torch.no_grad():
            n, (c, h, w) = params.shape[0], self.data_shape
            x = torch.zeros((n, c, h, w), dtype=params.dtype, device=params.device)
            mean = torch.zeros_like(x)
            for i in range(h):
                for j in range(w):
                    # the context at (i, j) sees only pixels before it, all of which are already drawn
                    p_ij = (params + self.context(x, params))[:, :, i, j]
                    mean[:, :, i, j] = self.likelihood.mean(p_ij)
                    x[:, :, i, j] = self.likelihood.draw(p_ij, generator)
            return mean

    def log_px_given_z(self, x: Tensor, z: Tensor) -> Tensor:
        """log p_theta(x|z) in nats, summed over the data dimensions: shape (B,)."""
        params = self.decoder(z)
        if self.context is not None:
            params = params + self.context(x, params)  # teacher forcing: every p(x_i | z, x_<i) in one pass
        return self.likelihood.log_prob(params, x).flatten(1).sum(1)

    def kl_weight(self, step: int) -> float:
        """The KL's weight in the training loss at an optimizer step: beta, ramped up over the warm-up."""
        warmup = self.config.kl_warmup_steps
        return self.config.beta * (min(1.0, step / warmup) if warmup > 0 else 1.0)

    # ---- the ELBO ------------------------------------------------------------------------------------------

    def _elbo_terms(self, x: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        self.check_input(x)
        mu, logvar = self.encode(x)
        # reparameterisation trick, K&W eq. 10: z = mu + sigma * eps with eps ~ N(0, I); in training eps comes from
        # the trainer's per-step stream (``draws``), in evaluation from the caller's generator
        eps = draws.randn_like(mu) if generator is None else draws.randn_from(generator, mu.shape, mu.device, mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps
        # KL(N(mu, sigma^2) || N(0, 1)) = -1/2 sum(1 + log sigma^2 - mu^2 - sigma^2), K&W appendix B
        kl = standard_normal_kl(mu, logvar).flatten(1).sum(1)
        return {"decoder_nll": -self.log_px_given_z(x, z), "kl": kl}

    def losses(self, x: Tensor, *, step: int) -> Terms:
        """The negative ELBO at one z sample per example, as terms; loss = decoder_nll + kl_weight(step) * kl.

        With ``iwae_k`` = k > 1: loss = -L_k, the negative importance-weighted bound of k samples (Burda et al. 2016,
        eq. 8), in nats; the terms are the ELBO's, decoder_nll averaged over the same k samples."""
        if self.config.iwae_k > 1:
            return self._iwae_losses(x, self.config.iwae_k)
        terms = self._elbo_terms(x)
        loss = terms["decoder_nll"] + self.kl_weight(step) * terms["kl"]
        return Terms(terms=terms, dims=self.dims, loss=loss)

    def _iwae_losses(self, x: Tensor, k: int) -> Terms:
        self.check_input(x)
        mu, logvar = self.encode(x)
        # the k draws of each example from the trainer's per-step stream (rows of the batch first, as it keeps them)
        eps = draws.randn_like(mu.unsqueeze(1).expand(mu.shape[0], k, *mu.shape[1:])).movedim(1, 0)
        log_px, log_prior_ratio = self._log_weights(x, mu, logvar, eps, *self._context_parts(x))
        # L_k = log 1/k sum_i p(x, z_i) / q(z_i|x); its gradient through the reparameterised z_i is the IWAE's
        bound_k = torch.logsumexp(log_px + log_prior_ratio, dim=0) - math.log(k)
        terms = {"decoder_nll": -log_px.mean(0), "kl": standard_normal_kl(mu, logvar).flatten(1).sum(1)}
        return Terms(terms=terms, dims=self.dims, loss=-bound_k)

    def bound(self, x: Tensor, *, generator: torch.Generator | None = None) -> Terms:
        """The negative ELBO (a single-sample, unbiased estimate), as terms in nats; loss = the negative ELBO.
        The z sample comes from ``generator`` (default: the global RNG)."""
        return Terms(terms=self._elbo_terms(x, generator), dims=self.dims)

    def iwae_bound(self, x: Tensor, k: int, *, generator: torch.Generator | None = None, chunk: int = 100,
                   progress: Callable[[int], None] | None = None) -> Tensor:
        """The importance-weighted estimate of log p(x) in nats with k samples, shape (B,) (Burda et al. 2016, eq. 8):

            L_k = log 1/k sum_i p(x, z_i) / q(z_i|x),    z_i ~ q(z|x) independently.

        E[L_k] rises with k towards log p(x) (their theorem 1); L_1 is the ELBO. The k samples are drawn ``chunk``
        at a time (the encoder runs once) and the chunks' log-sum-exps are combined, so memory holds chunk * B
        decoder outputs at a time (with ``ar_cond``, as many hidden maps of the context too), whatever k is.
        Gradients flow through it (an IWAE objective could use it), so evaluate under ``torch.no_grad()``, or the
        graph of every chunk is kept. The z samples come from ``generator`` (default: the global RNG).
        """
        if int(k) != k or k < 1:
            raise UserError(f"the number of importance samples k must be an integer >= 1; got {k}")
        if chunk < 1:
            raise UserError(f"chunk must be >= 1; got {chunk}")
        self.check_input(x)
        mu, logvar = self.encode(x)
        parts = self._context_parts(x)
        total = torch.full((x.shape[0],), -math.inf, dtype=mu.dtype, device=mu.device)
        done = 0
        while done < k:
            c = min(chunk, k - done)
            eps = draws.randn_from(generator, (c, *mu.shape), mu.device, mu.dtype)
            log_px, log_prior_ratio = self._log_weights(x, mu, logvar, eps, *parts)
            total = torch.logaddexp(total, torch.logsumexp(log_px + log_prior_ratio, dim=0))
            done += c
            if progress is not None:
                progress(c)
        return total - math.log(k)

    def _context_parts(self, x: Tensor) -> tuple[Tensor | None, Tensor | None]:
        """The autoregressive context's parts that depend on x alone, the same for every z: its first layer's
        output, and (unconditioned) the whole context. (None, None) without a context."""
        first = None if self.context is None else self.context.first(x)
        return first, None if first is None or self.context.conditioned else self.context.rest(first)

    def _log_weights(self, x: Tensor, mu: Tensor, logvar: Tensor, eps: Tensor, first: Tensor | None,
                     context: Tensor | None) -> tuple[Tensor, Tensor]:
        """log p(x|z_i) and log p(z_i) - log q(z_i|x) for z_i = mu + sigma * eps_i, eps (c, B, *latent_shape):
        each (c, B). ``first`` and ``context`` are ``_context_parts(x)``."""
        c, b = eps.shape[:2]
        z = mu + torch.exp(0.5 * logvar) * eps  # (c, B, *latent_shape)
        # log p(z) - log q(z|x); the 1/2 log 2 pi terms cancel, and (z - mu)/sigma is eps itself
        log_prior_ratio = (-0.5 * z**2 + 0.5 * eps**2 + 0.5 * logvar).flatten(2).sum(-1)
        x_rep = x.unsqueeze(0).expand(c, *x.shape).reshape(c * b, *x.shape[1:])
        params = self.decoder(z.reshape(c * b, *mu.shape[1:]))
        if context is not None:
            params = (params.view(c, b, *params.shape[1:]) + context).flatten(0, 1)
        elif first is not None:  # a context conditioned on z: its later layers run once per sample
            h = first.unsqueeze(0).expand(c, *first.shape).reshape(c * b, *first.shape[1:])
            params = params + self.context.rest(h, params)
        return self.likelihood.log_prob(params, x_rep).flatten(1).sum(1).view(c, b), log_prior_ratio

    # ---- using the model -----------------------------------------------------------------------------------

    def sample(self, n: int, *, generator: torch.Generator | None = None, **sampler_options) -> Tensor:
        """n draws z ~ N(0, I) pushed through the decoder, returned as the decoder's mean (see ``decode``).
        A VAE samples in one pass: it takes no sampler options."""
        self.check_sampler_options(sampler_options)
        n = self.check_count(n)
        with torch.no_grad():
            p = next(self.parameters())
            z = draws.randn_from(generator, (n, *self.latent_shape), p.device, p.dtype)
            return self.decode(z, generator=generator)

    def reconstruct(self, x: Tensor) -> Tensor:
        """decode(mu(x)): the decoder's mean at the posterior mean of each example, shape of x."""
        with torch.no_grad():
            self.check_input(x)
            return self.decode(self.encode(x)[0])

    def interpolate(self, x1: Tensor, x2: Tensor, steps: int) -> Tensor:
        """decode((1 - t) mu(x1) + t mu(x2)) for ``steps`` values of t from 0 to 1: linear in latent space.

        x1 and x2 are single examples (*data_shape) -> (steps, *data_shape), or batches (B, *data_shape) of
        pairs -> (B, steps, *data_shape).
        """
        with torch.no_grad():
            if steps < 2:
                raise UserError(f"interpolate needs steps >= 2 (both ends); got {steps}")
            single = tuple(x1.shape) == self.data_shape
            if single:
                x1, x2 = x1.unsqueeze(0), x2.unsqueeze(0)
            self.check_input(x1)
            self.check_input(x2)
            m1, m2 = self.encode(x1)[0], self.encode(x2)[0]
            t = torch.linspace(0.0, 1.0, steps, dtype=m1.dtype, device=m1.device)
            t = t.view(1, steps, *([1] * len(self.latent_shape)))
            z = (1 - t) * m1.unsqueeze(1) + t * m2.unsqueeze(1)  # (B, steps, *latent_shape)
            out = self.decode(z.flatten(0, 1)).view(x1.shape[0], steps, *self.data_shape)
            return out[0] if single else out

    def activity(self, x: Tensor, batch_size: int = 256) -> Tensor:
        """How much each latent dimension is used: the variance over the examples x of its posterior mean,
        Cov_x(E_q(z|x)[z_u]) (Burda et al. 2016, section 5.2: a unit is active above 0.01), flattened: (latent_dim,).
        x may sit on the CPU; it is encoded ``batch_size`` examples at a time on the model's device."""
        device = next(self.parameters()).device
        with torch.no_grad():
            means = [self.encode(x[i : i + batch_size].to(device))[0].flatten(1).double().cpu()
                     for i in range(0, x.shape[0], batch_size)]
        return torch.cat(means).var(0, correction=0)

    def manifold(self, n: int, *, generator: torch.Generator | None = None, dims: tuple[int, int] = (0, 1)) -> Tensor:
        """decode(z) over an n x n grid of two latent dimensions (``dims``: the first two unless told), the others 0:
        (n * n, *data_shape). ``elbox sample --mode manifold`` takes the two most active (``activity``).

        As in Kingma & Welling (2014), figure 4: linearly spaced points of the unit square, (i + 1/2) / n, mapped
        through the inverse CDF of N(0, 1), so the grid covers the prior evenly in probability. A 1-D latent space
        gives one line of n * n points.
        """
        with torch.no_grad():
            if n < 1:
                raise UserError(f"manifold needs a grid size n >= 1; got {n}")
            p = next(self.parameters())
            if self.latent_dim == 1:
                u = (torch.arange(n * n, dtype=p.dtype, device=p.device) + 0.5) / (n * n)
                z = torch.special.ndtri(u).view(n * n, *self.latent_shape)
                return self.decode(z, generator=generator)
            u = (torch.arange(n, dtype=p.dtype, device=p.device) + 0.5) / n
            rows, cols = torch.meshgrid(torch.special.ndtri(u), torch.special.ndtri(u), indexing="ij")
            if len(dims) != 2 or dims[0] == dims[1] or not all(0 <= d < self.latent_dim for d in dims):
                raise UserError(f"manifold dims={tuple(dims)}: give two different latent dimensions of 0 .. "
                                f"{self.latent_dim - 1}")
            z = torch.zeros((n * n, self.latent_dim), dtype=p.dtype, device=p.device)
            z[:, dims[0]], z[:, dims[1]] = cols.flatten(), -rows.flatten()  # the first left to right, the second up
            return self.decode(z.view(n * n, *self.latent_shape), generator=generator)
