"""Latent diffusion as an ELBO model: a DDPM prior over the latents of a trained VAE, with its own bound.

Two stages, as Rombach et al. 2022: first a VAE, then a DDPM trained on z ~ q(z|x) (a fresh draw per example and
step, not only the mean). Unlike Rombach et al. (and diffusers), the model keeps a true bound on -log p(x), in
the same nats and bits/dim as the VAE and the DDPM:

    -log p(x) <= E_q(z|x)[-log p(x|z)] - H[q(z|x)] + E_q(z|x)[-log p(z)]                    (the VAE bound, with
    -log p(z) <= L_DDPM(s z) - d log s                                                     the KL written as a
                                                                                           cross-entropy)

This is the VAE's bound with KL(q || N(0, I)) replaced by the cross-entropy against the DDPM prior (Vahdat, Kreis
& Kautz 2021, LSGM, eq. 5). L_DDPM is the DDPM's full variational bound on continuous values (a Gaussian L_0,
Ho et al. eq. 5), and s is the latent scale factor (Rombach et al. sec. 4.3.2 and appendix G: the latents are
multiplied by s = 1 / std(z) so that the diffusion sees unit variance): p(z) = p_DDPM(s z) s^d, whose log-Jacobian
d log s enters the bound as the term ``log_scale`` = -d log s.

The terms (nats per example): ``decoder_nll`` = -log p(x|z) at one z ~ q(z|x), ``neg_entropy`` = -H[q(z|x)] (in
closed form: -1/2 sum(1 + log 2 pi + log sigma^2)), ``log_scale``, and the prior's terms under ``prior/``
(``prior/decoder_nll`` = L_0, ``prior/kl`` = L_1 .. L_{T-1}, ``prior/prior`` = L_T). The model *holds* a VAE and a
DDPM and calls their public methods only.

End to end (``end_to_end``; LSGM sec. 3), the VAE trains too, on that same bound: the prior's cross-entropy term
reaches the encoder through z (``DDPM.bound_estimate``), while the prior trains on its own loss at z detached. The
scale s stays as measured at the start: the bound stays exact in s, though s no longer makes z's variance one
once the encoder has moved.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from elbox import draws
from elbox.errors import UserError, a_model
from elbox.objectives.base import ELBOModel, loss_only
from elbox.objectives.ddpm import DDPM, DataKind, DDPMConfig, Sampler
from elbox.objectives.gaussian import LOG_2PI, gaussian_log_prob
from elbox.objectives.terms import Terms, bits_per_dim, log_mean_exp_in_chunks
from elbox.objectives.vae import VAE, VAEConfig


@dataclass
class LDMConfig(DDPMConfig):
    """Latent diffusion: a DDPM prior (its settings as ``elbox train ddpm``'s) over a trained VAE's latents."""

    vae: str = ""  # the run folder (or checkpoint) of the trained VAE whose latents the DDPM models
    latent_scale: float = 0.0  # the latents are multiplied by this before diffusion; 0: 1 / their std, measured once
    vae_config: str = ""  # filled in by `elbox train`: the VAE's description (JSON), so that a checkpoint is complete
    end_to_end: bool = False  # also train the VAE, on the whole bound (LSGM); off: two stages, the VAE frozen
    net: str = "mlp"  # the denoiser: mlp (vector latents) or a U-Net preset (spatial latents of a conv VAE)
    data_kind: DataKind = "continuous"  # latents are continuous values: a Gaussian L_0, no clipping (fixed for the LDM)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.data_kind != "continuous":
            raise UserError(f"data_kind={self.data_kind!r}: the latents of a VAE are continuous; leave data_kind unset")
        if not (self.latent_scale >= 0 and math.isfinite(self.latent_scale)):
            raise UserError(f"latent_scale={self.latent_scale} is not allowed; use a number > 0, or 0 to measure it")

    def prior_config(self) -> DDPMConfig:
        """The settings of the DDPM prior: every DDPMConfig field of this config."""
        names = {f.name for f in dataclasses.fields(DDPMConfig)}
        return DDPMConfig(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})


class LDM(ELBOModel):
    """A DDPM prior over the latents z of a VAE (frozen, or trained with it end to end); samples are the VAE's
    decodings of the DDPM's draws."""

    kind = "ldm"
    sample_modes = ("prior", "reconstruct")
    sampler_options = DDPM.sampler_options
    per_step_terms = True
    has_iwae = True

    def __init__(self, config: LDMConfig, data_shape: tuple[int, ...], *, vae: VAE | None = None) -> None:
        super().__init__(config, data_shape)
        if vae is None:
            if not config.vae_config:
                raise UserError("latent diffusion needs a trained VAE: `elbox train ldm --vae RUN_OF_A_VAE`")
            desc = json.loads(config.vae_config)
            vae = VAE(VAEConfig(**desc["config"]), tuple(desc["data_shape"]))
        if vae.data_shape != self.data_shape:
            raise UserError(f"the VAE was trained on data of shape {vae.data_shape}, not {self.data_shape}; train the "
                            f"latent diffusion model on the VAE's data (its --data, --image-size, --channels)")
        # two stages: the VAE frozen, the prior trained alone; end to end: the VAE trained too, on the whole bound
        self.vae = vae.eval().requires_grad_(config.end_to_end)
        self.prior = DDPM(config.prior_config(), vae.latent_shape)
        # s, stored with the weights: a measured scale must survive a checkpoint
        self.register_buffer("latent_scale", torch.tensor(config.latent_scale or 1.0, dtype=torch.float64))

    @classmethod
    def resolve_config(cls, config: LDMConfig, data_kind: str) -> LDMConfig:
        """Read the VAE's description from its run, so the LDM's checkpoint can rebuild it without that run."""
        if config.vae_config:
            return config
        if not config.vae:
            raise UserError("latent diffusion needs a trained VAE: `elbox train ldm --vae RUN_OF_A_VAE`")
        from elbox import checkpoint as ckpt

        desc = ckpt.load_checkpoint(config.vae, with_training_state=False).description
        if desc["kind"] != "vae":
            raise UserError(f"--vae {config.vae} is a run of {a_model(desc['kind'])}, not a VAE; latent diffusion "
                            f"needs a VAE run")
        vae_config = json.dumps({"config": desc["config"], "data_shape": desc["data_shape"]})
        # the VAE's folder as an absolute path: config.toml then repeats the run from any working directory
        return dataclasses.replace(config, vae_config=vae_config, vae=str(Path(config.vae).resolve()))

    def initialize(self, x: Tensor) -> None:
        """A new run starts from the trained VAE's weights (its EMA weights when it has them) and, with
        ``latent_scale`` 0, measures s = 1 / std(z) over z ~ q(z|x) for the batch x (Rombach et al. appendix G)."""
        from elbox import checkpoint as ckpt

        state = ckpt.load_checkpoint(self.config.vae, with_training_state=False)
        weights = state.ema if state.ema is not None else state.model
        ckpt.load_weights(self.vae, weights, state.path)
        if self.config.latent_scale == 0:
            with torch.no_grad():
                z = self._encode(x.to(self.latent_scale.device), None)[0]
                self.latent_scale.fill_(1.0 / float(z.double().std()))
            self.config = dataclasses.replace(self.config, latent_scale=float(self.latent_scale))

    # ---- the pieces ----------------------------------------------------------------------------------------
    @property
    def data_range(self) -> str:
        return self.vae.data_range

    @property
    def draws_images(self) -> bool:
        return self.vae.draws_images

    @property
    def discrete(self) -> bool:
        return self.vae.discrete

    def check_values(self, x: Tensor) -> None:
        self.vae.check_values(x)  # x is the VAE's data: its likelihood says what values it takes

    def train(self, mode: bool = True) -> "LDM":
        super().train(mode)
        if not self.config.end_to_end:
            self.vae.eval()  # frozen, whatever the trainer asks
        return self

    def _encode(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """z ~ q(z|x) by reparameterisation (from the trainer's stream, or ``generator``) and log sigma^2;
        differentiable in the encoder's weights only end to end."""
        with torch.set_grad_enabled(self.config.end_to_end and torch.is_grad_enabled()):
            mu, logvar = self.vae.encode(x)
        eps = draws.randn_like(mu) if generator is None else draws.randn_from(generator, mu.shape, mu.device, mu.dtype)
        return mu + torch.exp(0.5 * logvar) * eps, logvar

    def _vae_terms(self, x: Tensor, z: Tensor, logvar: Tensor) -> dict[str, Tensor]:
        s = self.latent_scale.to(z.dtype)
        d = z[0].numel()
        with torch.set_grad_enabled(self.config.end_to_end and torch.is_grad_enabled()):
            decoder_nll = -self.vae.log_px_given_z(x, z)
        # -H[N(mu, sigma^2)] = -1/2 sum(1 + log 2 pi + log sigma^2), in closed form
        neg_entropy = -0.5 * (1.0 + LOG_2PI + logvar).flatten(1).sum(1)
        # p(z) = p_DDPM(s z) s^d: the change of variables adds -d log s to -log p(z)
        # (-d log s, on the device: computed in float64 from log s as the host would, then cast; nothing read back)
        log_scale = (torch.log(s).double() * -d).to(neg_entropy.dtype).expand_as(neg_entropy).contiguous()
        return {"decoder_nll": decoder_nll, "neg_entropy": neg_entropy, "log_scale": log_scale}

    # ---- the contract --------------------------------------------------------------------------------------
    def losses(self, x: Tensor, *, step: int) -> Terms:
        """The prior's training loss on s z, z ~ q(z|x); the terms are an unbiased estimate of the whole bound.

        End to end, the loss adds that estimate in bits/dim, its gradient reaching the VAE (through z and the
        decoder) but not the prior's weights (``DDPM.bound_estimate``), which train on the prior's own loss alone:
        LSGM's split (Vahdat et al. 2021, sec. 3), with the likelihood weighting for the VAE, so that the VAE
        maximises the very bound that is reported.
        """
        self.check_input(x)
        z, logvar = self._encode(x, None)
        s = self.latent_scale.to(z.dtype)
        if not self.config.end_to_end:
            prior = self.prior.losses(z * s, step=step)
            if not prior.has_bound:  # loss_only, and the prior's loss needs none: nor the VAE's half (a decoder pass)
                return dataclasses.replace(prior.prefixed("prior"), dims=self.dims)
            own = Terms(terms=self._vae_terms(x, z, logvar), dims=self.dims)
            return Terms.merge([own, prior.prefixed("prior")], dims=self.dims, loss=prior.loss,
                               loss_unit=prior.loss_unit)
        own = Terms(terms=self._vae_terms(x, z, logvar), dims=self.dims)
        with loss_only():  # its terms would be dropped: the bound here is bound_estimate's
            prior = self.prior.losses((z * s).detach(), step=step)
        bound = Terms.merge([own, self.prior.bound_estimate(z * s).prefixed("prior")], dims=self.dims)
        return dataclasses.replace(bound, loss=prior.loss + bits_per_dim(bound.nll, self.dims),
                                   loss_unit=f"the prior's {prior.loss_unit} + the bound in bits/dim",
                                   extras=prior.prefixed("prior").extras)

    def bound(self, x: Tensor, *, generator: torch.Generator | None = None) -> Terms:
        """The negative ELBO on x in nats, with the prior's bound computed over every timestep at one z ~ q(z|x)."""
        self.check_input(x)
        with torch.no_grad():
            z, logvar = self._encode(x, generator)
            prior = self.prior.bound(z * self.latent_scale.to(z.dtype), generator=generator)
            own = Terms(terms=self._vae_terms(x, z, logvar), dims=self.dims)
            return Terms.merge([own, prior.prefixed("prior")], dims=self.dims)

    @property
    def iwae_passes(self) -> int:
        return self.prior.iwae_passes + 1  # the prior's trajectory and the VAE's decoder

    def iwae_bound(self, x: Tensor, k: int, *, generator: torch.Generator | None = None, chunk: int = 16,
                   progress: Callable[[int], None] | None = None) -> Tensor:
        """log p(x) estimated with k importance samples of (z, a diffusion trajectory of s z), shape (B,).

        The weights are p(x|z) p_DDPM(z'_{0:T}) s^d / (q(z|x) q(z'_{1:T} | z'_0)) with z ~ q(z|x), z'_0 = s z and
        z'_{1:T} drawn by the forward process; their expectation is the integral of p(x|z) p_DDPM(s z) s^d over
        z, which is p(x). So the log-mean-exp of k of them is a lower bound on log p(x) in expectation (Jensen,
        Burda et al. 2016) that tightens as k grows. (A log-mean-exp of k *stochastic estimates of the DDPM's
        bound* would not be one: each is only a bound on log p(z) in expectation, and the log-mean-exp of bounds
        can exceed log p(x).)
        """
        self.check_input(x)
        with torch.no_grad():
            mu, logvar = self.vae.encode(x)
            s = self.latent_scale.to(mu.dtype)

            def log_weights(n: int) -> Tensor:
                reps = (n, *([1] * (mu.dim() - 1)))
                mu_n, logvar_n = mu.repeat(reps), logvar.repeat(reps)
                z = mu_n + torch.exp(0.5 * logvar_n) * draws.randn_from(generator, mu_n.shape, mu.device, mu.dtype)
                log_q = gaussian_log_prob(z, mu_n, logvar_n).flatten(1).sum(1)
                log_px = self.vae.log_px_given_z(x.repeat(n, *([1] * (x.dim() - 1))), z)
                log_pz = self.prior.trajectory_log_weight(z * s, generator=generator) + z[0].numel() * torch.log(s)
                return (log_px.double() + log_pz - log_q.double()).view(n, x.shape[0])

            return log_mean_exp_in_chunks(log_weights, k, chunk, progress)

    def sample(self, n: int, *, generator: torch.Generator | None = None, sampler: Sampler = "ancestral",
               steps: int | None = None, eta: float = 0.0, progress: Any = None) -> Tensor:
        """z' from the DDPM (ancestral or DDIM), z = z' / s, decoded by the VAE (its mean, as ``VAE.sample``)."""
        n = self.check_count(n)
        with torch.no_grad():
            z = self.prior.sample(n, generator=generator, sampler=sampler, steps=steps, eta=eta, progress=progress)
            return self.vae.decode(z / self.latent_scale.to(z.dtype), generator=generator)

    def reconstruct(self, x: Tensor) -> Tensor:
        """The VAE's reconstruction (the prior plays no part in it)."""
        return self.vae.reconstruct(x)
