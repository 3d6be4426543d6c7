"""The one training loop of elbox, for every ELBO model. Read ``train`` top to bottom: it is the whole story.

What it guarantees (tests/test_train*.py check each point with real runs):

- The run folder holds the resolved config, self-describing checkpoints (``checkpoint.py``), metrics, sample grids
  and a loss curve (``outputs.py``).
- Exact resume. A checkpoint holds the weights, the EMA, the optimizer, the step, the loader's position and every
  rank's RNG state, so on the CPU N steps + ``--resume`` + N steps give bit-identical weights to 2N steps. Sample
  grids and evaluation use their own generators under ``fork_rng``: they never move the training stream.
- Faults. Checkpoints are atomic, so a SIGKILL at any moment loses at most the steps since the last checkpoint.
  SIGINT/SIGTERM finish the current step, save a checkpoint and stop (the CLI then exits with 128 + the signal's
  number, as a shell does). A full disk during a save keeps the previous checkpoint and says so. A NaN/Inf in a
  loss term or the gradient stops the run naming the step and the term, the last checkpoint untouched; with
  ``on_nonfinite="skip"`` the step's update is skipped instead (the step still counts) and the skips are counted.
- Speed and scale. ``precision`` fp32/bf16/fp16 (torch.amp autocast; fp16 with a gradient scaler), torch.compile
  of the networks, channels-last, TF32 on GPUs, gradient accumulation. Under torchrun
  (``torchrun --nproc_per_node 8 -m elbox train --batch-size 256 ...``; add ``--nnodes``/``--rdzv-endpoint`` for
  several machines) DDP averages the gradients, only rank 0 touches the run folder (other nodes need no shared
  file system), every rank updates the same EMA (each checkpoint records each rank's digest of its weights and
  EMA), and a resume needs the same number of processes.

Randomness: why one process, k processes and gradient accumulation train the same model
    Step s uses a global batch of B examples. Under torchrun each rank's loader yields B/k of them — rank r holds
    positions r, r+k, r+2k, ... of the batch one process would draw, because the loader gives rank r every k-th
    example of each epoch's order — and gradient accumulation cuts a rank's share into micro-batches. The
    objective's draws (a DDPM's t and noise) go through ``elbox.objectives.draws``: inside ``draws.global_batch``
    every rank and micro-batch draws for the whole global batch from a generator seeded by (seed, s) and keeps its
    own rows. So each example gets the same t and noise however the batch is split, DDP averages the per-rank
    mean losses' gradients, and the result equals one process's up to floating-point rounding. The global torch
    RNG (dropout; random flips are the loader's, per rank) is seeded per rank, so with dropout or flips a split
    run matches only in distribution.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from elbox import __version__
from elbox.config import MODELS, RunConfig, TrainConfig
from elbox.data import InMemoryLoader, to_model
from elbox.data.dataset import derive_seed
from elbox.errors import UserError
from elbox.objectives import draws
from elbox.objectives.base import ELBOModel
from elbox.objectives.terms import Terms
from elbox.train import checkpoint as ckpt
from elbox.train.distributed import (DistInfo, any_rank, from_main, gather, mean_over_ranks, setup, teardown,
                                    wait_for_all)
from elbox.train.ema import EMA
from elbox.train.outputs import (METRICS, MetricsLog, RunFolder, heldout_bound, plot_loss_curve, progress_bar,
                                 write_reconstructions, write_samples)


@dataclass
class TrainResult:  # pragma: no mutate block
    run_dir: Path
    step: int
    checkpoint: Path | None
    samples: Path | None
    seconds: float
    images_per_second: float
    heldout_bpd: float | None
    heldout_examples: int | None  # how many held-out examples heldout_bpd is the mean over
    stopped_by: str | None = None  # "SIGINT"/"SIGTERM" when a signal ended the run early
    skipped: int = 0  # steps whose update was skipped for a NaN/Inf (on_nonfinite="skip")
    is_main: bool = True  # rank 0, the process that wrote the run folder

    @property
    def interrupted(self) -> bool:
        return self.stopped_by is not None

    def written(self) -> list[Path]:
        """What this run wrote, for the summary line."""
        paths = [self.checkpoint, self.samples, self.run_dir / METRICS, self.run_dir / "loss.png",
                 self.run_dir / "tensorboard"]
        return [p for p in paths if p is not None and p.exists()]


def describe(model: ELBOModel, cfg: RunConfig) -> dict[str, Any]:  # pragma: no mutate block
    """The JSON description from which ``elbox.load`` rebuilds the model without the original command."""
    return {
        "kind": model.kind,
        "config": cfg.to_dict()[cfg.model],
        "data_shape": list(model.data_shape),
        "data_range": model.data_range,
        "data": asdict(cfg.data),
        "elbox_version": __version__,
    }


def build_model(cfg: RunConfig, data_shape: tuple[int, ...]) -> ELBOModel:  # pragma: no mutate block
    return MODELS[cfg.model][1](cfg.model_config, data_shape)


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False) -> TrainResult:  # pragma: no mutate block
    """Train ``cfg`` into the run folder ``out`` (or continue it with ``resume=True``)."""
    out = Path(out)
    t = cfg.train
    info = setup(t.device)
    folder: RunFolder | None = None
    try:
        rank_batch = _check_setup(t, info)
        folder = from_main(lambda: RunFolder(out, cfg, resume), info, share=False)

        # 1. Data: every data set is uint8 in memory. Each rank's loader yields its share of each step's batch.
        dataset = cfg.data.load("train")
        loader = InMemoryLoader(dataset.data, rank_batch, shuffle=True, drop_last=True, seed=t.seed,
                                hflip=cfg.data.hflip, rank=info.rank, world_size=info.world_size, device=info.device)
        micro_rows = _micro_rows(t, info)

        # 2. Model, optimizer, EMA: identical on every rank (same seed; DDP also broadcasts rank 0's weights).
        if info.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls (and cuDNN convolutions, its default)
        torch.manual_seed(t.seed)
        model = build_model(cfg, dataset.shape).to(info.device)
        if t.channels_last and len(dataset.shape) == 3:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
        scaler = torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16")
        torch.manual_seed(derive_seed("train", t.seed, info.rank))  # the training stream: dropout and the like
        step = 0

        # 3. Resume: weights, EMA, optimizer, step, data position and RNG states, all from the latest checkpoint.
        if resume:
            state = from_main(lambda: _read_latest(out), info)
            if state is not None:
                step = _restore(state, cfg, model, ema, optimizer, scaler, loader, info)
            if folder is not None:
                folder.write_config(cfg)

        loss_module: nn.Module = _LossModule(model)
        if t.compile:
            _compile_networks(model, t.compile_backend)
        if info.enabled:
            loss_module = DistributedDataParallel(loss_module, device_ids=[info.device] if info.device.type == "cuda" else None)

        def save(at_step: int) -> Path:
            """Every rank hands over its RNG and loader states; rank 0 writes (and everyone learns where)."""
            mine = {"rng": ckpt.rng_states(info.device), "loader": loader.state_dict()}
            if info.enabled:  # proof that every rank holds bit-identical weights and EMA weights (DDP's promise)
                mine["digests"] = {"model": ckpt.tensors_digest(model.state_dict()),
                                   "ema": ckpt.tensors_digest(ema.model.state_dict()) if ema else None}
            per_rank = {str(r): s for r, s in enumerate(gather(mine, info))}
            extra = {"loader": {r: s["loader"] for r, s in per_rank.items()},
                     "ema_updates": ema.num_updates if ema else 0,
                     "scaler": scaler.state_dict() if scaler.is_enabled() else None}
            if info.enabled:
                extra["rank_digests"] = {r: s["digests"] for r, s in per_rank.items()}
            return from_main(lambda: ckpt.save_checkpoint(
                out, at_step, description=describe(model, cfg), model_state=model.state_dict(),
                ema_state=ema.model.state_dict() if ema else None, optimizer_state=optimizer.state_dict(),
                rng={r: s["rng"] for r, s in per_rank.items()}, extra=extra, keep=t.keep_checkpoints), info)

        # 4. The loop.
        metrics = MetricsLog(out, step) if info.is_main else None
        progress = progress_bar(t, step) if info.is_main else None
        last_ckpt = from_main(lambda: ckpt.latest_checkpoint(out, verify=False), info)
        batches = loader.forever()
        start = window_start = time.perf_counter()
        images_seen = window_images = skipped = 0
        stopped_by: str | None = None
        try:
            with _StopSignal() as stop:
                while step < t.steps:
                    done = train_step(step, next(batches), t=t, model=model, loss_module=loss_module,
                                      optimizer=optimizer, scaler=scaler, ema=ema, info=info, micro_rows=micro_rows,
                                      stop_received=stop.received is not None)
                    terms_seen, lr, grad_norm, nonfinite, stop_now = (done.terms, done.lr, done.grad_norm,
                                                                      done.nonfinite, done.stop_now)
                    bad = nonfinite is not None
                    if bad:
                        if t.on_nonfinite == "stop":
                            if metrics is not None:
                                metrics.write({"step": step + 1, "nonfinite": nonfinite, "stopped": True})
                            kept = (f"the last checkpoint, {last_ckpt}, is untouched" if last_ckpt
                                    else "no checkpoint was written yet")
                            raise UserError(f"non-finite value (NaN/Inf) in {nonfinite} at step {step + 1}; stopped; "
                                            f"{kept}; try a lower --lr, --grad-clip, or --on-nonfinite skip")
                        skipped += 1  # the update was skipped, the step counts
                    step += 1
                    images_seen += t.batch_size
                    window_images += t.batch_size

                    if step % t.log_every == 0 or step == t.steps or bad:
                        now = time.perf_counter()
                        summary = mean_over_ranks(Terms.cat(terms_seen).summary(), info)
                        record = {"step": step, **summary, "lr": lr, "grad_norm": float(grad_norm),
                                  "images_per_s": window_images / max(now - window_start, 1e-9), "skipped": skipped}
                        if nonfinite:
                            record["nonfinite"] = nonfinite
                        window_start, window_images = now, 0
                        if metrics is not None:
                            metrics.write(record)
                        if progress is not None:
                            progress.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.0f}",
                                                 refresh=False)
                    if progress is not None:
                        progress.update(1)
                    if t.sample_every and step % t.sample_every == 0 and info.is_main:
                        write_samples(ema.model if ema else model, out / "samples" / f"step-{step:07d}.png", t)
                        write_reconstructions(ema.model if ema else model, cfg.data,
                                              out / "samples" / f"step-{step:07d}-reconstructions.png", t)
                    if step % t.checkpoint_every == 0 and step < t.steps:
                        last_ckpt = save(step)
                        if t.eval_batches > 0 and metrics is not None:
                            bpd = heldout_bound(ema.model if ema else model, cfg, t.eval_batches * t.batch_size,
                                                info.device).bpd
                            metrics.write({"step": step, "heldout_bpd": bpd})
                    if stop_now:
                        stopped_by = stop.received or "SIGTERM"  # a signal to another rank: torchrun's SIGTERM
                        break
        finally:
            if progress is not None:
                progress.close()
            if metrics is not None:
                metrics.close()

        # 5. The end: a last checkpoint, the loss curve, the sample grid, and the held-out bound.
        seconds = time.perf_counter() - start
        last_ckpt = save(step)
        samples_path = heldout = None
        if info.is_main:
            plot_loss_curve(out)
            if stopped_by is None:
                samples_path = write_samples(ema.model if ema else model, out / "samples.png", t)
                write_reconstructions(ema.model if ema else model, cfg.data, out / "reconstructions.png", t)
                if t.final_eval_examples > 0:
                    heldout = heldout_bound(ema.model if ema else model, cfg, t.final_eval_examples, info.device)
        wait_for_all(info)  # rank 0's last outputs take a while: the ranks leave together
        return TrainResult(run_dir=out, step=step, checkpoint=last_ckpt, samples=samples_path, seconds=seconds,
                           images_per_second=images_seen / max(seconds, 1e-9),
                           heldout_bpd=heldout.bpd if heldout else None,
                           heldout_examples=heldout.examples if heldout else None,
                           stopped_by=stopped_by, skipped=skipped, is_main=info.is_main)
    except OSError as e:
        if e.errno not in ckpt.DISK_FULL:
            raise
        # metrics lines, sample grids, TensorBoard events: a full disk there is no reason for a traceback
        latest = ckpt.latest_checkpoint(out, verify=False)
        kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint was written yet"
        where = f" ({e.filename})" if e.filename else ""
        raise UserError(f"the disk is full ({e.strerror}) while writing to the run folder {out}{where}; {kept}; "
                        f"free some space, then `elbox train --resume {out}`") from None
    finally:
        if folder is not None:
            folder.close()
        teardown()


# Mutation testing (issue 9) covers the training step (train_step and the helpers it calls); the set-up, the loop's
# bookkeeping and resume are marked "no mutate block" and are checked by the end-to-end tests instead.
@dataclass
class StepOutcome:
    """What one optimizer step leaves for the loop: its terms (one ``Terms`` per micro-batch), the learning rate
    and gradient norm it used, where a NaN/Inf was (its update was then skipped), and whether any rank was asked
    to stop."""

    terms: list[Terms]
    lr: float
    grad_norm: torch.Tensor
    nonfinite: str | None
    stop_now: bool


def train_step(step: int, batch: torch.Tensor, *, t: TrainConfig, model: ELBOModel, loss_module: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ema: EMA | None, info: DistInfo,
               micro_rows: list[torch.Tensor], stop_received: bool) -> StepOutcome:
    """One optimizer step on this rank's share ``batch`` (uint8) of the step's global batch: learning-rate
    warm-up, forward and backward over the micro-batches, clipping, the NaN/Inf check, the update and the EMA."""
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else t.lr
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    step_seed = derive_seed("draws", t.seed, step)
    terms_seen: list[Terms] = []
    for micro, (x_uint8, rows) in enumerate(zip(batch.chunk(t.grad_accum), micro_rows)):
        # DDP all-reduces the gradients once, on the last micro-batch
        last = micro == t.grad_accum - 1
        sync = loss_module.no_sync() if info.enabled and not last else contextlib.nullcontext()
        with sync:
            with draws.global_batch(step_seed, rows, t.batch_size), _autocast(t.precision, info.device):
                x = _to_model(x_uint8, model.data_range, t.channels_last)
                loss, terms = loss_module(x, step)
            scaler.scale(loss / t.grad_accum).backward()
        terms_seen.append(terms)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))

    # One check (and, under torchrun, one tiny all-reduce) per step: NaN/Inf here or on any rank, and a stop
    # signal on any rank. fp16's gradient overflows are the grad scaler's to handle.
    total = sum(tm.loss.detach().sum() + tm.nll.detach().sum() for tm in terms_seen)  # NaN/Inf spreads
    finite = torch.isfinite(total)
    if t.precision != "fp16":
        finite = finite & torch.isfinite(grad_norm)
    bad_here = not bool(finite)
    bad, stop_now = any_rank([bad_here, stop_received], info)
    nonfinite = None
    if bad:
        nonfinite = _nonfinite_where(terms_seen) if bad_here else "the batch of another process"
    else:
        scaler.step(optimizer)  # fp16: skips the update itself when the scaled gradient overflowed
        if ema is not None:
            ema.update(model)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(terms=terms_seen, lr=lr, grad_norm=grad_norm, nonfinite=nonfinite, stop_now=stop_now)


# ------------------------------------------------------------------------------------------------ helpers
class _LossModule(nn.Module):
    """Wraps a model so that DistributedDataParallel sees its training loss as a forward pass."""

    def __init__(self, model: ELBOModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, step: int) -> tuple[torch.Tensor, Terms]:
        terms = self.model.losses(x, step=step)
        return terms.loss.mean(), terms


class _StopSignal:  # pragma: no mutate block
    """Turns the first SIGINT/SIGTERM into a flag the loop checks after each step (then it saves and stops); a
    second one acts as if elbox had not caught the first (Ctrl-C twice: stop now)."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignal":
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name
            return
        self._restore()
        os.kill(os.getpid(), signum)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()


def _check_setup(t: TrainConfig, info: DistInfo) -> int:  # pragma: no mutate block
    """Validate the loop's settings; return the examples each process takes per step."""
    for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints", "num_samples"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name}={getattr(t, name)} is not allowed; use an integer >= 1")
    for name in ("sample_every", "eval_batches", "final_eval_examples", "warmup_steps"):
        if getattr(t, name) < 0:
            raise UserError(f"train.{name}={getattr(t, name)} is not allowed; use an integer >= 0")
    if t.lr <= 0 or not math.isfinite(t.lr):
        raise UserError(f"train.lr={t.lr} is not allowed; use a positive learning rate such as 2e-4")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"train.ema_decay={t.ema_decay} is not allowed; use 0 <= decay < 1 (0 turns EMA off)")
    if t.grad_clip < 0:
        raise UserError(f"train.grad_clip={t.grad_clip} is not allowed; use a value >= 0 (0 turns clipping off)")
    if t.precision == "fp16" and info.device.type == "cpu":
        raise UserError("precision='fp16' needs a GPU; on the CPU use bf16 or fp32")
    if t.batch_size % (info.world_size * t.grad_accum):
        raise UserError(f"batch_size={t.batch_size} must be divisible by processes ({info.world_size}) x "
                        f"grad_accum ({t.grad_accum})")
    return t.batch_size // info.world_size


def _micro_rows(t: TrainConfig, info: DistInfo) -> list[torch.Tensor]:
    """Positions in the global batch of this rank's micro-batches: rank r holds r, r + k, r + 2k, ... (k
    processes), and gradient accumulation cuts that share into consecutive micro-batches."""
    return list(torch.arange(info.rank, t.batch_size, info.world_size).chunk(t.grad_accum))


def _to_model(x: torch.Tensor, data_range: str, channels_last: bool) -> torch.Tensor:
    """uint8 -> the model's range. Binarization draws through ``draws`` so that it, too, ignores how the batch is split."""
    if data_range == "binary" and not x.is_floating_point():
        p = to_model(x, "unit")
        x = (draws.rand_like(p) < p).to(p.dtype)  # a Bernoulli(p) draw per pixel, as to_model's
    else:
        x = to_model(x, data_range)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _autocast(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _compile_networks(model: ELBOModel, backend: str) -> None:
    """torch.compile each network of the model in place (state-dict names unchanged; the objective's math and its
    random draws stay eager)."""
    import torch._dynamo

    if backend not in torch._dynamo.list_backends(exclude_tags=()):
        raise UserError(f"compile_backend={backend!r} is not known to torch.compile; "
                        f"choose one of {', '.join(torch._dynamo.list_backends(exclude_tags=()))}")
    for child in model.children():
        if any(True for _ in child.parameters()):
            child.compile(backend=backend)


def _read_latest(out: Path) -> ckpt.Checkpoint | None:  # pragma: no mutate block
    latest = ckpt.latest_checkpoint(out)
    return ckpt.load_checkpoint(latest) if latest is not None else None


def _restore(state: ckpt.Checkpoint, cfg: RunConfig, model: ELBOModel, ema: EMA | None, optimizer: torch.optim.Optimizer,
             scaler: torch.amp.GradScaler, loader: InMemoryLoader, info: DistInfo) -> int:  # pragma: no mutate block
    """Put a run back exactly as it was when ``state`` was saved; return its step."""
    saved, now = state.description["config"], cfg.to_dict()[cfg.model]
    changed = [k for k in now if saved.get(k) != now[k]]
    if state.description["kind"] != cfg.model or changed:
        what = (f"{changed[0]}={saved.get(changed[0])!r}, now {now[changed[0]]!r}" if changed
                else f"a {state.description['kind']}")
        raise UserError(f"{state.path} holds a different model ({what}); a resume continues the same model: leave "
                        f"its settings as they were, or train a new run with --out")
    ranks = state.manifest["loader"]
    if len(ranks) != info.world_size:
        raise UserError(f"{state.path} was written by {len(ranks)} process(es); resume it with the same number "
                        f"(now {info.world_size}) so that the data order continues exactly")
    ckpt.load_weights(model, state.model, state.path / "model.safetensors")
    if ema is not None and state.ema is not None:
        ckpt.load_weights(ema.model, state.ema, state.path / "ema.safetensors")
        ema.num_updates = int(state.manifest["ema_updates"])
    if state.optimizer is not None:
        try:
            optimizer.load_state_dict(state.optimizer)
        except (ValueError, KeyError) as e:
            raise UserError(f"{state.path}: the optimizer state does not fit this model ({e}); refusing to resume") from None
    if scaler.is_enabled() and state.manifest.get("scaler"):
        scaler.load_state_dict(state.manifest["scaler"])
    loader.load_state_dict(ranks[str(info.rank)])
    ckpt.restore_rng_states(state.rng[str(info.rank)], info.device)
    return state.step


def _nonfinite_where(terms_seen: list[Terms]) -> str:
    """Which term of the bound (or the loss, or the gradient) is the first one that is not finite."""
    for terms in terms_seen:
        for name, value in terms.terms.items():
            if not torch.isfinite(value).all():
                return f"term {name!r}"
        if not torch.isfinite(terms.loss).all():
            return "the loss"
    return "the gradient"
