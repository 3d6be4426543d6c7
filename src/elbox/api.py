"""The Python API: load a trained run, sample from it, evaluate it, train one.

    import elbox
    model = elbox.load("runs/ddpm-digits")            # rebuilt from the checkpoint's JSON, EMA weights
    x = model.sample(16, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

from elbox import checkpoint as ckpt
from elbox import devices
from elbox.config import DataConfig, EvaluateConfig, SampleConfig, build_dataclass, model_from_description
from elbox.data import from_model, to_model
from elbox.devices import resolve_device
from elbox.errors import UserError
from elbox.metrics.likelihood import evaluate_bound, evaluate_iwae
from elbox.objectives.base import ELBOModel
from elbox.viz import image_grid, pairs_grid, scatter_plot


def load(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> ELBOModel:
    """Rebuild a model from a run folder (its latest checkpoint) or a checkpoint folder; no code is unpickled.

    With ``ema=True`` (the default) the EMA weights are loaded when the checkpoint has them.
    """
    state = ckpt.load_checkpoint(path, with_training_state=False)
    desc = state.description
    weights = state.ema if (ema and state.ema is not None) else state.model
    source = state.path / ("ema.safetensors" if weights is state.ema else "model.safetensors")

    def build():
        return model_from_description(desc["kind"], desc["config"], tuple(desc["data_shape"]), str(state.path))

    with torch.device("meta"):  # the model the manifest describes must fit the weights before memory is spent on it
        ckpt.check_weights_fit(build(), weights, source)
    if not ckpt.all_finite(weights):
        raise UserError(f"{source} holds NaN/Inf weights: nothing to sample or evaluate; resume the run from an "
                        f"earlier checkpoint with a lower --lr, or train it again")
    model = build()
    ckpt.load_weights(model, weights, source)
    model.data_config = build_dataclass(DataConfig, desc.get("data", {}), "data")
    device = resolve_device(device) if isinstance(device, str) else device
    return model.to(device).eval()


def _unused_path(path: Path) -> Path:
    """``path`` if free, else path with -1, -2, ... appended: nothing the user has is overwritten."""
    if not path.exists():
        return path
    for i in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise UserError(f"too many files named like {path}; choose --out")


#: SampleConfig's fields that are sampler options, by the name ``ELBOModel.sample`` takes them under
SAMPLER_OPTIONS = {"sampler": "sampler", "sampling_steps": "steps", "eta": "eta"}


def sampler_options(model: ELBOModel, cfg: SampleConfig) -> dict[str, object]:
    """The sampler options of ``cfg`` that ``model`` takes; one set to a non-default value that it does not take is
    an error (``--sampler ddim`` for a VAE, say), not silently ignored."""
    defaults = SampleConfig()
    options = {}
    for field_name, option in SAMPLER_OPTIONS.items():
        value = getattr(cfg, field_name)
        if option in model.sampler_options:
            options[option] = value
        elif value != getattr(defaults, field_name):
            flag = "--" + field_name.replace("_", "-")
            raise UserError(f"{flag} {value} does not apply to this {model.kind}: it takes "
                            f"{', '.join(model.sampler_options) or 'no sampler options'}")
    return options


class _ChainBar:
    """A progress bar over every network pass of a sampling chain, batch after batch (a model's ``progress``
    sampler option calls it with (done, total) after each step); made at the first call, when the steps are known."""

    def __init__(self, num: int, batches: int, desc: str) -> None:
        self.num, self.batches, self.desc, self.bar = num, batches, desc, None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from elbox.progress import progress_bar

            batches = f"{self.batches} batch{'es' if self.batches > 1 else ''}"
            self.bar = progress_bar(total=total * self.batches, unit="step", dynamic_ncols=True,
                                    desc=f"{self.desc}: {self.num} samples, {total} steps x {batches}")
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def draw(model: ELBOModel, cfg: SampleConfig, progress: bool = False) -> torch.Tensor:
    """Samples in the model's data range, following ``cfg`` (prior samples, or the other modes a model has);
    ``progress``: a bar over the sampling chain's steps, for a model whose sampler reports them (a DDPM)."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if cfg.num < 1:
        raise UserError(f"--num {cfg.num} is not allowed; draw at least 1 sample")
    if cfg.mode not in model.sample_modes:
        raise UserError(f"--mode {cfg.mode} is not something this {model.kind} draws; choose one of "
                        f"{', '.join(model.sample_modes)}")
    options = sampler_options(model, cfg)
    with devices.autocast(cfg.precision, next(model.parameters()).device):
        if cfg.mode != "prior":
            return _data_mode(model, cfg, generator).float()
        out = []
        bar = None
        if progress and "progress" in model.sampler_options:
            bar = _ChainBar(cfg.num, math.ceil(cfg.num / cfg.batch_size), f"{options.get('sampler', '')} sampling")
            options["progress"] = bar
        for start in range(0, cfg.num, cfg.batch_size):
            out.append(model.sample(min(cfg.batch_size, cfg.num - start), generator=generator, **options).float().cpu())
        if bar is not None:
            bar.close()
    return torch.cat(out)


INTERPOLATION_STEPS = 8


def _most_active(model: ELBOModel, data: DataConfig, cfg: SampleConfig, generator: torch.Generator) -> tuple[int, int]:
    """The two most active latent dimensions over up to 1,000 test images, encoded ``cfg.batch_size`` at a time (a
    wide latent leaves many unused); the first two when the latent has two or fewer, or the data cannot be read."""
    if model.latent_dim <= 2:
        return (0, 1)
    try:
        ds = data.load("test")
    except UserError:  # the data moved: the checkpoint alone still draws, over the first two dimensions
        return (0, 1)
    x = to_model(ds.data[torch.randperm(len(ds.data), generator=generator)[:1000]], model.data_range,
                 generator=generator)
    return tuple(sorted(int(d) for d in model.activity(x, batch_size=cfg.batch_size).topk(2).indices))


def _data_mode(model: ELBOModel, cfg: SampleConfig, generator: torch.Generator) -> torch.Tensor:
    """The modes of a model with an encoder: a latent grid, reconstructions and interpolations of held-out data."""
    device = next(model.parameters()).device
    data = model.data_config
    if cfg.mode == "manifold":
        return model.manifold(int(round(cfg.num**0.5)), dims=_most_active(model, data, cfg, generator)).cpu()
    ds = data.load("test")
    idx = torch.randperm(len(ds.data), generator=generator)
    if cfg.mode == "reconstruct":
        x = to_model(ds.data[idx[: max(1, cfg.num // 2)]], model.data_range, generator=generator).to(device)
        rec = model.reconstruct(x)
        return torch.stack([x, rec], dim=1).flatten(0, 1).cpu()  # originals and reconstructions side by side
    # one row per pair of held-out images, 8 steps from the first to the second
    rows = max(1, cfg.num // INTERPOLATION_STEPS)
    x = to_model(ds.data[idx[: 2 * rows]], model.data_range, generator=generator).to(device)
    return model.interpolate(x[:rows], x[rows : 2 * rows], INTERPOLATION_STEPS).flatten(0, 1).cpu()


def compile_for(model: ELBOModel, cfg: SampleConfig | EvaluateConfig) -> None:
    """``cfg.compile``: torch.compile the model's networks in place (``elbox.compile_networks``), saying on one line
    that the first batch waits for the compiler."""
    if not cfg.compile:
        return
    from elbox.compiling import compile_networks

    compile_networks(model, cfg.compile_backend, cfg.compile_mode)
    mode = "" if cfg.compile_mode == "default" else f", mode {cfg.compile_mode}"
    on_cpu = next(model.parameters()).device.type == "cpu"
    slow = " (inductor on a CPU: minutes)" if cfg.compile_backend == "inductor" and on_cpu else ""
    print(f"elbox: note: --compile: the networks are compiled at their first call ({cfg.compile_backend}{mode}); "
          f"the first batch waits for the compiler{slow}", file=sys.stderr, flush=True)


def sample_png_path(out: str | Path | None, run_dir: Path, name: str, mode: str = "prior") -> Path:
    """Where samples go: ``out`` if it names a .png file (a grid) or, for prior samples, a .npz file (the samples
    themselves); ``out/name`` if it is a folder (one that exists, or a name ending in "/" or without a suffix,
    made when written); else ``run_dir/name``. Never over a file; checked before any work: a folder that cannot
    be written is said now, not after hours of sampling."""
    if out is None:
        path = run_dir / name
    else:
        path = Path(out)
        if str(out).endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
            if path.exists() and not path.is_dir():
                raise UserError(f"--out {out} is a file, not a folder, a .png or an .npz; give a name ending in .png "
                                f"or .npz, or a folder")
            path = path / name
        elif path.suffix.lower() not in (".png", ".npz"):
            raise UserError(f"--out {out}: elbox sample writes a PNG grid or an .npz of the samples; give a name "
                            f"ending in .png or .npz, or a folder")
        elif path.suffix.lower() == ".npz" and mode != "prior":
            raise UserError(f"--out {out}: an .npz holds prior samples (for FID and the like); --mode {mode} draws a "
                            f"picture of data and its {mode}: write it as a .png")
    folder = next(p for p in (path.parent, *path.parent.parents) if p.exists())  # the one that will hold it
    if not (folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)):
        raise UserError(f"cannot write {path}: {folder} is not a folder this user can write in; choose --out")
    return _unused_path(path)


def _publish(write, path: Path) -> Path:
    """``write(tmp)`` to a temporary file of this process beside ``path``, then link it in under ``path`` or, if
    that name was taken meanwhile (another elbox writing the same name), the next free one: never over a file,
    and a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        while True:
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                path = _unused_path(path)
            except OSError:  # a file system without hard links: a rename, to a name free when looked at
                path = _unused_path(path)
                os.replace(tmp, path)
                return path
    finally:
        tmp.unlink(missing_ok=True)


def sample_file_name(model: ELBOModel, cfg: SampleConfig, checkpoint: str | None = None) -> str:
    """``samples-MODE[-ddimN[-etaE]][-noema][-step-N]-seedS.png``: what drew the grid, in its name; the defaults
    (ancestral, EMA weights, a run folder rather than one of its checkpoints) add nothing. DDIM without
    ``--sampling-steps`` runs all T steps and is named ddimT, as the same draw asked for with T steps is."""
    options = sampler_options(model, cfg)
    parts = [cfg.mode]
    if options.get("sampler") == "ddim" and cfg.mode == "prior":  # the other modes do not sample a chain
        steps = options["steps"] or model.config.timesteps  # type: ignore[attr-defined]  # ddim: a DDPM or LDM
        parts.append(f"ddim{steps}" + (f"-eta{options['eta']:g}" if options["eta"] else ""))
    if not cfg.ema:
        parts.append("noema")
    if checkpoint:
        parts.append(checkpoint)
    return f"samples-{'-'.join(parts)}-seed{cfg.seed}.png"


def write_sample_png(model: ELBOModel, run: Path, cfg: SampleConfig, out: str | Path | None = None,
                     progress: bool = False) -> Path:
    """Draw samples per ``cfg`` and write them as a PNG grid (a scatter plot for 2-D vector data), or, to an
    ``out`` ending in .npz, as an array ``arr_0``: images as uint8 (N, H, W, C), the layout of the samples that
    Dhariwal & Nichol's FID evaluator and most FID tools read; vectors as float32 (N, D)."""
    checkpoint = ckpt.resolve_checkpoint(run)
    run_dir = checkpoint.parent.parent
    named = checkpoint.name if Path(run).resolve() == checkpoint.resolve() else None  # a checkpoint named, not a run
    path = sample_png_path(out, run_dir, sample_file_name(model, cfg, named), cfg.mode)  # before drawing
    compile_for(model, cfg)
    x = draw(model, cfg, progress)
    if path.suffix.lower() == ".npz":
        import numpy as np

        array = (from_model(x, model.data_range).permute(0, 2, 3, 1) if model.draws_images else x).contiguous()
        return _publish(lambda tmp: np.savez(tmp, arr_0=array.numpy()), path)
    if model.draws_images:
        images = from_model(x, model.data_range)
        if cfg.mode == "reconstruct":
            picture = pairs_grid(images)
        else:
            picture = image_grid(images, nrow=INTERPOLATION_STEPS if cfg.mode == "interpolate" else None)
    else:
        picture = scatter_plot(x.numpy())
    return _publish(lambda tmp: picture.save(tmp, format="PNG"), path)


def evaluate_quality(model: ELBOModel, cfg: EvaluateConfig, progress: bool = False):
    """FID and KID of ``cfg.num`` samples against the data set's ``cfg.split`` (metrics/fid.py)."""
    import time

    from elbox.metrics.fid import (
        InceptionFeatures,
        QualityResult,
        Statistics,
        frechet_distance,
        kernel_distance,
        reference_features,
    )

    if not model.draws_images:
        raise UserError(f"FID and KID are for images; this {model.kind} draws vectors (use --metric bpd)")
    start = time.perf_counter()
    device = next(model.parameters()).device
    network = InceptionFeatures.load(cfg.fid_weights, device)
    reference = reference_features(network, model.data_config, cfg.split, progress)
    samples = draw(model, SampleConfig(num=cfg.num, seed=cfg.seed, sampler=cfg.sampler, eta=cfg.eta,
                                       sampling_steps=cfg.sampling_steps, batch_size=cfg.batch_size), progress)
    features = network(from_model(samples, model.data_range), progress=progress,
                       desc=f"Inception features of the {len(samples)} samples")
    fid = frechet_distance(Statistics.of(features), Statistics.of(reference))
    kid, kid_std = kernel_distance(features, reference, seed=cfg.seed)
    return QualityResult(num=len(features), reference=f"{model.data_config.data} {cfg.split}",
                         reference_n=len(reference), fid=fid, kid=kid, kid_std=kid_std, weights_sha256=network.sha256,
                         seconds=time.perf_counter() - start)


EVALUATIONS = "evaluations.jsonl"


def record_evaluation(run_dir: Path, record: dict) -> None:
    """Append one evaluation to the run's ``evaluations.jsonl`` (the report reads them); a run folder that cannot be
    written (read-only, say) only loses the record."""
    import datetime

    line = json.dumps({"time": datetime.datetime.now().isoformat(timespec="seconds"), **record}) + "\n"
    try:
        with open(Path(run_dir) / EVALUATIONS, "a") as f:
            f.write(line)
    except OSError:
        pass


def evaluate(model: ELBOModel, run: Path, cfg: EvaluateConfig, progress: bool = False):
    """Measure ``model`` (loaded from ``run``) as ``cfg`` says, and record the result in the run folder."""
    compile_for(model, cfg)
    result = _measure(model, cfg, progress)
    checkpoint = ckpt.resolve_checkpoint(run)
    record_evaluation(checkpoint.parent.parent, {"checkpoint": checkpoint.name, "ema": cfg.ema, **result.to_dict()})
    return result


def _measure(model: ELBOModel, cfg: EvaluateConfig, progress: bool):
    device = next(model.parameters()).device
    if cfg.per_step and Path(cfg.per_step).exists():
        raise UserError(f"--per-step {cfg.per_step} exists; choose another file (elbox never overwrites one)")
    if cfg.per_step and not (cfg.metric != "nll" and model.per_step_terms):
        raise UserError(f"--per-step needs the bound of a model with one term per timestep (a DDPM, --metric bpd); "
                        f"this {model.kind} with --metric {cfg.metric} has none")
    common = dict(examples=cfg.examples, batch_size=cfg.batch_size, device=device, split=cfg.split, seed=cfg.seed,
                  progress=progress)
    if cfg.metric == "nll":
        return evaluate_iwae(model, model.data_config, k=cfg.k, **common)
    if cfg.metric in ("fid", "kid"):
        return evaluate_quality(model, cfg, progress)
    result = evaluate_bound(model, model.data_config, **common)
    result.metric = cfg.metric
    if cfg.per_step:
        path = Path(cfg.per_step)
        path.write_text(json.dumps({"nats_per_example": result.per_step, "dims": result.dims,
                                    "labels": result.per_step_labels}))
    return result
