"""The Gaussian diffusion process of Ho et al. 2020 and its variational bound — the math, with no network inside.

Every method that needs the denoiser takes it as an argument (``net(x_t, t)``); the network knows nothing of the
schedule. ``t`` is (B,) in training (a timestep per example) and a scalar in the samplers and the full bound (one
step for the whole batch, as diffusers' pipelines pass it): a network must take both, and may embed a scalar once. Notation follows the papers: ``x_start`` is x_0, ``betas`` are beta_t, ``alphas_cumprod`` is alpha-bar_t.
Timesteps are 0-indexed: index t = 0..T-1 stands for the paper's t = 1..T.

References
- Ho, Jain, Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): eq. 4 (q(x_t|x_0)), eq. 5 (the bound),
  eq. 6-7 (the posterior), eq. 11 (epsilon parameterisation), eq. 13 (discretized decoder), eq. 14 (L_simple).
- Nichol & Dhariwal 2021, "Improved DDPM": eq. 15 (learned variance interpolation), eq. 16 (L_hybrid),
  eq. 17 (cosine schedule), section 3.3 (importance sampling of t).
- Salimans & Ho 2022: the v parameterisation.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from elbox import draws
from elbox.errors import UserError
from elbox.objectives.gaussian import discretized_gaussian_log_likelihood, gaussian_log_prob, normal_kl

Schedule = Literal["linear", "cosine"]
MeanType = Literal["epsilon", "x0", "v"]
VarType = Literal["fixed_small", "fixed_large", "learned"]
LossType = Literal["simple", "vlb", "hybrid"]
TimestepSampler = Literal["uniform", "importance"]
Decoder = Literal["discretized", "continuous"]


def beta_schedule(name: Schedule, timesteps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """beta_1..beta_T in float64.

    linear: evenly spaced from beta_start to beta_end (Ho et al. sec. 4: 1e-4 to 0.02, T = 1000).
    cosine: alpha-bar(t) = cos^2(((t/T + s) / (1 + s)) pi/2), s = 0.008, beta_t = 1 - alpha-bar(t)/alpha-bar(t-1)
            clipped at 0.999 (Nichol & Dhariwal eq. 17).
    """
    if timesteps < 1:
        raise UserError(f"timesteps={timesteps} is not allowed; use an integer >= 1 (the paper uses 1000)")
    if name == "linear":
        if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
            raise UserError(f"beta_start={beta_start}, beta_end={beta_end}: both betas must lie in (0, 1)")
        return np.linspace(beta_start, beta_end, timesteps, dtype=np.float64)
    if name == "cosine":
        s = 0.008
        steps = np.arange(timesteps + 1, dtype=np.float64) / timesteps
        alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        return np.minimum(1.0 - alpha_bar[1:] / alpha_bar[:-1], 0.999)
    raise UserError(f"unknown schedule {name!r}; choose one of {', '.join(get_args(Schedule))}")


def _check_choice(name: str, value: str, allowed: object) -> None:
    options = get_args(allowed)
    if value not in options:
        raise UserError(f"{name}={value!r} is not known; choose one of {', '.join(options)}")


class GaussianDiffusion(nn.Module):
    """The forward process q, the reverse process p_theta around a given network, and the variational bound.

    All schedule quantities are computed in float64 (alpha-bar_T and L_T are where float32 bites) and kept as
    float64 buffers; they are cast to the data's dtype when used. They are derived from the config, so they are
    not saved in checkpoints; only the importance-sampling loss history is.
    """

    def __init__(
        self,
        betas: np.ndarray,
        *,
        mean_type: MeanType = "epsilon",
        var_type: VarType = "learned",
        loss_type: LossType = "hybrid",
        hybrid_lambda: float = 0.001,
        timestep_sampler: TimestepSampler = "uniform",
        decoder: Decoder = "discretized",
    ) -> None:
        super().__init__()
        _check_choice("mean_type", mean_type, MeanType)
        _check_choice("var_type", var_type, VarType)
        _check_choice("loss", loss_type, LossType)
        _check_choice("timestep_sampler", timestep_sampler, TimestepSampler)
        _check_choice("decoder", decoder, Decoder)
        if np.any(betas <= 0) or np.any(betas >= 1):
            raise UserError("every beta_t must lie in (0, 1); check beta_start and beta_end")
        if timestep_sampler == "importance" and loss_type != "vlb":
            raise UserError("timestep_sampler='importance' needs loss='vlb' (Nichol & Dhariwal sec. 3.3)")
        if loss_type == "simple" and var_type == "learned":
            raise UserError("var_type='learned' needs loss='vlb' or 'hybrid': the simple loss gives the variance no signal")
        self.mean_type, self.var_type, self.loss_type = mean_type, var_type, loss_type
        self.hybrid_lambda = float(hybrid_lambda)
        self.timestep_sampler, self.decoder = timestep_sampler, decoder
        self.num_timesteps = T = int(betas.shape[0])

        alphas = 1.0 - betas
        alphas_cumprod = np.cumprod(alphas)
        alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
        # Posterior q(x_{t-1} | x_t, x_0) = N(mean, beta-tilde_t I), Ho et al. eq. 6-7.
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta-tilde_1 = 0; its log is clipped to beta-tilde_2 (the t = 1 mean is the decoder's, not a KL's).
        posterior_log_variance_clipped = np.log(np.append(posterior_variance[1], posterior_variance[1:])) if T > 1 else np.log(betas)
        buffers = {
            "betas": betas,
            "alphas_cumprod": alphas_cumprod,
            "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
            "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
            "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
            "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
            "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1.0),
            "posterior_variance": posterior_variance,
            "posterior_log_variance_clipped": posterior_log_variance_clipped,
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
            # Sigma_t = beta_t ("fixed_large"), with beta-tilde_2 at t = 1 so that L_0 is not needlessly broad
            # (as in Nichol & Dhariwal's code); log beta_t is also the upper end of the learned range (eq. 15).
            "log_betas": np.log(betas),
            "fixed_large_log_variance": np.log(np.append(posterior_variance[1], betas[1:])) if T > 1 else np.log(betas),
        }
        for name, value in buffers.items():
            self.register_buffer(name, torch.from_numpy(np.asarray(value, dtype=np.float64)), persistent=False)
        # Importance sampling of t (Nichol & Dhariwal sec. 3.3): the last 10 values of L_t for each t.
        self.register_buffer("loss_history", torch.zeros(T, 10, dtype=torch.float64))
        self.register_buffer("loss_history_count", torch.zeros(T, dtype=torch.long))
        self._history_full = False  # remembered once true (``history_full``); a loaded history is looked at anew
        self.register_load_state_dict_post_hook(_look_at_the_history_anew)  # a function: the module still pickles

    # ----------------------------------------------------------------------------------------------- helpers
    @property
    def model_output_channels_factor(self) -> int:
        """How many values per data dimension the network must output: 2 with a learned variance, else 1."""
        return 2 if self.var_type == "learned" else 1

    @staticmethod
    def _extract(arr: Tensor, t: Tensor, x: Tensor) -> Tensor:
        """arr[t] shaped to broadcast against x (B, ...), in x's dtype; t is (B,) or a scalar shared by the batch."""
        out = arr.to(x.device)[t].to(x.dtype)
        return out.reshape(t.shape[0] if t.ndim else 1, *([1] * (x.dim() - 1)))

    @staticmethod
    def _sum_dims(x: Tensor) -> Tensor:
        return x.flatten(1).sum(1)

    # ------------------------------------------------------------------------------------- forward process q
    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I), eq. 4."""
        mean = self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = self._extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = self._extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """Draw x_t ~ q(x_t | x_0) by reparameterisation: sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise
        )

    def q_posterior_mean_variance(self, x_start: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0), Ho et al. eq. 6-7."""
        mean = (
            self._extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self._extract(self.posterior_mean_coef2, t, x_t) * x_t
        )
        variance = self._extract(self.posterior_variance, t, x_t)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t)
        return mean, variance, log_variance

    # ------------------------------------------------------------------------------------- reverse process p
    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x_0 = (x_t - sqrt(1 - alpha-bar_t) eps) / sqrt(alpha-bar_t), eq. 4 solved for x_0."""
        return self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        ) * eps

    def predict_noise_from_start(self, x_t: Tensor, t: Tensor, x_start: Tensor) -> Tensor:
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x_start) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, x_t
        )

    def predict_start_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """v = sqrt(alpha-bar) eps - sqrt(1 - alpha-bar) x_0  =>  x_0 = sqrt(alpha-bar) x_t - sqrt(1 - alpha-bar) v."""
        return self._extract(self.sqrt_alphas_cumprod, t, x_t) * x_t - self._extract(
            self.sqrt_one_minus_alphas_cumprod, t, x_t
        ) * v

    def training_target(self, x_start: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """What the network regresses on under the simple loss: eps, x_0 or v."""
        if self.mean_type == "epsilon":
            return noise
        if self.mean_type == "x0":
            return x_start
        return self._extract(self.sqrt_alphas_cumprod, t, x_start) * noise - self._extract(
            self.sqrt_one_minus_alphas_cumprod, t, x_start
        ) * x_start

    def split_output(self, out: Tensor, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Split the network output into the mean part and, with a learned variance, the interpolation value v."""
        if self.var_type != "learned":
            return out, None
        return torch.split(out, x.shape[1], dim=1)

    def p_mean_variance(
        self, net: nn.Module, x_t: Tensor, t: Tensor, *, clip_denoised: bool = False, model_output: Tensor | None = None
    ) -> dict[str, Tensor]:
        """The reverse step p_theta(x_{t-1} | x_t) = N(mu_theta(x_t, t), Sigma_theta(x_t, t)).

        mu_theta is the posterior mean of eq. 7 evaluated at the predicted x_0 (for epsilon prediction that is
        eq. 11). Sigma_theta is beta-tilde_t ("fixed_small"), beta_t ("fixed_large") or, learned, the
        interpolation exp(v log beta_t + (1 - v) log beta-tilde_t) with v = (output + 1) / 2 (Nichol & Dhariwal
        eq. 15). ``model_output`` lets the caller pass an already computed (e.g. partly detached) output.
        """
        if model_output is None:
            model_output = net(x_t, t)
        mean_out, var_out = self.split_output(model_output, x_t)
        if self.var_type == "learned":
            min_log = self._extract(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._extract(self.log_betas, t, x_t)
            frac = (var_out + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        elif self.var_type == "fixed_large":
            log_variance = self._extract(self.fixed_large_log_variance, t, x_t).expand_as(x_t)
        else:
            log_variance = self._extract(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

        if self.mean_type == "epsilon":
            pred_x_start = self.predict_start_from_noise(x_t, t, mean_out)
        elif self.mean_type == "x0":
            pred_x_start = mean_out
        else:
            pred_x_start = self.predict_start_from_v(x_t, t, mean_out)
        if clip_denoised:
            pred_x_start = pred_x_start.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_x_start, x_t, t)
        return {"mean": mean, "log_variance": log_variance, "pred_x_start": pred_x_start, "model_output": mean_out}

    # ----------------------------------------------------------------------------------------- the bound
    def decoder_nll(self, x_start: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
        """L_0 = -log p_theta(x_0 | x_1) in nats per example (eq. 13 for 8-bit images; a density for vectors)."""
        if self.decoder == "discretized":
            return -self._sum_dims(discretized_gaussian_log_likelihood(x_start, mean, 0.5 * log_variance))
        return -self._sum_dims(gaussian_log_prob(x_start, mean, log_variance))

    def vlb_terms(
        self, net: nn.Module, x_start: Tensor, x_t: Tensor, t: Tensor, *, clip_denoised: bool = False,
        model_output: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The bound's term at step t, in nats per example: L_0 where t = 0, else
        L_{t} = KL(q(x_{t-1} | x_t, x_0) || p_theta(x_{t-1} | x_t)) (Ho et al. eq. 5)."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance(net, x_t, t, clip_denoised=clip_denoised, model_output=model_output)
        kl = self._sum_dims(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"]))
        nll = self.decoder_nll(x_start, out["mean"], out["log_variance"])
        return torch.where(t == 0, nll, kl), out

    def prior_kl(self, x_start: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x_0) || N(0, I)) in nats per example. No parameters; tiny for a good schedule."""
        t = torch.full((x_start.shape[0],), self.num_timesteps - 1, device=x_start.device, dtype=torch.long)
        mean, _, log_variance = self.q_mean_variance(x_start.double(), t)
        return self._sum_dims(normal_kl(mean, log_variance, torch.zeros_like(mean), torch.zeros_like(mean))).to(x_start.dtype)

    # ----------------------------------------------------------------------------------- timestep sampling
    def sample_timesteps(self, batch_size: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """Draw t for a batch and return (t, weight) with E[weight * L_t] = sum_t L_t / T... times T, i.e. an
        unbiased estimate of sum_t L_t is weight * L_t (uniform: weight = T; importance: 1 / p(t))."""
        T = self.num_timesteps
        if self.timestep_sampler == "importance" and self.history_full():
            # p(t) ∝ sqrt(E[L_t^2]) over the stored history, mixed with a little uniform mass.
            weights = torch.sqrt((self.loss_history**2).mean(dim=1))
            probs = weights / weights.sum() * (1 - 1e-3) + 1e-3 / T
            t = draws.multinomial(probs.float(), batch_size).to(device)
            return t, (1.0 / probs.to(device)[t]).float()
        t = draws.randint(T, batch_size, device)
        return t, torch.full((batch_size,), float(T), device=device)

    def update_loss_history(self, t: Tensor, losses: Tensor) -> None:
        """Record L_t values for importance sampling; with several processes, every rank records every value."""
        with torch.no_grad():
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                t_all = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
                l_all = [torch.zeros_like(losses) for _ in range(dist.get_world_size())]
                dist.all_gather(t_all, t)
                dist.all_gather(l_all, losses)
                t, losses = torch.cat(t_all), torch.cat(l_all)
            self._record(t.reshape(-1).long(), losses.reshape(-1).double())

    def _record(self, t: Tensor, losses: Tensor) -> None:
        """Append each L_t (in the batch's order) to its step's last-10 history, on the device: the same result as
        appending them one by one, without reading anything back (a read would make a GPU step wait)."""
        T, keep = self.loss_history.shape
        history, count = self.loss_history, self.loss_history_count
        n = torch.zeros_like(count).index_add_(0, t, torch.ones_like(t))  # new values per step (not bincount: it
        # reads max(t) back on a GPU)
        order = torch.argsort(t, stable=True)
        rank = torch.empty_like(t)  # each value's place among its step's new values, in batch order
        rank[order] = torch.arange(t.numel(), device=t.device) - (torch.cumsum(n, 0) - n)[t[order]]
        # step t's values in order: its `count` old ones, then its `n` new ones; the last `keep` of them stay, so
        # the first `shift` go and every other moves `shift` places to the left
        shift = (count + n - keep).clamp(min=0)
        index = torch.arange(keep, device=t.device) + shift[:, None]  # (T, keep): what lands in each place
        # the old values, moved; a place past them gets a new value below, or stays empty (zero: never written)
        merged = history.gather(1, index.clamp(max=keep - 1))
        # each new value's place after the shift; one that falls out goes to a spare column that is dropped
        place = count[t] + rank - shift[t]
        wider = torch.cat([merged, merged.new_zeros(T, 1)], dim=1)
        wider.index_put_((t, torch.where(place >= 0, place, keep)), losses.to(history.dtype))
        history.copy_(wider[:, :keep])
        count.copy_((count + n).clamp(max=keep))

    def history_full(self) -> bool:
        """Whether every step has its 10 values (importance sampling starts then). It is read back from the device
        until it is true, and remembered: the history only grows (a new one loaded into the module starts over)."""
        if not self._history_full:
            self._history_full = bool((self.loss_history_count >= self.loss_history.shape[1]).all())
        return self._history_full


def _look_at_the_history_anew(module: GaussianDiffusion, incompatible_keys) -> None:
    """After a load_state_dict: the loaded loss history may not be full (``history_full``)."""
    module._history_full = False


class MixedDenoiser(nn.Module):
    """A denoiser that predicts a residual over the exact denoiser of N(0, I) data (LSGM's mixed score
    parameterisation, Vahdat, Kreis & Kautz 2021, sec. 3.2), for a diffusion prior over a VAE's latents.

    For x_0 ~ N(0, I) and a variance-preserving schedule, x_t ~ N(0, I) at every t and the reverse step is known:
    E[eps | x_t] = sqrt(1 - abar_t) x_t, E[x_0 | x_t] = sqrt(abar_t) x_t, E[v | x_t] = 0, and
    q(x_{t-1} | x_t) has variance beta_t (learned variance: v = 1 in eq. 15 of Nichol & Dhariwal, at t = 1 too,
    where beta_1 is the upper end). The output is that plus ``net(x_t, t)``; with the net's zero-initialised last
    layer and a learned variance, the untrained model IS N(0, I): its bound is exactly -log N(x_0; 0, I) (every
    trajectory's weight is p(x_0)), so a latent prior at scale s = 1 starts at the VAE's own and trains only where
    the latents leave N(0, I). (With a fixed variance only the mean is exact: beta-tilde_t, or beta-tilde_2 at t = 1,
    is not beta_t.) The network can still cancel the baseline: nothing is lost in what it can express. LSGM mixes
    the two with a learned per-dimension weight instead; a zero-initialised residual starts exactly at N(0, I).
    The schedule enters here, as coefficients; the wrapped network still knows nothing of it.
    """

    def __init__(self, net: nn.Module, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.net = net
        self.learned_variance = diffusion.var_type == "learned"
        coefficient = {"epsilon": diffusion.sqrt_one_minus_alphas_cumprod, "x0": diffusion.sqrt_alphas_cumprod,
                       "v": torch.zeros_like(diffusion.betas)}[diffusion.mean_type]
        self.register_buffer("coefficient", coefficient.clone(), persistent=False)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        baseline = GaussianDiffusion._extract(self.coefficient, t, x_t) * x_t
        if self.learned_variance:  # v = 1: Sigma = beta_t, the Gaussian's reverse variance
            baseline = torch.cat([baseline, torch.ones_like(x_t)], dim=1)
        return baseline + self.net(x_t, t)
