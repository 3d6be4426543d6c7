"""What a training run leaves in its folder, apart from checkpoints: the resolved config, the metrics log
(JSONL, and TensorBoard scalars when tensorboard is installed), sample grids, the loss curve, the progress bar.

Only rank 0 calls these. Every file is either replaced atomically or appended line by line, and readers skip a line
cut short by a crash, so a run killed at any moment can be resumed and plotted.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from elbox import devices
from elbox.checkpoint import write_text_atomic
from elbox.config import DataConfig, RunConfig, TrainConfig
from elbox.data import from_model, to_model
from elbox.errors import UserError
from elbox.objectives.base import ELBOModel
from elbox.viz import image_grid, line_plot, pairs_grid, save_png, scatter_plot

if TYPE_CHECKING:
    from elbox.metrics.likelihood import Evaluation

METRICS = "metrics.jsonl"


# ------------------------------------------------------------------------------------------- the run folder
class RunFolder:
    """The run folder, locked for as long as one process trains in it (a second `--resume` is refused)."""

    def __init__(self, out: Path, cfg: RunConfig, resume: bool) -> None:
        self.path = out
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a folder; choose another --out")
        if resume:
            if not (out / "config.toml").is_file():
                raise UserError(f"cannot resume {out}: it holds no config.toml (is it a folder written by `elbox train --out`?)")
        elif out.exists() and any(out.iterdir()):
            raise UserError(f"{out} already exists and is not empty; use `elbox train --resume {out}` or another --out")
        out.mkdir(parents=True, exist_ok=True)
        # flock on the folder itself: released by the kernel when the process ends, however it ends
        self._fd = os.open(out, os.O_RDONLY)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise UserError(f"another elbox process is training in {out}; wait for it or stop it first") from None
        for stale in out.glob(".*.tmp*"):  # a file that was being replaced when a process was killed
            if stale.is_file():
                stale.unlink()
        if not resume:
            self.write_config(cfg)

    def write_config(self, cfg: RunConfig) -> None:
        """The resolved config, every value explicit (a resume rewrites it once the checkpoint has loaded: with
        the settings changed now, e.g. more --steps)."""
        write_text_atomic(self.path / "config.toml", cfg.to_toml())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)  # releases the lock
            self._fd = -1


# ------------------------------------------------------------------------------------------------ metrics
def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The metric records of a run, skipping a last line cut short by a crash."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                row = json.loads(line)
                if isinstance(row, dict) and "step" in row:
                    rows.append(row)
    return rows


class MetricsLog:
    """One JSON line per log step in ``metrics.jsonl`` (flushed at once), mirrored to TensorBoard if installed."""

    def __init__(self, out: Path, start_step: int) -> None:
        path = out / METRICS
        # records after the step we start from would be written again: drop them (and a line cut short)
        rows = [r for r in read_metrics(path) if r["step"] <= start_step]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))
        self.file = open(path, "a")
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional (pip install elbox[tensorboard])
            pass
        else:  # purge_step: after a resume, hide events that the checkpoint does not cover
            self.tensorboard_dir = out / "tensorboard"
            self.tensorboard = SummaryWriter(str(self.tensorboard_dir), purge_step=start_step + 1 if start_step else None)
            # TensorBoard writes from a thread and re-raises that thread's error (a full disk, say) in the next
            # add_scalar; keep the thread from also printing it as a traceback
            self._excepthook = threading.excepthook
            threading.excepthook = self._quiet_tensorboard_thread

    def _quiet_tensorboard_thread(self, args: Any) -> None:
        if not (type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError)):
            self._excepthook(args)

    def write(self, record: dict[str, Any]) -> None:
        record = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # name the file (a failed flush does not)
            raise OSError(e.errno, e.strerror, self.file.name) from None
        if self.tensorboard is not None:
            try:
                for key, value in record.items():
                    if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        self.tensorboard.add_scalar(f"train/{key}", value, record["step"])
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(self.tensorboard_dir)) from None

    def close(self) -> None:
        try:
            self.file.close()
            if self.tensorboard is not None:
                with contextlib.suppress(OSError):  # its error, if any, was raised by write() already
                    self.tensorboard.close()
        finally:
            if self.tensorboard is not None:
                threading.excepthook = self._excepthook


def plot_loss_curve(out: Path) -> Path:
    rows = [r for r in read_metrics(out / METRICS) if r.get("loss") is not None]
    series = {"loss": [(r["step"], r["loss"]) for r in rows]}
    return save_png(line_plot(series, "training loss"), out / "loss.png")


# ------------------------------------------------------------------------------------------ what users see
def progress_bar(t: TrainConfig, initial: int):
    """tqdm's bar: steps done, rate and ETA; the loop adds loss and images/s. None in quiet mode."""
    if t.quiet:
        return None
    from elbox import progress

    return progress.progress_bar(total=t.steps, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def write_samples(model: ELBOModel, path: Path, t: TrainConfig) -> Path:
    """A PNG of samples from a fixed seed. Its own generator, and fork_rng around it: the training stream (global
    RNG, which e.g. dropout or a model's own draws use) is exactly as it was before."""
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=cuda_devices(model)):
        generator = torch.Generator().manual_seed(t.seed)
        n = t.num_samples if model.draws_images else max(t.num_samples, 2000)
        with devices.autocast(t.precision, next(model.parameters()).device):  # the precision training ran in
            x = model.sample(n, generator=generator).float()
    model.train(was_training)
    if model.draws_images:
        return save_png(image_grid(from_model(torch.nan_to_num(x), model.data_range)), path)
    return save_png(scatter_plot(torch.nan_to_num(x).cpu().numpy()), path)


@torch.no_grad()
def write_reconstructions(model: ELBOModel, data: DataConfig, path: Path, t: TrainConfig) -> Path | None:
    """For models with an encoder (a VAE): held-out images and their reconstructions, in alternating columns."""
    if "reconstruct" not in model.sample_modes or not model.draws_images:
        return None
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=cuda_devices(model)):
        generator = torch.Generator().manual_seed(t.seed)
        x = to_model(data.load("test").data[: max(1, t.num_samples // 2)], model.data_range, generator=generator)
        x = x.to(next(model.parameters()).device)
        pairs = torch.stack([x, model.reconstruct(x)], dim=1).flatten(0, 1)
    model.train(was_training)
    return save_png(pairs_grid(from_model(torch.nan_to_num(pairs), model.data_range)), path)


@torch.no_grad()
def heldout_bound(model: ELBOModel, cfg: RunConfig, examples: int, device: torch.device) -> Evaluation:
    """The full bound (``.bpd`` in bits/dim, ``.examples`` how many) on the first ``examples`` held-out examples
    (the test split, or all of it when it is smaller); the training RNG is left untouched, as in ``write_samples``."""
    from elbox.metrics.likelihood import evaluate_bound

    was_training = model.training
    with torch.random.fork_rng(devices=cuda_devices(model)):
        evaluation = evaluate_bound(model, cfg.data, examples=examples, device=device)
    model.train(was_training)
    return evaluation


def cuda_devices(model: torch.nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
