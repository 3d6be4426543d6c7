"""The DDPM as an ELBO model: a denoising network wrapped in the Gaussian diffusion of ``diffusion.py``.

Default objective (documented in README): the hybrid loss with learned variances (Nichol & Dhariwal 2021). Ho et
al.'s simple loss with a fixed variance gives the best samples but a poor bound; the hybrid loss keeps the simple
loss's samples and adds a good bound, which elbox reports as bits/dim by default. ``loss="simple"`` with
``var_type="fixed_large"`` is the original DDPM.

What the data is, is declared (``DDPMConfig.data_kind``), not guessed from its shape: "8bit" data (images in [-1, 1] on
the 256-level grid) gets the discretized decoder L_0 of Ho et al. eq. 13 and clipping of the predicted x_0;
"continuous" data (vectors, or a VAE's spatial latents (C, h, w)) gets a Gaussian density for L_0 and no clipping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from elbox import draws
from elbox.errors import UserError
from elbox.objectives.base import ELBOModel, bound_wanted
from elbox.objectives.decoders import check_on_grid
from elbox.objectives.diffusion import (
    GaussianDiffusion,
    LossType,
    MeanType,
    MixedDenoiser,
    Schedule,
    TimestepSampler,
    VarType,
    beta_schedule,
)
from elbox.objectives.gaussian import gaussian_log_prob
from elbox.objectives.terms import Terms, bits_per_dim, log_mean_exp_in_chunks
from elbox.samplers import ancestral_sample, ddim_sample
from elbox.typecheck import check_fields

Sampler = Literal["ancestral", "ddim"]
DataKind = Literal["auto", "8bit", "continuous"]


@dataclass
class DDPMConfig:
    """The DDPM: its schedule, parameterisation, loss and denoising network."""

    timesteps: int = 1000  # T, the number of diffusion steps (Ho et al.: 1000)
    schedule: Schedule = "linear"  # linear (Ho et al.) or cosine (Nichol & Dhariwal)
    beta_start: float = 1e-4  # beta_1 of the linear schedule
    beta_end: float = 0.02  # beta_T of the linear schedule
    mean_type: MeanType = "epsilon"  # what the network predicts: epsilon, x0 or v
    var_type: VarType = "learned"  # Sigma_theta: fixed_small (beta-tilde), fixed_large (beta) or learned
    loss: LossType = "hybrid"  # simple (eps-MSE, Ho eq. 14), vlb (the true bound) or hybrid (simple + lambda vlb)
    hybrid_lambda: float = 0.001  # lambda of the hybrid loss (Nichol & Dhariwal eq. 16)
    timestep_sampler: TimestepSampler = "uniform"  # how t is drawn for the vlb loss: uniform or importance
    net: str = "auto"  # the denoiser: a U-Net preset (micro, tiny, small, ddpm-cifar10), mlp, or auto (tiny; mlp for vectors)
    base_channels: int | None = None  # U-Net width; None keeps the preset's
    dropout: float | None = None  # U-Net dropout; None keeps the preset's
    clip_denoised: bool = True  # clip the predicted x_0 to [-1, 1] when sampling and evaluating (8-bit data only)
    data_kind: DataKind = "auto"  # 8bit (discretized L_0, clipping), continuous (Gaussian L_0) or auto (the data set's kind)
    mixed_prediction: bool = False  # a residual over N(0, I)'s exact denoiser (LSGM); at latent scale 1: N(0, I) at start

    def __post_init__(self) -> None:
        check_fields(self)  # every field its annotated type; a choice (Literal) one of its values
        if not 1 <= self.timesteps <= 100_000:
            raise UserError(f"timesteps={self.timesteps} is not allowed; use an integer from 1 to 100000 (the paper "
                            f"uses 1000)")
        if self.base_channels is not None and not 1 <= self.base_channels <= 4096:
            raise UserError(f"base_channels={self.base_channels} is not allowed; use an integer from 1 to 4096")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise UserError(f"dropout={self.dropout} is not allowed; use a value in [0, 1)")
        if not 0.0 < self.hybrid_lambda:
            raise UserError(f"hybrid_lambda={self.hybrid_lambda} is not allowed; use a value > 0 (paper: 0.001)")
        if self.loss == "hybrid" and self.var_type != "learned":
            raise UserError("loss='hybrid' trains only the variance through its vlb part; use var_type='learned'")
        if self.mixed_prediction and self.data_kind == "8bit":
            raise UserError("mixed_prediction=True starts the model at N(0, I), a prior for continuous latents; 8-bit "
                            "images are not near N(0, I): leave it off, or use data_kind='continuous'")


class DDPM(ELBOModel):
    """A denoising diffusion probabilistic model (Ho et al. 2020) over 8-bit data in [-1, 1] or continuous values."""

    kind = "ddpm"
    sampler_options = ("sampler", "steps", "eta", "progress")
    per_step_terms = True
    has_iwae = True

    def __init__(self, config: DDPMConfig, data_shape: tuple[int, ...]) -> None:
        super().__init__(config, data_shape)
        if config.data_kind == "auto":
            raise UserError("DDPMConfig.data_kind='auto' is resolved from the training data by `elbox train`; "
                            "building a DDPM directly, say what the data is: data_kind='8bit' (images) or 'continuous'")
        self.diffusion = GaussianDiffusion(
            beta_schedule(config.schedule, config.timesteps, config.beta_start, config.beta_end),
            mean_type=config.mean_type,
            var_type=config.var_type,
            loss_type=config.loss,
            hybrid_lambda=config.hybrid_lambda,
            timestep_sampler=config.timestep_sampler,
            decoder="discretized" if self.discrete else "continuous",
        )
        self.net = build_denoiser(config, self.data_shape, self.diffusion.model_output_channels_factor)
        if config.mixed_prediction:
            self.net = MixedDenoiser(self.net, self.diffusion)
        self.clip_denoised = config.clip_denoised and self.discrete

    @property
    def discrete(self) -> bool:
        """8-bit data: the bound is on the probability of the 256-level pixels (Ho et al. eq. 13)."""
        return self.config.data_kind == "8bit"

    def check_values(self, x: Tensor) -> None:
        """8-bit data must lie on the grid its discrete L_0 is over; continuous data may take any values."""
        if self.discrete:
            check_on_grid(x, f"this {self.kind} (data_kind='8bit')")

    @classmethod
    def resolve_config(cls, config: DDPMConfig, data_kind: str) -> DDPMConfig:
        if config.data_kind != "auto":
            return config
        return dataclasses.replace(config, data_kind=data_kind)

    @property
    def data_range(self) -> str:
        return "symmetric"

    @property
    def draws_images(self) -> bool:
        return self.discrete and len(self.data_shape) == 3

    # ------------------------------------------------------------------------------------------ training
    def losses(self, x: Tensor, *, step: int) -> Terms:
        """One stochastic estimate of the bound and the training loss on a batch x_0 (in [-1, 1]).

        The terms are the unbiased single-t estimate of the bound, weight * L_t + L_T (nats), whatever the loss
        (but for the simple loss inside ``loss_only``: it does not need them, so they are left out); the loss is
        L_simple (eq. 14), the bound in bits/dim, or L_simple + lambda L_vlb with the gradient of L_vlb stopped at
        the mean (Nichol & Dhariwal sec. 3.1), i.e. lambda * T * L_t in bits/dim.
        (``step`` is unused: the DDPM's objective has no schedule over training.)
        """
        self.check_input(x)
        d = self.diffusion
        t, weight = d.sample_timesteps(x.shape[0], x.device)
        noise = draws.randn_like(x)
        x_t = d.q_sample(x, t, noise)
        output = self.net(x_t, t)
        mean_out, var_out = d.split_output(output, x)
        mse = (mean_out - d.training_target(x, t, noise)).pow(2).flatten(1).mean(1)
        if d.loss_type == "simple" and not bound_wanted():  # the bound would only be reported: not now
            return Terms(terms={}, dims=self.dims, loss=mse, extras={"mse": mse.detach()},
                         loss_unit="mean squared error per dimension")

        if d.loss_type == "vlb":
            vlb_output = output
        elif d.loss_type == "hybrid":
            vlb_output = torch.cat([mean_out.detach(), var_out], dim=1)  # L_vlb trains Sigma only
        else:
            vlb_output = output.detach()  # reported, not trained on
        l_t, _ = d.vlb_terms(self.net, x, x_t, t, model_output=vlb_output)
        prior = d.prior_kl(x)
        if d.timestep_sampler == "importance":
            d.update_loss_history(t, l_t.detach())

        steps = weight * l_t  # E_t[weight * L_t] = sum_t L_t
        if d.loss_type == "simple":
            loss, unit = mse, "mean squared error per dimension"
        elif d.loss_type == "vlb":
            loss, unit = bits_per_dim(steps + prior, self.dims), "bits/dim"
        else:
            loss, unit = mse + d.hybrid_lambda * bits_per_dim(steps, self.dims), "MSE + lambda bits/dim"
        return Terms(terms={"steps": steps, "prior": prior}, dims=self.dims, loss=loss, extras={"mse": mse.detach()},
                     loss_unit=unit)

    def bound_estimate(self, x: Tensor) -> Terms:
        """One unbiased single-t estimate of the bound on x, weight * L_t + L_T (nats, the terms of ``losses``),
        differentiable in x but not in the network's weights: the network runs on detached copies of them, in
        eval mode (no dropout), as ``bound`` runs it.

        This is the gradient end-to-end latent diffusion sends to a VAE's encoder through the cross-entropy
        E_q(z|x)[L_DDPM(z)] (LSGM, Vahdat et al. 2021, eq. 5): x_t = sqrt(abar) x + sqrt(1 - abar) eps is
        reparameterised, so the gradient of the estimate is an unbiased estimate of the bound's gradient in x; the
        prior itself keeps training on its own loss (``losses``), as LSGM trains its score model.
        """
        d = self.diffusion
        t, weight = d.sample_timesteps(x.shape[0], x.device)
        x_t = d.q_sample(x, t, draws.randn_like(x))
        detached = {name: p.detach() for name, p in self.net.named_parameters()}
        was_training = self.net.training
        self.net.eval()  # the bound's own network: no dropout, as when the bound is evaluated
        try:
            output = torch.func.functional_call(self.net, detached, (x_t, t))
        finally:
            self.net.train(was_training)
        l_t, _ = d.vlb_terms(self.net, x, x_t, t, clip_denoised=self.clip_denoised, model_output=output)
        return Terms(terms={"steps": weight * l_t, "prior": d.prior_kl(x)}, dims=self.dims)

    # ---------------------------------------------------------------------------------------- evaluation
    def bound(self, x: Tensor, *, generator: torch.Generator | None = None) -> Terms:
        """The full variational bound on x_0, every timestep computed (no sampling of t), in nats per example:

        decoder_nll = L_0, kl = (L_1 .. L_{T-1}) one column per step (t = 2..T in the paper's 1-indexing),
        prior = L_T (Ho et al. eq. 5). Each L_t uses one draw of x_t ~ q(x_t | x_0), as in Nichol & Dhariwal.
        """
        self.check_input(x)
        with torch.no_grad():
            d = self.diffusion
            per_step = []
            for i in range(d.num_timesteps):
                t = torch.full((), i, device=x.device)  # one t for the batch; a fill, not a host copy
                x_t = d.q_sample(x, t, draws.randn_from(generator, x.shape, x.device, x.dtype))
                l_t, _ = d.vlb_terms(self.net, x, x_t, t, clip_denoised=self.clip_denoised)
                per_step.append(l_t.float())
            # the paper's names: L_0 is the decoder, L_{t-1} the KL at step t = 2..T, L_T the prior term
            terms = {"decoder_nll": per_step[0]}
            columns = {"decoder_nll": ("L_0",), "prior": ("L_T",)}
            if len(per_step) > 1:
                terms["kl"] = torch.stack(per_step[1:], dim=1)
                columns["kl"] = tuple(f"L_{t}" for t in range(1, len(per_step)))
            terms["prior"] = d.prior_kl(x).float()
            return Terms(terms=terms, dims=self.dims, columns=columns, steps=tuple(terms))

    def trajectory_log_weight(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """log p_theta(x_{0:T}) - log q(x_{1:T} | x_0) for one forward trajectory x_{1:T} ~ q( . | x_0), in nats, (B,).

        Its exponential is an unbiased estimate of p_theta(x_0): E_q[p_theta(x_{0:T}) / q(x_{1:T} | x_0)] =
        integral of p_theta(x_{0:T}) over x_{1:T} = p_theta(x_0). So a log-mean-exp of K of them is a lower bound on
        log p_theta(x_0) that tightens as K grows (Burda et al. 2016, with whole trajectories as the latent), and
        its K = 1 expectation is minus the bound of Ho et al. eq. 5 (which ``bound`` computes term by term, each
        KL in closed form). The trajectory is drawn step by step and scored as it goes: two x_t in memory.
        """
        with torch.no_grad():
            d = self.diffusion
            log_w = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
            x_prev = x
            for i in range(d.num_timesteps):  # index i: the paper's t = i + 1
                t = torch.full((), i, device=x.device)  # one t for the batch; a fill, not a host copy
                noise = draws.randn_from(generator, x.shape, x.device, x.dtype)
                # q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I), Ho et al. eq. 2
                mean_q = d._extract(torch.sqrt(1.0 - d.betas), t, x) * x_prev
                log_beta = d._extract(d.log_betas, t, x).expand_as(x)
                x_t = mean_q + torch.exp(0.5 * log_beta) * noise
                log_w -= d._sum_dims(gaussian_log_prob(x_t, mean_q, log_beta)).double()
                # p_theta(x_{t-1} | x_t): the decoder L_0 at t = 1 (discretized for 8-bit data), a Gaussian after
                out = d.p_mean_variance(self.net, x_t, t, clip_denoised=self.clip_denoised)
                if i == 0:
                    log_w -= d.decoder_nll(x, out["mean"], out["log_variance"]).double()
                else:
                    log_w += d._sum_dims(gaussian_log_prob(x_prev, out["mean"], out["log_variance"])).double()
                x_prev = x_t
            # p(x_T) = N(0, I)
            log_w += d._sum_dims(gaussian_log_prob(x_prev, torch.zeros_like(x_prev), torch.zeros_like(x_prev))).double()
            return log_w

    @property
    def iwae_passes(self) -> int:
        return self.diffusion.num_timesteps  # one trajectory: a network pass per step

    def iwae_bound(self, x: Tensor, k: int, *, generator: torch.Generator | None = None, chunk: int = 16,
                   progress: Callable[[int], None] | None = None) -> Tensor:
        """log p_theta(x_0) estimated with k importance-weighted trajectories (``trajectory_log_weight``), (B,)."""
        self.check_input(x)
        return log_mean_exp_in_chunks(lambda n: self.trajectory_log_weight(x.repeat(n, *([1] * (x.dim() - 1))),
                                                                         generator=generator).view(n, x.shape[0]),
                                      k, chunk, progress)

    # ------------------------------------------------------------------------------------------ sampling
    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        sampler: Sampler = "ancestral",
        steps: int | None = None,
        eta: float = 0.0,
        progress=None,
    ) -> Tensor:
        """n samples in [-1, 1] (8-bit data) or in data space (continuous), by ancestral sampling or DDIM."""
        n = self.check_count(n)
        with torch.no_grad():
            p = next(self.parameters())
            device, dtype = p.device, p.dtype
            shape = (n, *self.data_shape)
            if sampler == "ancestral":
                if steps not in (None, self.diffusion.num_timesteps):
                    raise UserError(f"ancestral sampling runs all T={self.diffusion.num_timesteps} steps; "
                                    f"use --sampler ddim for steps={steps}")
                if eta != 0:
                    raise UserError(f"eta={eta} is DDIM's (Song et al. eq. 16); ancestral sampling has none: use "
                                    f"--sampler ddim with --eta")
                return ancestral_sample(self.diffusion, self.net, shape, generator=generator, device=device,
                                        dtype=dtype, clip_denoised=self.clip_denoised, progress=progress)
            if sampler == "ddim":
                return ddim_sample(self.diffusion, self.net, shape, steps=steps, eta=eta, generator=generator,
                                   device=device, dtype=dtype, clip_denoised=self.clip_denoised, progress=progress)
            raise UserError(f"unknown sampler {sampler!r}; choose ancestral or ddim")


def build_denoiser(config: DDPMConfig, data_shape: tuple[int, ...], out_factor: int) -> torch.nn.Module:
    """The network eps_theta(x_t, t): a U-Net for images (C, H, W), an MLP for vectors (D,)."""
    from elbox.nets.mlp import MLPDenoiser
    from elbox.nets.unet import UNET_PRESETS, UNet

    net = config.net if config.net != "auto" else ("mlp" if len(data_shape) == 1 else "tiny")
    config = dataclasses.replace(config, net=net)
    if len(data_shape) == 1:
        if config.net != "mlp":
            raise UserError(f"net={config.net!r} is a U-Net preset, for images; vector data of shape {tuple(data_shape)} needs net='mlp'")
        return MLPDenoiser(dim=data_shape[0], out_dim=data_shape[0] * out_factor)
    if config.net not in UNET_PRESETS:
        raise UserError(f"net={config.net!r} is not a U-Net preset; choose one of {', '.join(UNET_PRESETS)} (or mlp for vector data)")
    kwargs = dict(UNET_PRESETS[config.net])
    if config.base_channels is not None:
        kwargs["base_channels"] = config.base_channels
    if config.dropout is not None:
        kwargs["dropout"] = config.dropout
    channels, size = data_shape[0], data_shape[1]
    if data_shape[1] != data_shape[2]:
        raise UserError(f"images of {data_shape[1]}x{data_shape[2]} are not square; the U-Net needs square images (use --image-size)")
    return UNet(image_size=size, in_channels=channels, out_channels=channels * out_factor, **kwargs)
