"""The one training loop of elbox, for every ELBO model. Read ``train`` top to bottom: it is the whole story.

What it guarantees (tests/test_train*.py check each point with real runs):

- The run folder holds the resolved config, self-describing checkpoints (``checkpoint.py``), metrics, sample grids
  and a loss curve (``outputs.py``).
- Exact resume. A checkpoint holds the weights, the EMA, the optimizer, the step, the loader's position and every
  rank's RNG state, so on the CPU N steps + ``--resume`` + N steps give bit-identical weights to 2N steps. Sample
  grids and evaluation use their own generators under ``fork_rng``: they never move the training stream.
- Faults. Checkpoints are atomic, so a SIGKILL at any moment loses at most the steps since the last checkpoint.
  SIGINT/SIGTERM finish the current step (under torchrun on GPUs, the next one), save a checkpoint and stop (the
  CLI then exits with 128 + the signal's number, as a shell does). A full disk during a save keeps the previous
  checkpoint and says so. A NaN/Inf in a loss term or the gradient stops the run naming the step and the term, the
  last checkpoint untouched; with ``on_nonfinite="skip"`` the step's update is skipped instead (the step still
  counts) and the skips are counted. On a GPU the check is decided on the device and read back a step later
  (``defer_checks``), so that the host never waits for the step it has just queued; what the run does and says
  stays the same (but for the torchrun stop above). A loss that does not need the bound (a DDPM's simple loss)
  computes the bound's terms only at the steps that write a metrics line (``logged``); elsewhere the check sees
  the loss alone.
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
    objective's draws (a DDPM's t and noise) go through ``elbox.draws``: inside ``draws.global_batch``
    every rank and micro-batch draws for the whole global batch from a generator seeded by (seed, s) and keeps its
    own rows. So each example gets the same t and noise however the batch is split, DDP averages the per-rank
    mean losses' gradients, and the result equals one process's up to floating-point rounding. The global torch
    RNG (dropout; random flips are the loader's, per rank) is seeded per rank, so with dropout or flips a split
    run matches only in distribution.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from elbox import checkpoint as ckpt
from elbox import devices, draws
from elbox.api import record_evaluation
from elbox.checkpoint import write_text_atomic
from elbox.compiling import backend_failure
from elbox.config import RunConfig, TrainConfig
from elbox.data import to_model
from elbox.data.dataset import derive_seed
from elbox.errors import EmptySplit, UserError
from elbox.metrics.likelihood import Evaluation
from elbox.objectives.base import ELBOModel, batches_made_in_range, loss_only
from elbox.objectives.terms import Terms, term_words
from elbox.training.distributed import (
    DistInfo,
    any_rank,
    any_rank_on_device,
    from_main,
    mean_over_ranks,
    setup,
    teardown,
    wait_for_all,
)
from elbox.training.ema import EMA
from elbox.training.outputs import (
    METRICS,
    MetricsLog,
    RunFolder,
    cuda_devices,
    heldout_bound,
    plot_loss_curve,
    progress_bar,
    write_reconstructions,
    write_samples,
)
from elbox.training.session import DATA_KINDS, Run, build_model, check_setup, resolve, resolve_precision, set_up
from elbox.training.signals import StopSignal

SKIPPED_FILES = "skipped-files.txt"


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
    heldout: Evaluation | None = None  # the whole held-out evaluation (its terms; whether it is a discrete bound)
    stopped_by: str | None = None  # "SIGINT"/"SIGTERM" when a signal ended the run early
    skipped: int = 0  # steps whose update was skipped for a NaN/Inf (on_nonfinite="skip")
    is_main: bool = True  # rank 0, the process that wrote the run folder
    skipped_files: tuple[str, ...] = ()  # unreadable data files left out (--skip-bad), listed in SKIPPED_FILES

    @property
    def interrupted(self) -> bool:
        return self.stopped_by is not None

    def written(self) -> list[Path]:
        """What this run wrote, for the summary line."""
        paths = [self.checkpoint, self.samples, self.run_dir / METRICS, self.run_dir / "loss.png",
                 self.run_dir / "tensorboard", self.run_dir / SKIPPED_FILES]
        return [p for p in paths if p is not None and p.exists()]


def train(cfg: RunConfig, out: str | Path, *, resume: bool = False) -> TrainResult:  # pragma: no mutate block
    """Train ``cfg`` into the run folder ``out`` (or continue it with ``resume=True``)."""
    out = Path(out)
    info = setup(cfg.train.device)
    folder: RunFolder | None = None
    run: Run | None = None
    try:
        check_setup(cfg.train, info)  # before anything is written
        # What the data is (8-bit images or continuous vectors) settles the model's "auto" choices; a mistake in
        # the data or the model's settings stops here, before the run folder exists.
        dataset = cfg.data.load("train")
        cfg = resolve_precision(resolve(cfg, DATA_KINDS[dataset.kind]), info.device)
        if info.is_main and (note := devices.emulated_bf16_note(cfg.train.precision, info.device)):
            print(f"elbox: note: {note}", file=sys.stderr, flush=True)
        torch.manual_seed(cfg.train.seed)  # the initial weights: the same on every rank
        model = build_model(cfg, dataset.shape)
        if dataset.data.is_floating_point():  # vectors pass as they are (uint8 images are mapped into range)
            try:  # once, whole, before anything is written: the steps then take their batches on trust
                model.check_values(to_model(dataset.data, model.data_range))
            except UserError as e:
                raise UserError(f"the training data {cfg.data.data}: {e}") from None
        if cfg.train.fid_every and not model.draws_images:
            raise UserError(f"--fid-every {cfg.train.fid_every}: FID and KID are for images; this {cfg.model} on "
                            f"{cfg.data.data} draws vectors (the held-out bound measures it: --eval-batches)")
        folder = from_main(lambda: RunFolder(out, cfg, resume), info, share=False)
        if folder is not None and dataset.skipped:  # --skip-bad: which files were left out, for the record
            write_text_atomic(out / SKIPPED_FILES, "".join(f"{name}\n" for name in dataset.skipped))
        run = set_up(cfg, dataset, model, out, folder, info, resume)  # optimizer, EMA; a resume puts them back
        loop = _loop(run)
        return dataclasses.replace(_finish(run, loop), skipped_files=dataset.skipped)
    except Exception as e:
        if (reason := backend_failure(e)) is not None:  # at the first step, in a run folder that now exists
            raise UserError(f"{reason}; `elbox train --resume {out} --compile-backend inductor` starts it over "
                            f"with another backend") from None
        if not isinstance(e, OSError) or e.errno not in ckpt.DISK_FULL:
            raise
        # metrics lines, sample grids, TensorBoard events: a full disk there is no reason for a traceback
        latest = ckpt.latest_checkpoint(out, verify=False)
        kept = f"the last checkpoint, {latest}, is intact" if latest else "no checkpoint was written yet"
        where = f" ({e.filename})" if e.filename else ""
        again = (f"`elbox train --resume {out}`" if (out / "config.toml").is_file()
                 else "run the same command again")  # a hint must be a command that works
        raise UserError(f"the disk is full ({e.strerror}) while writing to the run folder {out}{where}; {kept}; "
                        f"free some space, then {again}") from None
    finally:
        if folder is not None:
            folder.close()
        run = None  # the DDP wrapper (and its reducer) holds the process group: let go of it before the teardown
        teardown()


@dataclass
class _LoopEnd:  # pragma: no mutate block
    seconds: float
    images_seen: int
    skipped: int
    stopped_by: str | None


def _loop(run: Run) -> _LoopEnd:  # pragma: no mutate block
    """Steps until ``train.steps`` (or a stop signal), each followed by the periodic actions that are due.

    On a GPU (``defer_checks``) a step is only queued when ``train_step`` returns, and reading anything back waits
    for it: so the loop reads a step's outcome (NaN/Inf, a stop signal under torchrun) while the next one is
    queued, and the step it has just queued only where its results are needed (a metrics line, a checkpoint, a
    grid, the end). A NaN/Inf step's update was skipped on the device meanwhile; the next one's update is made,
    but stopping then saves nothing, so a stop still keeps the last checkpoint and names the step."""
    t, info = run.cfg.train, run.info
    log = _Log(MetricsLog(run.out, run.step) if info.is_main else None,
               progress_bar(t, run.step) if info.is_main else None)
    deferred = defer_checks(run)
    batches = run.loader.forever()
    start = time.perf_counter()
    images_seen = 0
    stopped_by: str | None = None
    queued: StepOutcome | None = None  # a step not read back yet
    try:
        with StopSignal() as stop:
            while run.step < t.steps:
                done = train_step(run.step, next(batches), t=t, model=run.model, loss_module=run.loss_module,
                                  optimizer=run.optimizer, scaler=run.scaler, ema=run.ema, info=info,
                                  micro_rows=run.micro_rows, stop_requested=stop.requested, deferred=deferred)
                run.step += 1
                images_seen += t.batch_size
                stop_now = queued is not None and _settle(run, queued, log)  # the previous step, if not read yet
                queued = done
                # every rank must read at the same steps (a metrics line is a collective): a local signal counts
                # only in a single process; under torchrun the signal comes through the step's flags
                if not deferred or stop_now or _due(run) or (not info.enabled and stop.requested()):
                    stop_now = _settle(run, done, log) or stop_now
                    queued = None
                _periodic(run, log.metrics)
                if stop_now:
                    stopped_by = stop.received or "SIGTERM"  # a signal to another rank: torchrun's SIGTERM
                    break
    finally:
        log.close()
    return _LoopEnd(time.perf_counter() - start, images_seen, log.skipped, stopped_by)


def defer_checks(run: Run) -> bool:  # pragma: no mutate block
    """Whether a step's NaN/Inf check is decided on the device and read back later (see ``_loop``): on a GPU,
    with the fused optimizer (it skips an update itself when told so by a flag on the device) and without fp16's
    grad scaler (which reads its own flag). On a CPU a read costs nothing: each step is read as it ends. (The
    ``importance`` timestep sampler reads whether its loss history is full, at each step until it is.)"""
    return (run.info.device.type == "cuda" and bool(run.optimizer.defaults.get("fused"))
            and run.cfg.train.precision != "fp16")


def _due(run: Run) -> bool:  # pragma: no mutate block
    """Whether this step's results are needed now: a metrics line, the last step, a grid, FID or a checkpoint."""
    t, step = run.cfg.train, run.step
    return (step % t.log_every == 0 or step == t.steps or step % t.checkpoint_every == 0
            or bool(t.sample_every and step % t.sample_every == 0) or bool(t.fid_every and step % t.fid_every == 0))


def _settle(run: Run, done: StepOutcome, log: _Log) -> bool:  # pragma: no mutate block
    """Read a step's outcome back: a NaN/Inf stops the run or counts a skipped update, the metrics line and the
    progress bar; whether any rank was asked to stop."""
    nonfinite, stop_now = done.settle()
    log.in_a_row = log.in_a_row + 1 if nonfinite is not None else 0
    if nonfinite is not None:
        _on_nonfinite(run, done.step, nonfinite, log.metrics, log.in_a_row)  # stops, or counts a skipped update
        log.skipped += 1
    log.step(run, done, nonfinite)
    return stop_now


def _on_nonfinite(run: Run, step: int, where: str, metrics: MetricsLog | None,
                  in_a_row: int) -> None:  # pragma: no mutate block
    """A NaN/Inf in step ``step`` (its update was skipped): stop, naming the step and the term, unless told to skip
    (and fewer than ``max_skips`` steps in a row were)."""
    t = run.cfg.train
    if t.on_nonfinite == "skip" and in_a_row < t.max_skips:
        return
    if metrics is not None:
        metrics.write({"step": step, "nonfinite": where, "stopped": True})
    kept = (f"the last checkpoint, {run.last_checkpoint}, is untouched" if run.last_checkpoint
            else "no checkpoint was written yet")
    if t.on_nonfinite == "skip":
        raise UserError(f"non-finite value (NaN/Inf) in {where} in {in_a_row} steps in a row, the last at step "
                        f"{step}; stopped; {kept}; try a lower --lr or --grad-clip")
    raise UserError(f"non-finite value (NaN/Inf) in {where} at step {step}; stopped; {kept}; try a lower "
                    f"--lr, --grad-clip, or --on-nonfinite skip")


class _Log:  # pragma: no mutate block
    """The metrics line every ``log_every`` steps (and at the last step, and at a NaN/Inf), the progress bar, and
    the count of skipped updates."""

    def __init__(self, metrics: MetricsLog | None, progress: Any) -> None:
        self.metrics, self.progress = metrics, progress
        self.window_start, self.window_images = time.perf_counter(), 0
        self.skipped = self.in_a_row = 0

    def step(self, run: Run, done: StepOutcome, nonfinite: str | None) -> None:
        t = run.cfg.train
        self.window_images += t.batch_size
        if logged(done.step, t) or nonfinite is not None:
            now = time.perf_counter()
            summary = mean_over_ranks(Terms.cat(done.terms).summary(), run.info)
            record = {"step": done.step, **summary, "lr": done.lr, "grad_norm": float(done.grad_norm),
                      "images_per_s": self.window_images / max(now - self.window_start, 1e-9),
                      "skipped": self.skipped}
            if nonfinite:
                record["nonfinite"] = nonfinite
            self.window_start, self.window_images = now, 0
            if self.metrics is not None:
                self.metrics.write(record)
            if self.progress is not None:
                self.progress.set_postfix(loss=f"{record['loss']:.4g}", img_s=f"{record['images_per_s']:.0f}",
                                          refresh=False)
        if self.progress is not None:
            self.progress.update(1)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.metrics is not None:
            self.metrics.close()


def _periodic(run: Run, metrics: MetricsLog | None) -> None:  # pragma: no mutate block
    """What is due after this step: a sample grid (rank 0), a checkpoint, and the held-out bound beside it."""
    t, step = run.cfg.train, run.step
    if t.sample_every and step % t.sample_every == 0 and run.info.is_main:
        folder = run.out / "samples"
        write_samples(run.sampling_model, folder / f"step-{step:07d}.png", t)
        write_reconstructions(run.sampling_model, run.cfg.data, folder / f"step-{step:07d}-reconstructions.png", t)
    if t.fid_every and step % t.fid_every == 0 and run.info.is_main:
        _log_quality(run, metrics)
    if step % t.checkpoint_every == 0 and step < t.steps:
        run.save()
        if t.eval_batches > 0 and metrics is not None:
            bpd = heldout_bound(run.sampling_model, run.cfg, t.eval_batches * t.batch_size, run.info.device).bpd
            metrics.write({"step": step, "heldout_bpd": bpd})


def _log_quality(run: Run, metrics: MetricsLog | None) -> None:  # pragma: no mutate block
    """FID and KID of ``fid_num`` samples of the EMA weights against the test split, logged beside the other
    metrics and recorded in evaluations.jsonl; the training RNG is left as it was (samples have their own seed)."""
    from elbox.api import evaluate_quality
    from elbox.config import EvaluateConfig

    t, model = run.cfg.train, run.sampling_model
    model.data_config = run.cfg.data  # what evaluate_quality compares with
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=cuda_devices(model)):
        result = evaluate_quality(model, EvaluateConfig(metric="fid", num=t.fid_num, seed=t.seed))
    model.train(was_training)
    record = {"step": run.step, "fid": result.fid, "kid": result.kid, "kid_std": result.kid_std, "fid_num": result.num,
              "fid_seconds": result.seconds}
    if metrics is not None:
        metrics.write(record)
    record_evaluation(run.out, {"step": run.step, "ema": run.ema is not None, "when": "training",
                                **result.to_dict()})


def _finish(run: Run, loop: _LoopEnd) -> TrainResult:  # pragma: no mutate block
    """A last checkpoint, the loss curve and, unless a signal stopped the run, the sample grid and the held-out
    bound."""
    t, info = run.cfg.train, run.info
    last = run.save()
    samples = heldout = None
    if info.is_main:
        plot_loss_curve(run.out)
        if loop.stopped_by is None:
            samples = write_samples(run.sampling_model, run.out / "samples.png", t)
            write_reconstructions(run.sampling_model, run.cfg.data, run.out / "reconstructions.png", t)
            try:
                heldout = (heldout_bound(run.sampling_model, run.cfg, t.final_eval_examples, info.device)
                           if t.final_eval_examples > 0 else None)
            except EmptySplit as e:  # a finished training does not fail for want of held-out data
                print(f"elbox: note: no held-out bound: {e}", file=sys.stderr, flush=True)
            if heldout is not None:
                record_evaluation(run.out, {"checkpoint": last.name, "step": run.step, "ema": run.ema is not None,
                                            "when": "training", **heldout.to_dict()})
    wait_for_all(info)  # rank 0's last outputs take a while: the ranks leave together
    return TrainResult(run_dir=run.out, step=run.step, checkpoint=last, samples=samples, seconds=loop.seconds,
                       images_per_second=loop.images_seen / max(loop.seconds, 1e-9),
                       heldout_bpd=heldout.bpd if heldout else None,
                       heldout_examples=heldout.examples if heldout else None,
                       heldout=heldout, stopped_by=loop.stopped_by, skipped=loop.skipped, is_main=info.is_main)


# Mutation testing (issue 9) covers the training step (train_step and the helpers it calls); the set-up, the loop's
# bookkeeping and resume are marked "no mutate block" and are checked by the end-to-end tests instead.
@dataclass
class StepOutcome:
    """What one optimizer step leaves for the loop: its number (from 1), its terms (one ``Terms`` per
    micro-batch), the learning rate and gradient norm it used, and three 0/1 flags, on the device while the step
    may still be running there: a NaN/Inf in this rank's batch, one on any rank (the update was then skipped),
    and a stop signal on any rank."""

    step: int
    terms: list[Terms]
    lr: float
    grad_norm: torch.Tensor
    flags: torch.Tensor

    def settle(self) -> tuple[str | None, bool]:
        """The flags, read back (this waits for the step): where a NaN/Inf was, if anywhere, and whether to stop."""
        here, anywhere, stop = (bool(v) for v in self.flags.tolist())
        nonfinite = None
        if anywhere:
            nonfinite = _nonfinite_where(self.terms) if here else "the batch of another process"
        return nonfinite, stop


def train_step(step: int, batch: torch.Tensor, *, t: TrainConfig, model: ELBOModel, loss_module: nn.Module,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, ema: EMA | None, info: DistInfo,
               micro_rows: list[torch.Tensor], stop_requested: Callable[[], bool],
               deferred: bool = False) -> StepOutcome:
    """One optimizer step on this rank's share ``batch`` (uint8) of the step's global batch: learning-rate
    warm-up, forward and backward over the micro-batches, clipping, the NaN/Inf check, the update and the EMA.
    ``deferred``: the check is decided on the device and nothing is read back, so that on a GPU the whole step is
    queued without waiting for it (the caller reads its flags later)."""
    lr = learning_rate(step, t)
    for group in optimizer.param_groups:
        group["lr"] = lr
    model.train()
    step_seed = derive_seed("draws", t.seed, step)
    # the bound's terms only where a metrics line reads them: a loss that does not need them skips them elsewhere
    wanted = logged(step + 1, t)
    terms_seen: list[Terms] = []
    for micro, (x_uint8, rows) in enumerate(zip(batch.chunk(t.grad_accum), micro_rows)):
        # DDP all-reduces the gradients once, on the last micro-batch
        last = micro == t.grad_accum - 1
        sync = loss_module.no_sync() if info.enabled and not last else contextlib.nullcontext()
        # in range: _to_model maps 8-bit images there, and vector data was checked whole before training
        with sync, batches_made_in_range(), contextlib.nullcontext() if wanted else loss_only():
            with draws.global_batch(step_seed, rows, t.batch_size), devices.autocast(t.precision, info.device):
                x = _to_model(x_uint8, model.data_range, t.channels_last)
                loss, terms = loss_module(x, step)
            scaler.scale(loss / t.grad_accum).backward()
        terms_seen.append(terms)
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip or float("inf"))

    # One check (and, under torchrun, one tiny all-reduce) per step: NaN/Inf here or on any rank, and a stop
    # signal on any rank: one that arrived during this step stops the run after it (deferred under torchrun, the
    # flag is read a step late: after the next). fp16's gradient overflows are the grad scaler's to handle.
    total = sum(tm.loss.detach().sum() + (tm.nll.detach().sum() if tm.has_bound else 0)
                for tm in terms_seen)  # NaN/Inf spreads
    finite = torch.isfinite(total)
    if t.precision != "fp16":
        finite = finite & torch.isfinite(grad_norm)
    if deferred:
        flags = _update_on_device(finite, stop_requested(), model=model, optimizer=optimizer, scaler=scaler,
                                  ema=ema, info=info)
    else:
        bad_here = not bool(finite)
        bad, stop_now = any_rank([bad_here, stop_requested()], info)
        if not bad:
            scaler.step(optimizer)  # fp16: skips the update itself when the scaled gradient overflowed
            if ema is not None:
                ema.update(model)
        flags = torch.tensor([float(bad_here), float(bad), float(stop_now)])
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepOutcome(step=step + 1, terms=terms_seen, lr=lr, grad_norm=grad_norm, flags=flags)


def _update_on_device(finite: torch.Tensor, stop_here: bool, *, model: ELBOModel, optimizer: torch.optim.Optimizer,
                      scaler: torch.amp.GradScaler, ema: EMA | None, info: DistInfo) -> torch.Tensor:
    """``train_step``'s update with its NaN/Inf decision made on the device: the fused optimizer skips its update
    when found_inf is 1 (as it does under a grad scaler) and the EMA adds nothing. Nothing is read back; the
    step's flags are returned, to be read after the next step is queued."""
    bad = (~finite).to(torch.float32)
    stop = torch.full((), float(stop_here), dtype=bad.dtype, device=bad.device)  # a fill, not a copy from the host
    anywhere = any_rank_on_device(torch.stack([bad, stop]), info)
    optimizer.found_inf = anywhere[0]
    try:
        scaler.step(optimizer)  # not fp16 here: the scaler is off and this is optimizer.step()
    finally:
        del optimizer.found_inf
    if ema is not None:
        ema.update(model, skip=anywhere[0] != 0)
    return torch.cat([bad.reshape(1), anywhere])


# ------------------------------------------------------------------------------------------------ helpers
def learning_rate(step: int, t: TrainConfig) -> float:
    """The learning rate of step ``step`` (0-based): linear warm-up over ``warmup_steps``, then constant or, with
    ``lr_schedule="cosine"``, lr * (1 + cos(pi * p)) / 2 with p = (step - warmup) / (steps - warmup): the full lr at
    the first step after the warm-up, decaying towards 0 at ``steps`` (Loshchilov & Hutter 2017, without restarts).
    A function of the step and ``steps`` alone: a resume continues it (a resume with more ``--steps`` stretches it)."""
    lr = t.lr * min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps > 0 else t.lr
    if t.lr_schedule == "cosine" and step >= t.warmup_steps:
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        lr = lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return lr


def logged(step: int, t: TrainConfig) -> bool:
    """Whether step ``step`` (counted from 1) writes a metrics line: every ``log_every`` steps and the last one
    (and a step with a NaN/Inf, which writes whatever terms it has)."""
    return step % t.log_every == 0 or step == t.steps


def _to_model(x: torch.Tensor, data_range: str, channels_last: bool) -> torch.Tensor:
    """uint8 -> the model's range. Binarization draws through ``draws`` so that it, too, ignores how the batch is split."""
    if data_range == "binary" and not x.is_floating_point():
        p = to_model(x, "unit")
        x = (draws.rand_like(p) < p).to(p.dtype)  # a Bernoulli(p) draw per pixel, as to_model's
    else:
        x = to_model(x, data_range)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _nonfinite_where(terms_seen: list[Terms]) -> str:
    """Which term of the bound (or the loss, or the gradient) is the first one that is not finite."""
    for terms in terms_seen:
        for name, value in terms.terms.items():
            if not torch.isfinite(value).all():
                return term_words(name)
        if not torch.isfinite(terms.loss).all():
            return "the loss"
    return "the gradient"
