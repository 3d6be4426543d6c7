"""The thesis on one table: a VAE, a DDPM and latent diffusion (a DDPM prior over that VAE's latents), trained on
the same data with the same CPU budget each, scored by the same kind of number on the same test images.

    python benchmarks/elbo_family.py --minutes 5 --threads 2 --out runs/family > family.jsonl

For each variant of MNIST (``../shared/data/mnist``, read by ``elbox.data``, never downloaded):

- ``binarized``: training images binarized afresh for every batch (Bernoulli(x/255), Salakhutdinov & Murray
  2008), the test images binarized ONCE with a generator seeded by ``--test-seed``. Pixels are {0, 255}: the VAE
  has a Bernoulli decoder, the DDPM sees them at the two ends of [-1, 1] with its 8-bit decoder, whose probability
  of a binary image is a valid (if loose) bound on the same discrete probability. Reported in nats per image, as
  the literature does (Burda et al. 2016: 85 nats for a VAE).
- ``8bit``: the images as they are; the VAE has a discretized logistic decoder (``discretized-logistic``), so all
  three give a bound on the same discrete 8-bit probability, in bits/dim.

Every model: Adam, the learning rate decayed with a cosine over the wall-clock budget (so the schedule ends when the
budget does), the diffusion models with an EMA of the weights (decay ``--ema``). The latent diffusion model
trains only its prior, for the same budget, on z ~ q(z|x) of the frozen VAE; its latent scale s = 1/std(z) is
measured on 2,000 training images first. With ``--e2e-minutes``, that model is then fine-tuned end to end (a row
``ldm-e2e``): the VAE too, on the whole bound, its encoder pulled by the prior's cross-entropy term (LSGM,
``LDMConfig.end_to_end``), the prior on its own loss. Its control, ``--vae-more-minutes``: the VAE alone trained on
for as long, at the same learning rate and batch (a row ``vae-more``), so that a gain of the end-to-end model is
not just more training of its VAE. With ``--ldm-mixed`` the prior predicts a residual over the exact denoiser
of N(0, I) latents (``DDPMConfig.mixed_prediction``, LSGM's mixed score) at latent scale 1, so it starts as the
VAE's own prior. ``--vae-from FILE`` takes a VAE saved by an earlier ``--save`` run instead of training one,
``--ldm-from FILE`` a latent diffusion model (fine-tuned end to end from there with ``--e2e-minutes``), and
``--skip-taken`` leaves those two unscored. ``--vae-iwae-k K`` trains the VAE, and that control, on the
importance-weighted bound of K samples instead of the ELBO (the IWAE, ``VAEConfig.iwae_k``); ``--save`` writes
the control too (``VARIANT-vae-more.pt``), for a later ``--vae-from``.

Scores, on the first ``--eval-n`` test images, mean and standard error over images:
- ``-ELBO``: each model's full negative ELBO (``bound``: every timestep of a DDPM computed, one draw of x_t each;
  the LDM's bound of ``objectives/latent.py``);
- ``-log p(x)``: the importance-weighted estimate on the first ``--iwae-n`` test images (with ``--iwae-pick
  random``: on ``--iwae-n`` drawn at random from all of them, the same for every model), K = ``--k-vae`` for the VAE,
  ``--k-ldm`` samples of (z, diffusion trajectory) for the LDM and ``--k-ddpm`` trajectories for the DDPM (each
  one a valid bound in expectation, see ``LDM.iwae_bound``). Each image's value goes to
  ``OUT/VARIANT-MODEL-iwae.jsonl`` as it is done. A long estimate can run in shards, ``--iwae-start P`` scoring
  the pick's positions P to ``--iwae-n`` (with draws of their own), and ``benchmarks/iwae_merge.py`` joins them;
- sampling time per image (16 ancestral samples, one thread count as set), and a grid of 64 samples per model;
- with ``--fid-num N``: FID and KID (``elbox.metrics.fid``, the standard FID Inception-v3) of N samples against the
  first ``--fid-ref`` test images of the same variant (binarized ones for ``binarized``), and the seconds that took
  (drawing the samples and their features; the reference's features are timed apart, once per variant). The
  samples are what ``elbox sample`` returns: the VAE's and the LDM's decoder means (grey levels where the test
  images are binary), the DDPM's by DDIM with ``--fid-ddpm-steps`` steps (ancestral sampling of 1000 steps would
  take over an hour per thousand images on this CPU).

Prints one JSON line per model to stdout and the table (markdown) to stderr and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path

import torch

from elbox.data import from_model, load_dataset, to_model
from elbox.metrics.fid import InceptionFeatures, Statistics, frechet_distance, kernel_distance
from elbox.metrics.likelihood import _mean_stderr
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.latent import LDM, LDMConfig
from elbox.objectives.terms import bits_per_dim
from elbox.objectives.vae import VAE, VAEConfig
from elbox.training.ema import EMA
from elbox.viz import image_grid, save_png

DIMS = 28 * 28
DECODERS = {"binarized": "bernoulli", "8bit": "discretized-logistic"}  # the VAE's decoder for each variant


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"))
    p.add_argument("--variants", nargs="+", default=["binarized", "8bit"], choices=["binarized", "8bit"])
    p.add_argument("--minutes", type=float, default=5.0, help="training budget per model, wall clock")
    p.add_argument("--timesteps", type=int, default=1000, help="T of the DDPM and of the LDM's prior")
    p.add_argument("--models", nargs="+", default=["vae", "ldm", "ddpm"], choices=["vae", "ldm", "ddpm"],
                   help="which to train (the LDM needs the VAE)")
    p.add_argument("--vae-minutes", type=float, default=None, help="the VAE's budget (default --minutes)")
    p.add_argument("--ldm-minutes", type=float, default=None, help="the LDM prior's budget (default --minutes)")
    p.add_argument("--e2e-minutes", type=float, default=0.0,
                   help="then fine-tune the LDM end to end (VAE and prior, LSGM) for this long: a row 'ldm-e2e' (0: skip)")
    p.add_argument("--e2e-lr", type=float, default=3e-4, help="the end-to-end fine-tuning's peak learning rate")
    p.add_argument("--vae-more-minutes", type=float, default=0.0,
                   help="the control for --e2e-minutes: the VAE alone trained on for this long, at --e2e-lr with the "
                        "fine-tuning's batch, a row 'vae-more' (0: skip)")
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument("--vae-ar-kernel", type=int, default=0,
                   help="an autoregressive decoder context of this odd kernel (PixelVAE-style; 0: factorized)")
    p.add_argument("--vae-iwae-k", type=int, default=1,
                   help="train the VAE (and the --vae-more-minutes control) on the importance-weighted bound of this "
                        "many samples (VAEConfig.iwae_k; 1: the ELBO)")
    p.add_argument("--vae-ar-channels", type=int, default=16,
                   help="hidden channels of that context (VAEConfig.ar_channels)")
    p.add_argument("--vae-ar-layers", type=int, default=0,
                   help="residual masked 3x3 layers after that context's first (VAEConfig.ar_layers)")
    p.add_argument("--vae-ar-cond", action="store_true",
                   help="z conditions that context too, through the decoder's output map (VAEConfig.ar_cond)")
    p.add_argument("--ldm-mixed", action="store_true",
                   help="the LDM's prior predicts a residual over the exact denoiser of N(0, I) latents "
                        "(DDPMConfig.mixed_prediction, LSGM), at latent scale 1: untrained, it is the VAE's own prior")
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--eval-n", type=int, default=1000, help="test images for the bound")
    p.add_argument("--eval-n-ddpm", type=int, default=100, help="test images for the DDPM's bound (T U-Net passes each)")
    p.add_argument("--iwae-n", type=int, default=200, help="test images for the importance-weighted estimates")
    p.add_argument("--iwae-pick", choices=["first", "random"], default="first",
                   help="which test images: the first --iwae-n, or --iwae-n drawn at random (seed --iwae-seed) from "
                        "the whole test set, an unbiased estimate of its mean (the first ones are easier)")
    p.add_argument("--iwae-seed", type=int, default=0, help="the seed of --iwae-pick random")
    p.add_argument("--iwae-start", type=int, default=0,
                   help="score only the pick's images from this position on (to --iwae-n): one shard of a long "
                        "estimate; OUT/VARIANT-MODEL-iwae.jsonl gets each image's value as it is done, and "
                        "benchmarks/iwae_merge.py joins the shards")
    p.add_argument("--k-vae", type=int, default=1000)
    p.add_argument("--k-ldm", type=int, default=100)
    p.add_argument("--k-ddpm", type=int, default=0, help="0: skip (T U-Net passes per sample)")
    p.add_argument("--fid-num", type=int, default=0, help="samples per model for FID/KID (0: skip)")
    p.add_argument("--fid-ref", type=int, default=1000, help="test images the samples are compared with")
    p.add_argument("--fid-ddpm-steps", type=int, default=50, help="DDIM steps of the DDPM's FID samples")
    p.add_argument("--fid-weights", default=None, help="the FID Inception file (default: the installed one)")
    p.add_argument("--test-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("runs/family"))
    p.add_argument("--save", action="store_true", help="also write each trained model's weights to OUT/VARIANT-MODEL.pt "
                   "(for a later evaluation at a larger K)")
    p.add_argument("--load", type=Path, help="score the models saved (--save) in this folder instead of training them")
    p.add_argument("--vae-from", type=Path,
                   help="take the VAE saved (--save) in this file (OUT/VARIANT-vae.pt of an earlier run, one variant; "
                        "or the VAE inside a saved LDM, OUT/VARIANT-ldm*.pt, its training record the LDM's) instead "
                        "of training one, with its own settings (--latent-dim, --vae-ar-* do not apply); the other "
                        "models train over it")
    p.add_argument("--ldm-from", type=Path,
                   help="take the latent diffusion model saved (--save) in this file (its VAE inside) instead of "
                        "training its prior; --e2e-minutes fine-tunes it from there")
    p.add_argument("--skip-taken", action="store_true",
                   help="score only what this run trains: no rows for the models of --vae-from and --ldm-from")
    return p.parse_args()


def binarize(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """uint8 -> {0, 255} by a Bernoulli(x / 255) draw per pixel."""
    return ((torch.rand(x.shape, generator=generator) < x.float() / 255.0) * 255).to(torch.uint8)


def train_for(model, params, minutes: float, batch_size: int, lr: float, train_u8: torch.Tensor, variant: str,
              seed: int, ema_decay: float = 0.0) -> dict:
    """Adam with a cosine learning rate over the wall-clock budget; an EMA of the weights if ``ema_decay`` > 0."""
    params = list(model.parameters()) if params is None else params
    opt = torch.optim.Adam(params, lr=lr)
    ema = EMA(model, ema_decay) if ema_decay > 0 else None
    gen = torch.Generator().manual_seed(seed)
    budget, start, step, epochs = minutes * 60.0, time.time(), 0, 0
    model.train()
    while time.time() - start < budget:
        order = torch.randperm(len(train_u8), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            elapsed = time.time() - start
            if elapsed >= budget:
                break
            for group in opt.param_groups:
                group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * elapsed / budget))
            x_u8 = train_u8[order[i : i + batch_size]]
            if variant == "binarized":
                x_u8 = binarize(x_u8, gen)
            loss = model.losses(to_model(x_u8, model.data_range, generator=gen), step=step).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if ema is not None:
                ema.update(model)
            step += 1
        else:
            epochs += 1
    seconds = time.time() - start
    print(f"  trained {type(model).__name__} {seconds / 60:.1f} min, {step} steps, {epochs} epochs", file=sys.stderr)
    return {"train_minutes": seconds / 60, "steps": step, "epochs": step * batch_size / len(train_u8),
            "model": (ema.model if ema is not None else model).eval()}


def score(model, name: str, test_u8: torch.Tensor, args, k: int, variant: str, eval_n: int) -> dict:
    """The bound and the importance-weighted estimate on the test images, and the sampling time."""
    x_all = to_model(test_u8, model.data_range)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        start = time.time()
        x_eval = x_all[:eval_n]
        nll = torch.cat([model.bound(x_eval[i : i + 100], generator=g).nll.double() for i in range(0, len(x_eval), 100)])
        out = {"model": name, "variant": variant, "parameters": sum(p.numel() for p in model.parameters()),
               "iwae_k": getattr(model.config, "iwae_k", None),
               "eval_n": nll.numel(), "bound_minutes": (time.time() - start) / 60,
               "_nelbo": nll}  # per image, for a paired difference (not printed)
        mean, se = _mean_stderr(nll)
        out.update(nelbo_nats=mean, nelbo_nats_se=se, nelbo_bpd=bits_per_dim(mean, DIMS),
                   nelbo_bpd_se=bits_per_dim(se, DIMS))
        if k > 0:
            start = time.time()
            n = min(args.iwae_n, len(x_all))
            if args.iwae_pick == "random":  # the same images for every model: the generator is seeded alike
                picked = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(args.iwae_seed))[:n]
            else:
                picked = torch.arange(n)
            picked = picked[args.iwae_start :]  # a shard (of a random pick: a random subset)
            if args.iwae_start:  # draws of its own, apart from the shard at 0 (which keeps the unsharded run's)
                g = torch.Generator().manual_seed(args.seed * 1_000_003 + args.iwae_start)
            log_px = iwae_per_image(model, x_all, picked, k, g, args.out / f"{variant}-{name}-iwae.jsonl",
                                    {"variant": variant, "model": name, "k": k, "weights": fingerprint(model),
                                     "test_seed": args.test_seed, "seed": args.seed, "pick": args.iwae_pick,
                                     "iwae_seed": args.iwae_seed, "positions": [args.iwae_start, n]})
            mean, se = _mean_stderr(-log_px)
            out.update(nll_nats=mean, nll_nats_se=se, nll_bpd=bits_per_dim(mean, DIMS),
                       nll_bpd_se=bits_per_dim(se, DIMS), k=k, iwae_n=log_px.numel(), iwae_pick=args.iwae_pick,
                       iwae_start=args.iwae_start,
                       iwae_minutes=(time.time() - start) / 60)
        start = time.time()
        model.sample(16, generator=torch.Generator().manual_seed(0))
        out["sample_seconds_per_image"] = (time.time() - start) / 16
        grid = model.sample(64, generator=torch.Generator().manual_seed(1))
    path = save_png(image_grid(from_model(torch.nan_to_num(grid), model.data_range)),
                    args.out / f"{variant}-{name}.png")
    out["samples"] = str(path)
    if args.fid_num:
        out.update(quality(model, name, args))
    return out


def fingerprint(model) -> str:
    """A short hash of the weights: shards of one estimate must come from the very same model."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def iwae_per_image(model, x_all: torch.Tensor, picked: torch.Tensor, k: int, g: torch.Generator, path: Path,
                   header: dict) -> torch.Tensor:
    """log p(x) by ``model.iwae_bound`` for the test images ``picked`` (indices), 10 at a time; each value is appended
    to ``path`` (JSON lines, after a header line for this run) as soon as it is done, so a stopped run keeps them."""
    values = []
    with path.open("a") as f:
        f.write(json.dumps({"header": header}) + "\n")
        f.flush()
        for i in range(0, len(picked), 10):
            index = picked[i : i + 10]
            log_px = model.iwae_bound(x_all[index], k, generator=g, chunk=max(1, min(k, 100))).double()
            f.writelines(json.dumps({"index": int(j), "neg_log_px": -float(v)}) + "\n" for j, v in zip(index, log_px))
            f.flush()
            values.append(log_px)
    return torch.cat(values) if values else torch.zeros(0, dtype=torch.float64)


def quality(model, name: str, args) -> dict:
    """FID and KID of ``args.fid_num`` samples against the variant's reference features (``args.reference``)."""
    options = {"sampler": "ddim", "steps": args.fid_ddpm_steps} if name == "ddpm" else {}
    g = torch.Generator().manual_seed(args.seed + 1)
    start = time.time()
    with torch.no_grad():
        samples = torch.cat([from_model(torch.nan_to_num(model.sample(min(250, args.fid_num - i), generator=g,
                                                                      **options)), model.data_range)
                             for i in range(0, args.fid_num, 250)])
    features = args.inception(samples)
    fid = frechet_distance(Statistics.of(features), Statistics.of(args.reference))
    kid, kid_std = kernel_distance(features, args.reference, seed=args.seed)
    out = {"fid": fid, "kid": kid, "kid_std": kid_std, "fid_num": len(features), "fid_ref": len(args.reference),
           "fid_seconds": time.time() - start, "fid_sampler": "ddim" if options else "ancestral"}
    print(f"  {name}: FID {fid:.2f}, KID {kid:.4f} ± {kid_std:.4f} ({out['fid_seconds']:.0f} s)", file=sys.stderr)
    return out


def trained(name: str, variant: str, args, fit_model) -> dict:
    """``fit_model()`` (train_for's record, the model under "model"), or with ``--load`` the model saved there; with
    ``--save`` the weights, config and training record go to OUT/VARIANT-NAME.pt."""
    classes = {"vae": (VAE, VAEConfig), "ldm": (LDM, LDMConfig), "ldm-e2e": (LDM, LDMConfig), "ddpm": (DDPM, DDPMConfig)}
    path = args.load / f"{variant}-{name}.pt" if args.load else {"vae": args.vae_from, "ldm": args.ldm_from}.get(name)
    if path:
        if not path.is_file():
            flag = (f"--load {args.load}: it holds no {path.name}" if args.load
                    else f"--{name}-from {path}: no such file")
            sys.exit(f"{flag}; write it with a run that has --save")
        saved = torch.load(path, weights_only=True)
        if name == "vae" and "vae_config" in saved["config"]:  # a saved LDM: the VAE inside it (end to end: as trained)
            prefix = "vae."
            saved = {"config": json.loads(saved["config"]["vae_config"])["config"], "fit": saved["fit"],
                     "state_dict": {k[len(prefix):]: v for k, v in saved["state_dict"].items() if k.startswith(prefix)}}
        if name == "vae" and saved["config"]["decoder"] != DECODERS[variant]:
            sys.exit(f"{path}: its VAE has a {saved['config']['decoder']} decoder, not the {DECODERS[variant]} one of "
                     f"{variant} MNIST; choose the file of that variant, or --variants to match")
        model_cls, config_cls = classes[name]
        model = model_cls(config_cls(**saved["config"]), (1, 28, 28))
        model.load_state_dict(saved["state_dict"])
        fit = {**saved["fit"], "model": model.eval()}
        if args.load:
            return fit
    else:
        fit = fit_model()
    if args.save:
        save_model(fit, args.out / f"{variant}-{name}.pt")
    return fit


def save_model(fit: dict, path: Path) -> None:
    """A trained model (``fit["model"]``) as ``trained`` reads it back: weights, config and training record."""
    record = {k: v for k, v in fit.items() if k != "model"}
    torch.save({"state_dict": fit["model"].state_dict(), "config": dataclasses.asdict(fit["model"].config),
                "fit": record}, path)


def run_variant(variant: str, train_u8: torch.Tensor, test_u8: torch.Tensor, args) -> list[dict]:
    torch.manual_seed(args.seed)
    decoder = DECODERS[variant]
    rows = []

    def emit(row: dict) -> None:  # a model's scores and training record, printed as soon as it is done
        vae_row = next((r for r in rows if r["model"] == "vae"), None)
        nelbo = row.pop("_nelbo")
        if row["model"].startswith("ldm") and vae_row is not None and len(vae_row["_nelbo"]) == len(nelbo):
            # the prior's gain, paired on the same test images: its standard error is that of the differences
            row["nelbo_minus_vae"], row["nelbo_minus_vae_se"] = _mean_stderr(nelbo - vae_row["_nelbo"])
            print(f"  {row['model']} - vae, -ELBO on the same {len(nelbo)} test images: {row['nelbo_minus_vae']:+.3f}"
                  f" ± {row['nelbo_minus_vae_se']:.3f} nats", file=sys.stderr)
        print(json.dumps(row), flush=True)
        rows.append({**row, "_nelbo": nelbo})

    if "vae" in args.models:
        vae = VAE(VAEConfig(arch="conv-mlp", res_blocks=0, activation="silu", latent_dim=args.latent_dim,
                            decoder=decoder, ar_kernel=args.vae_ar_kernel, ar_layers=args.vae_ar_layers,
                            ar_channels=args.vae_ar_channels, ar_cond=args.vae_ar_cond, iwae_k=args.vae_iwae_k),
                  (1, 28, 28))
        fit = trained("vae", variant, args, lambda: train_for(vae, list(vae.parameters()), args.vae_minutes or
                                                              args.minutes, 100, 1e-3, train_u8, variant, args.seed))
        vae = fit.pop("model")
        if not (args.skip_taken and args.vae_from):
            emit({**score(vae, "vae", test_u8, args, args.k_vae, variant, args.eval_n), **fit})
        if args.vae_more_minutes:
            model = copy.deepcopy(vae)
            model.config = dataclasses.replace(model.config, iwae_k=args.vae_iwae_k)  # the objective it trains on
            more = train_for(model, None, args.vae_more_minutes, 128, args.e2e_lr, train_u8, variant, args.seed)
            if args.save:  # to be taken by a later run's --vae-from
                save_model(more, args.out / f"{variant}-vae-more.pt")
            model = more.pop("model")
            emit({**score(model, "vae-more", test_u8, args, args.k_vae, variant, args.eval_n), **more})
    if "ldm" in args.models:
        row, ldm = train_ldm(vae, variant, train_u8, test_u8, args)
        if row:
            emit(row)
        if args.e2e_minutes:
            emit(fine_tune_end_to_end(ldm, variant, train_u8, test_u8, args))
    if "ddpm" in args.models:
        emit(train_ddpm(variant, train_u8, test_u8, args))
    return rows


def train_ldm(vae: VAE, variant: str, train_u8: torch.Tensor, test_u8: torch.Tensor, args) -> tuple[dict | None, LDM]:
    # the latent scale s = 1 / std(z), z ~ q(z|x) over 2,000 training images (Rombach et al., appendix G)
    with torch.no_grad():
        x = to_model(train_u8[:2000], vae.data_range, generator=torch.Generator().manual_seed(args.seed))
        mu, logvar = vae.encode(x)
        scale = 1.0 / float((mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)).std())
    # vae_config: the VAE's description, so that a saved LDM (--save) rebuilds with its VAE inside
    vae_config = json.dumps({"config": dataclasses.asdict(vae.config), "data_shape": list(vae.data_shape)})
    if args.ldm_mixed:  # at s = 1 the untrained prior is N(0, I), the VAE's own
        scale = 1.0
    ldm = LDM(LDMConfig(timesteps=args.timesteps, net="mlp", latent_scale=scale, vae_config=vae_config,
                        mixed_prediction=args.ldm_mixed), (1, 28, 28), vae=vae)
    fit = trained("ldm", variant, args, lambda: train_for(ldm, list(ldm.prior.parameters()), args.ldm_minutes or
                                                          args.minutes, 256, 1e-3, train_u8, variant, args.seed,
                                                          args.ema))
    model = fit.pop("model")
    if args.skip_taken and args.ldm_from:
        return None, model
    return {**score(model, "ldm", test_u8, args, args.k_ldm, variant, args.eval_n), **fit,
            "latent_scale": float(model.latent_scale), "mixed_prediction": model.config.mixed_prediction}, model


def fine_tune_end_to_end(ldm: LDM, variant: str, train_u8: torch.Tensor, test_u8: torch.Tensor, args) -> dict:
    """The two-stage LDM (its EMA weights), then every weight, the VAE's too, trained on the whole bound
    (``LDMConfig.end_to_end``, LSGM) for ``--e2e-minutes``; the latent scale s stays as measured."""
    def fit_model():
        config = dataclasses.replace(ldm.config, end_to_end=True)
        model = LDM(config, ldm.data_shape, vae=copy.deepcopy(ldm.vae))
        model.load_state_dict(ldm.state_dict())
        return train_for(model, list(model.parameters()), args.e2e_minutes, 128, args.e2e_lr, train_u8, variant,
                         args.seed, args.ema)

    fit = trained("ldm-e2e", variant, args, fit_model)
    model = fit.pop("model")
    return {**score(model, "ldm-e2e", test_u8, args, args.k_ldm, variant, args.eval_n), **fit,
            "latent_scale": float(model.latent_scale), "mixed_prediction": model.config.mixed_prediction}


def train_ddpm(variant: str, train_u8: torch.Tensor, test_u8: torch.Tensor, args) -> dict:
    torch.manual_seed(args.seed)
    ddpm = DDPM(DDPMConfig(data_kind="8bit", net="small", base_channels=32, dropout=0.0, timesteps=args.timesteps),
                (1, 28, 28))
    fit = trained("ddpm", variant, args, lambda: train_for(ddpm, list(ddpm.parameters()), args.minutes, 64, 5e-4,
                                                           train_u8, variant, args.seed, args.ema))
    return {**score(fit.pop("model"), "ddpm", test_u8, args, args.k_ddpm, variant, args.eval_n_ddpm), **fit}


def table(rows: list[dict]) -> str:
    def pm(row, key, digits):
        return f"{row[key]:.{digits}f} ± {row[key + '_se']:.{digits}f}" if key in row else "—"

    fid = any("fid" in r for r in rows)
    lines = ["| data | model | −ELBO (nats) | −ELBO (bits/dim) | −log p(x) (nats, K) | sampling s/image | training |"
             + (" FID | KID (× 10³) | FID+KID time |" if fid else ""),
             "|---|---|---|---|---|---|---|" + ("---|---|---|" if fid else "")]
    for r in rows:
        picked = "random " if r.get("iwae_pick") == "random" else ""
        iwae = f"{pm(r, 'nll_nats', 2)} (K = {r['k']}, {r['iwae_n']} {picked}images)" if "nll_nats" in r else "—"
        mixed = ", mixed prediction" if r.get("mixed_prediction") else ""
        mixed += f", trained on the IWAE bound, K = {r['iwae_k']}" if (r.get("iwae_k") or 1) > 1 else ""
        line = (f"| {r['variant']} MNIST | {r['model']} ({r['eval_n']} test images{mixed}) | {pm(r, 'nelbo_nats', 2)} | "
                f"{pm(r, 'nelbo_bpd', 4)} | {iwae} | {r['sample_seconds_per_image']:.3f} | "
                f"{r['train_minutes']:.1f} min, {r['epochs']:.1f} epochs |")
        if fid:
            ddim = ", DDIM" if r["fid_sampler"] == "ddim" else ""
            # the sd over KID's random subsets; none when a subset is the whole set (N <= 1000)
            kid_sd = f" ± {1e3 * r['kid_std']:.2f}" if r["kid_std"] > 1e-9 else ""
            line += (f" {r['fid']:.2f} ({r['fid_num']} vs {r['fid_ref']}{ddim}) |"
                     f" {1e3 * r['kid']:.2f}{kid_sd} | {r['fid_seconds']:.0f} s |")
        lines.append(line)
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if "ldm" in args.models and "vae" not in args.models:
        sys.exit("--models ldm needs vae too: the LDM's prior is trained over that VAE's latents")
    for flag, path in (("--vae-from", args.vae_from), ("--ldm-from", args.ldm_from)):
        if path and (args.load or len(args.variants) > 1):
            sys.exit(f"{flag} takes one saved model, for one variant: give --variants binarized or 8bit, and no --load")
    if not 0 <= args.iwae_start < args.iwae_n:
        sys.exit(f"--iwae-start {args.iwae_start} is not allowed; use a position from 0 to --iwae-n - 1 "
                 f"({args.iwae_n - 1})")
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    train_u8, test_u8 = (load_dataset("mnist", s, data_dir=args.data_dir, download=False).data for s in ("train", "test"))
    if args.fid_num:
        args.inception = InceptionFeatures.load(args.fid_weights)  # before any training: fails at once if missing
    rows = []
    for variant in args.variants:
        test = binarize(test_u8, torch.Generator().manual_seed(args.test_seed)) if variant == "binarized" else test_u8
        if args.fid_num:
            start = time.time()
            args.reference = args.inception(test[: args.fid_ref])
            print(f"  {variant}: reference features of {len(args.reference)} test images, "
                  f"{time.time() - start:.0f} s", file=sys.stderr)
        keep = len(test) if args.iwae_pick == "random" else max(args.eval_n, args.iwae_n)
        rows += run_variant(variant, train_u8, test[:keep], args)
    text = table(rows)
    (args.out / "table.md").write_text(text + "\n")
    print(text, file=sys.stderr)


if __name__ == "__main__":
    main()
