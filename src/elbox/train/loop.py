"""The one training loop of elbox, for every ELBO model. Read it top to bottom: ``train`` is the whole story.

What it guarantees (and the tests check):
- the run folder holds the resolved config, self-describing checkpoints, metrics, sample grids and a loss curve;
- ``resume`` continues bit for bit on the CPU: weights, EMA, optimizer, step, data position and RNG states are all
  in the checkpoint, and sample grids use their own generator so they never disturb the training stream;
- checkpoints are atomic; SIGINT/SIGTERM save one and exit cleanly; a NaN/Inf loss stops the run naming the step
  and the term (or skips the batch), leaving the last good checkpoint in place;
- under torchrun every rank sees its own shard of each batch, gradients are averaged by DDP, and only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import json
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from elbox import __version__
from elbox.config import MODELS, RunConfig
from elbox.data import InMemoryLoader, from_model, load_dataset, to_model
from elbox.errors import UserError
from elbox.objectives.base import ELBOModel
from elbox.objectives.terms import Terms
from elbox.train import checkpoint as ckpt
from elbox.train.distributed import DistInfo, all_true, setup, teardown
from elbox.train.ema import EMA
from elbox.viz import image_grid, line_plot, save_png, scatter_plot


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    samples: Path | None
    seconds: float
    images_per_second: float
    heldout_bpd: float | None
    interrupted: bool = False


def describe(model: ELBOModel, cfg: RunConfig) -> dict[str, Any]:
    """The JSON description from which ``elbox.load`` rebuilds the model without the original command."""
    import dataclasses

    return {
        "kind": model.kind,
        "config": cfg.to_dict()[cfg.model],
        "data_shape": list(model.data_shape),
        "data_range": model.data_range,
        "data": dataclasses.asdict(cfg.data),
        "elbox_version": __version__,
    }


class _LossModule(nn.Module):
    """Wraps a model so that DistributedDataParallel sees its training loss as a forward pass."""

    def __init__(self, model: ELBOModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, Terms]:
        terms = self.model.losses(x, step=step)
        return terms.loss.mean(), terms


class _StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then it saves and exits)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _check_setup(cfg: RunConfig, info: DistInfo) -> int:
    """Validate the loop's settings; return the per-process micro-batch size."""
    t = cfg.train
    for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints", "num_samples"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name}={getattr(t, name)} is not allowed; use an integer >= 1")
    if t.lr <= 0 or not math.isfinite(t.lr):
        raise UserError(f"train.lr={t.lr} is not allowed; use a positive learning rate such as 2e-4")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"train.ema_decay={t.ema_decay} is not allowed; use 0 <= decay < 1 (0 turns EMA off)")
    if t.grad_clip < 0:
        raise UserError(f"train.grad_clip={t.grad_clip} is not allowed; use a value >= 0 (0 turns clipping off)")
    if t.precision == "fp16" and info.device.type == "cpu":
        raise UserError("precision='fp16' needs a GPU; on the CPU use bf16 or fp32")
    per_rank = t.batch_size // (info.world_size * t.grad_accum)
    if per_rank * info.world_size * t.grad_accum != t.batch_size:
        raise UserError(
            f"batch_size={t.batch_size} must be divisible by processes ({info.world_size}) x grad_accum ({t.grad_accum})"
        )
    return per_rank


def prepare_run_dir(out: Path, cfg: RunConfig, resume: bool) -> None:
    """Create the run folder, refusing to overwrite an earlier run unless resuming it."""
    if resume:
        if not (out / "config.toml").is_file():
            raise UserError(f"cannot resume {out}: it holds no config.toml (is it a folder written by `elbox train --out`?)")
        # a resumed run keeps its config except the settings changed now (e.g. more --steps)
        tmp = out / "config.toml.tmp"
        tmp.write_text(cfg.to_toml())
        tmp.replace(out / "config.toml")
        return
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already exists and is not empty; use `elbox train --resume {out}` or another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.toml").write_text(cfg.to_toml())


def build_model(cfg: RunConfig, data_shape: tuple[int, ...]) -> ELBOModel:
    return MODELS[cfg.model][1](cfg.model_config, data_shape)


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False) -> TrainResult:
    """Train ``cfg`` into the run folder ``out`` (or continue it with ``resume=True``)."""
    out = Path(out)
    t = cfg.train
    info = setup(t.device)
    try:
        per_rank_batch = _check_setup(cfg, info)
        if info.is_main:
            prepare_run_dir(out, cfg, resume)

        # 1. Data: every data set is uint8 in memory; the model's transform maps it into the model's range.
        dataset = load_dataset(cfg.data.data, "train", data_dir=cfg.data.data_dir, image_size=cfg.data.image_size,
                               channels=cfg.data.channels, skip_bad=cfg.data.skip_bad)
        loader = InMemoryLoader(dataset.data, per_rank_batch, shuffle=True, drop_last=True, seed=t.seed,
                                hflip=cfg.data.hflip, rank=info.rank, world_size=info.world_size, device=info.device)
        if len(loader) == 0:
            raise UserError(f"data set {cfg.data.data!r} has {len(dataset.data)} training examples, fewer than one "
                            f"batch of {per_rank_batch} per process; lower --batch-size")

        # 2. Model, optimizer, EMA: identical on every rank (same seed; DDP also broadcasts rank 0's weights).
        torch.manual_seed(t.seed)
        model = build_model(cfg, dataset.shape).to(info.device)
        if t.channels_last and len(dataset.shape) == 3:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
        scaler = torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16")
        step = 0

        # 3. Resume: weights, EMA, optimizer, step, data position and RNG states, all from the checkpoint.
        if resume:
            latest = ckpt.latest_checkpoint(out)
            if latest is not None:
                state = ckpt.load_checkpoint(latest)
                ckpt.load_weights(model, state.model, latest / "model.safetensors")
                if ema is not None and state.ema is not None:
                    ckpt.load_weights(ema.model, state.ema, latest / "ema.safetensors")
                    ema.num_updates = int(state.manifest["ema_updates"])
                if state.optimizer is not None:
                    optimizer.load_state_dict(state.optimizer)
                if t.precision == "fp16" and state.manifest.get("scaler"):
                    scaler.load_state_dict(state.manifest["scaler"])
                loader_states = state.manifest["loader"]
                if len(loader_states) != info.world_size:
                    raise UserError(f"{latest} was written by {len(loader_states)} process(es); resume it with the "
                                    f"same number (now {info.world_size}) so that the data order continues exactly")
                loader.load_state_dict(loader_states[str(info.rank)])
                ckpt.restore_rng_states(state.rng)
                step = state.step
                if info.is_main:
                    _truncate_metrics(out / "metrics.jsonl", step)

        loss_module: nn.Module = _LossModule(model)
        if t.compile:
            loss_module = torch.compile(loss_module)
        if info.enabled:
            loss_module = DistributedDataParallel(loss_module, device_ids=[info.device] if info.device.type == "cuda" else None)
        if info.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        def save(at_step: int) -> Path | None:
            loader_states = _gather_loader_states(loader, info)
            if not info.is_main:
                return None
            extra = {"loader": loader_states, "ema_updates": ema.num_updates if ema else 0,
                     "scaler": scaler.state_dict() if t.precision == "fp16" else None}
            return ckpt.save_checkpoint(out, at_step, description=describe(model, cfg), model_state=model.state_dict(),
                                        ema_state=ema.model.state_dict() if ema else None,
                                        optimizer_state=optimizer.state_dict(), extra=extra, keep=t.keep_checkpoints)

        # 4. The loop.
        progress = _progress(t, info, step)
        metrics_file = open(out / "metrics.jsonl", "a") if info.is_main else None
        batches = loader.forever()
        start, images_seen, window_start, window_images = time.perf_counter(), 0, time.perf_counter(), 0
        last_ckpt: Path | None = ckpt.latest_checkpoint(out, verify=False) if info.is_main else None
        interrupted = False
        with _StopSignal() as stop:
            while step < t.steps:
                lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else t.lr
                for group in optimizer.param_groups:
                    group["lr"] = lr
                model.train()
                terms_seen: list[Terms] = []
                bad_term: str | None = None
                for micro in range(t.grad_accum):
                    x = to_model(next(batches), model.data_range)
                    sync = contextlib.nullcontext() if (not info.enabled or micro == t.grad_accum - 1) else loss_module.no_sync()
                    with sync:
                        with _autocast(t.precision, info.device):
                            loss, terms = loss_module(x, step)
                        bad_term = bad_term or _nonfinite_term(terms)
                        scaler.scale(loss / t.grad_accum).backward()
                    terms_seen.append(terms)
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
                if bad_term is None and not torch.isfinite(grad_norm):
                    bad_term = "the gradient"
                if not all_true(bad_term is None, info) and t.precision != "fp16":
                    if t.on_nonfinite == "stop":
                        where = bad_term or "the loss on another process"
                        kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written yet"
                        raise UserError(f"non-finite value (NaN/Inf) in {where} at step {step + 1}; stopping; {kept} "
                                        f"(try a lower --lr, --grad-clip, or --on-nonfinite skip)")
                    optimizer.zero_grad(set_to_none=True)
                    scaler.update()
                    _log(metrics_file, {"step": step + 1, "skipped": bad_term})
                    continue
                scaler.step(optimizer)  # fp16: skips the step itself when the scaled gradient overflowed
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    ema.update(model)
                step += 1
                images_seen += t.batch_size
                window_images += t.batch_size

                if step % t.log_every == 0 or step == t.steps:
                    now = time.perf_counter()
                    summary = Terms.cat([tm for tm in terms_seen]).summary() if len(terms_seen) > 1 else terms_seen[0].summary()
                    record = {"step": step, **summary, "lr": lr, "grad_norm": float(grad_norm),
                              "images_per_s": window_images / max(now - window_start, 1e-9)}
                    window_start, window_images = now, 0
                    _log(metrics_file, record)
                    if progress is not None:
                        progress.set_postfix(loss=f"{record['loss']:.4g}", bpd=f"{record['bpd']:.3f}",
                                             img_s=f"{record['images_per_s']:.0f}", refresh=False)
                if progress is not None:
                    progress.update(1)
                if t.sample_every and step % t.sample_every == 0 and info.is_main:
                    write_samples(ema.model if ema else model, out / "samples" / f"step-{step:07d}.png", t)
                if step % t.checkpoint_every == 0 and step < t.steps:
                    last_ckpt = save(step) or last_ckpt
                if not all_true(stop.received is None, info):
                    interrupted = True
                    break

        # 5. The end: a last checkpoint, the sample grid, the loss curve, and the held-out bound.
        if progress is not None:
            progress.close()
        if metrics_file is not None:
            metrics_file.close()
        seconds = time.perf_counter() - start
        last_ckpt = save(step) or last_ckpt
        samples_path = heldout = None
        if info.is_main:
            plot_loss_curve(out)
            if not interrupted:
                samples_path = write_samples(ema.model if ema else model, out / "samples.png", t)
                if t.final_eval_examples > 0:
                    heldout = heldout_bpd(ema.model if ema else model, cfg, t.final_eval_examples, info.device)
        return TrainResult(run_dir=out, step=step, checkpoint=last_ckpt, samples=samples_path, seconds=seconds,
                           images_per_second=images_seen / max(seconds, 1e-9), heldout_bpd=heldout,
                           interrupted=interrupted)
    finally:
        teardown()


# ------------------------------------------------------------------------------------------------ helpers
def _nonfinite_term(terms: Terms) -> str | None:
    if torch.isfinite(terms.loss).all():
        return None
    for name, value in terms.terms.items():
        if not torch.isfinite(value).all():
            return f"term {name!r}"
    return "the loss"


def _gather_loader_states(loader: InMemoryLoader, info: DistInfo) -> dict[str, Any]:
    import torch.distributed as dist

    if not info.enabled:
        return {"0": loader.state_dict()}
    states: list[Any] = [None] * info.world_size
    dist.all_gather_object(states, loader.state_dict())
    return {str(r): s for r, s in enumerate(states)}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines written after the checkpoint we resume from (they will be written again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def _log(f, record: dict[str, Any]) -> None:
    if f is not None:
        f.write(json.dumps(record) + "\n")
        f.flush()


def _progress(t, info: DistInfo, initial: int):
    if t.quiet or not info.is_main:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=t.steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def write_samples(model: ELBOModel, path: Path, t) -> Path:
    """A PNG of samples from a fixed seed (its own generator: the training RNG stream is untouched)."""
    model.eval()
    generator = torch.Generator().manual_seed(t.seed)
    n = t.num_samples if len(model.data_shape) == 3 else max(t.num_samples, 2000)
    x = model.sample(n, generator=generator)
    if len(model.data_shape) == 3:
        return save_png(image_grid(from_model(x, model.data_range)), path)
    return save_png(scatter_plot(x.cpu().numpy()), path)


def plot_loss_curve(out: Path) -> Path | None:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "loss" in r]
    series = {"loss": [(r["step"], r["loss"]) for r in rows]}
    return save_png(line_plot(series, "training loss"), out / "loss.png")


@torch.no_grad()
def heldout_bpd(model: ELBOModel, cfg: RunConfig, examples: int, device: torch.device) -> float:
    """The full bound, in bits/dim, on the first ``examples`` held-out examples (the test split)."""
    from elbox.evaluate import evaluate_bound

    return evaluate_bound(model, cfg.data, examples=examples, device=device).bpd
