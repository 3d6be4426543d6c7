"""A training run's state and how it is set up: the data, the model, the optimizer, the EMA, a resume.

``set_up`` builds a ``Run`` that holds everything the loop (``loop.py``) needs; ``Run.save`` writes a checkpoint
from it. Identical on every rank under torchrun (same seed; DDP also broadcasts rank 0's weights).
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from elbox import __version__, devices
from elbox import checkpoint as ckpt
from elbox.compiling import CUDA_GRAPH_MODES, check_compile, compile_networks
from elbox.config import MODELS, RunConfig, TrainConfig
from elbox.data import InMemoryLoader, to_model
from elbox.data.dataset import Dataset, derive_seed
from elbox.errors import UserError, a_model
from elbox.objectives.base import ELBOModel
from elbox.training.distributed import DistInfo, from_main, gather
from elbox.training.ema import EMA
from elbox.training.outputs import METRICS, RunFolder, read_metrics

#: what a data set's examples are, in the words of the models' configs (``ELBOModel.resolve_config``)
DATA_KINDS = {"image": "8bit", "vector": "continuous"}


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


def resolve(cfg: RunConfig, data_kind: str) -> RunConfig:  # pragma: no mutate block
    """``cfg`` with the model's "from the data" choices made (a DDPM's ``data="auto"``), for the data's kind."""
    model_cls = MODELS[cfg.model][1]
    return dataclasses.replace(cfg, model_config=model_cls.resolve_config(cfg.model_config, data_kind))


def resolve_precision(cfg: RunConfig, device: torch.device) -> RunConfig:  # pragma: no mutate block
    """``cfg`` with ``precision="auto"`` made explicit (``devices.resolve_precision``)."""
    if cfg.train.precision != "auto":
        return cfg
    precision = devices.resolve_precision("auto", device)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


def build_model(cfg: RunConfig, data_shape: tuple[int, ...]) -> ELBOModel:  # pragma: no mutate block
    return MODELS[cfg.model][1](cfg.model_config, data_shape)


@dataclass
class Run:  # pragma: no mutate block
    """Everything one process of a training run holds, and where it stands."""

    cfg: RunConfig
    out: Path
    info: DistInfo
    model: ELBOModel
    loss_module: nn.Module  # the model's loss as a forward pass (wrapped in DDP under torchrun)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: EMA | None
    loader: InMemoryLoader
    micro_rows: list[torch.Tensor]  # this rank's micro-batches' positions in the global batch
    step: int = 0
    last_checkpoint: Path | None = None

    @property
    def sampling_model(self) -> ELBOModel:
        """The weights samples and evaluations use: the EMA's, when there is one (as the papers do)."""
        return self.ema.model if self.ema is not None else self.model

    def save(self) -> Path:
        """A checkpoint at the current step: every rank hands over its RNG and loader states; rank 0 writes (and
        everyone learns where)."""
        info, model, ema = self.info, self.model, self.ema
        bad = [name for name, module in (("weights", model), ("EMA weights", ema.model if ema else None))
               if module is not None and not ckpt.all_finite(module.state_dict())]
        if bad:  # never a checkpoint nobody can use (the same on every rank: DDP keeps the weights identical)
            kept = (f"the last checkpoint, {self.last_checkpoint}, is untouched" if self.last_checkpoint
                    else "no checkpoint was written")
            raise UserError(f"the {bad[0]} hold NaN/Inf at step {self.step}; not saved; {kept}; try a lower --lr "
                            f"or --grad-clip")
        mine = {"rng": ckpt.rng_states(info.device), "loader": self.loader.state_dict()}
        if info.enabled:  # proof that every rank holds bit-identical weights and EMA weights (DDP's promise)
            mine["digests"] = {"model": ckpt.tensors_digest(model.state_dict()),
                               "ema": ckpt.tensors_digest(ema.model.state_dict()) if ema else None}
        per_rank = {str(r): s for r, s in enumerate(gather(mine, info))}
        extra = {"loader": {r: s["loader"] for r, s in per_rank.items()},
                 "ema_updates": ema.num_updates if ema else 0,
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
        if info.enabled:
            extra["rank_digests"] = {r: s["digests"] for r, s in per_rank.items()}
        step, t = self.step, self.cfg.train
        self.last_checkpoint = from_main(lambda: ckpt.save_checkpoint(
            self.out, step, description=describe(model, self.cfg), model_state=model.state_dict(),
            ema_state=ema.model.state_dict() if ema else None, optimizer_state=self.optimizer.state_dict(),
            rng={r: s["rng"] for r, s in per_rank.items()}, extra=extra, keep=t.keep_checkpoints), info)
        return self.last_checkpoint


def set_up(cfg: RunConfig, dataset: Dataset, model: ELBOModel, out: Path, folder: RunFolder | None, info: DistInfo,
           resume: bool) -> Run:  # pragma: no mutate block
    """Loader, optimizer and EMA for this process and ``model`` (just built, from ``cfg`` resolved for ``dataset``,
    the training split), put back as the latest checkpoint left them on a resume."""
    t = cfg.train
    rank_batch = t.batch_size // info.world_size  # check_setup has made sure that it divides
    # 1. Data: every data set is uint8 in memory. Each rank's loader yields its share of each step's batch.
    loader = InMemoryLoader(dataset.data, rank_batch, shuffle=True, drop_last=True, seed=t.seed,
                            hflip=cfg.data.hflip, rank=info.rank, world_size=info.world_size, device=info.device)

    # 2. Model, optimizer, EMA: identical on every rank.
    if info.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls (and cuDNN convolutions, its default)
    model = model.to(info.device)
    state = from_main(lambda: _read_latest(out, t.checkpoint_every), info) if resume else None
    if state is None:  # a new run: a model built on another trained model (latent diffusion's VAE) loads it now
        model.initialize(to_model(dataset.data[:512], model.data_range,
                                  generator=torch.Generator().manual_seed(t.seed)).to(info.device))
        if model.config != cfg.model_config:  # a value measured now (latent diffusion's scale): config.toml says it
            cfg = dataclasses.replace(cfg, model_config=model.config)
            if folder is not None:
                folder.write_config(cfg)
    if t.channels_last:  # only 4-D weights (convolutions) change layout
        model = model.to(memory_format=torch.channels_last)
    # fused: one kernel over every tensor (CPU and CUDA; same update rule as the per-tensor loop)
    fused = info.device.type in ("cpu", "cuda") and all(p.is_floating_point() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay, fused=fused or None)
    ema = EMA(model, t.ema_decay) if t.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(info.device.type, enabled=t.precision == "fp16")
    torch.manual_seed(derive_seed("train", t.seed, info.rank))  # the training stream: dropout and the like
    run = Run(cfg=cfg, out=out, info=info, model=model, loss_module=LossModule(model), optimizer=optimizer,
              scaler=scaler, ema=ema, loader=loader, micro_rows=micro_rows(t, info))

    # 3. Resume: weights, EMA, optimizer, step, data position and RNG states, all from the latest checkpoint.
    if resume:
        if state is not None:
            run.step = _restore(state, run)
        if run.step > t.steps:  # fewer steps than done: leave the run's config and outputs as they are
            raise UserError(f"{out} has trained {run.step} steps already, more than --steps {t.steps}; give --steps "
                            f"{run.step} (to finish its outputs) or more")
        if folder is not None:
            folder.write_config(cfg)  # the settings changed now (more --steps, say), once the checkpoint fits
    run.last_checkpoint = from_main(lambda: ckpt.latest_checkpoint(out, verify=False), info)

    # 4. Speed and scale: compile the networks; DDP averages the gradients across processes.
    if t.compile:
        compile_networks(model, t.compile_backend, t.compile_mode)
    if info.enabled:
        device_ids = [info.device] if info.device.type == "cuda" else None
        run.loss_module = DistributedDataParallel(run.loss_module, device_ids=device_ids)
    return run


class LossModule(nn.Module):
    """Wraps a model so that DistributedDataParallel sees its training loss as a forward pass."""

    def __init__(self, model: ELBOModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, step: int):
        terms = self.model.losses(x, step=step)
        return terms.loss.mean(), terms


def check_setup(t: TrainConfig, info: DistInfo) -> int:  # pragma: no mutate block
    """Validate the loop's settings; return the examples each process takes per step."""
    for name in ("steps", "batch_size", "grad_accum", "log_every", "checkpoint_every", "keep_checkpoints", "num_samples"):
        if getattr(t, name) < 1:
            raise UserError(f"train.{name}={getattr(t, name)} is not allowed; use an integer >= 1")
    for name in ("sample_every", "eval_batches", "final_eval_examples", "warmup_steps", "fid_every"):
        if getattr(t, name) < 0:
            raise UserError(f"train.{name}={getattr(t, name)} is not allowed; use an integer >= 0")
    if t.fid_every > 0:
        if t.fid_num < 2:
            raise UserError(f"train.fid_num={t.fid_num} is not allowed; FID needs at least 2 samples (1000 or more "
                            f"to compare runs)")
        from elbox.metrics.fid import HOW_TO_GET, default_weights

        if default_weights() is None:  # before any training, not at the first interval
            raise UserError(f"--fid-every {t.fid_every}: {HOW_TO_GET.split(', or pass')[0]}")
    if t.lr <= 0 or not math.isfinite(t.lr):
        raise UserError(f"train.lr={t.lr} is not allowed; use a positive learning rate such as 2e-4")
    if not 0.0 <= t.ema_decay < 1.0:
        raise UserError(f"train.ema_decay={t.ema_decay} is not allowed; use 0 <= decay < 1 (0 turns EMA off)")
    if t.grad_clip < 0:
        raise UserError(f"train.grad_clip={t.grad_clip} is not allowed; use a value >= 0 (0 turns clipping off)")
    if t.compile:
        check_compile(t.compile_backend, t.compile_mode)
        if t.compile_mode in CUDA_GRAPH_MODES and t.grad_accum > 1:
            # a CUDA graph's gradient becomes .grad and the next micro-batch's replay overwrites it (pytorch#169545)
            raise UserError(f"compile_mode={t.compile_mode!r} (CUDA graphs) cannot accumulate gradients "
                            f"(grad_accum={t.grad_accum}); use --grad-accum 1 or --compile-mode default")
    devices.resolve_precision(t.precision, info.device)  # fp16 needs a GPU: refused here, before anything is built
    if t.batch_size % (info.world_size * t.grad_accum):
        raise UserError(f"batch_size={t.batch_size} must be divisible by processes ({info.world_size}) x "
                        f"grad_accum ({t.grad_accum})")
    return t.batch_size // info.world_size

def micro_rows(t: TrainConfig, info: DistInfo) -> list[torch.Tensor]:
    """Positions in the global batch of this rank's micro-batches: rank r holds r, r + k, r + 2k, ... (k
    processes), and gradient accumulation cuts that share into consecutive micro-batches."""
    # on the training device: the draws keep these rows of the global batch's draws without a copy from the host
    return list(torch.arange(info.rank, t.batch_size, info.world_size, device=info.device).chunk(t.grad_accum))

def _read_latest(out: Path, checkpoint_every: int) -> ckpt.Checkpoint | None:  # pragma: no mutate block
    """The newest valid checkpoint of the run (invalid newer ones are moved aside, with a note). A run whose
    metrics passed a checkpoint step but that has no checkpoint left is refused, not silently restarted at step 0;
    one stopped before its first checkpoint starts again, saying so."""
    latest, notes = ckpt.latest_valid_checkpoint(out)
    for note in notes:
        print(f"elbox: note: {note}", file=sys.stderr, flush=True)
    if latest is not None:
        return ckpt.load_checkpoint(latest)
    if notes:  # it had checkpoints, and none of them is valid: nothing to resume from
        raise UserError(f"{out} has no valid checkpoint to resume from ({notes[-1]}); train a new run with "
                        f"`elbox train --config {out / 'config.toml'} --out NEW_FOLDER`")
    reached = max((r["step"] for r in read_metrics(out / METRICS)), default=0)
    if reached > checkpoint_every:  # past its first checkpoint step: a checkpoint was written, and is gone
        raise UserError(f"{out} has no valid checkpoint left, but its metrics reach step {reached}; resuming would "
                        f"start again at step 0 and drop them; train a new run with "
                        f"`elbox train --config {out / 'config.toml'} --out NEW_FOLDER`")
    print(f"elbox: note: {out} has no checkpoint yet (stopped before step {checkpoint_every}); starting at step 0",
          file=sys.stderr, flush=True)
    return None

def _restore(state: ckpt.Checkpoint, run: Run) -> int:  # pragma: no mutate block
    """Put a run back exactly as it was when ``state`` was saved; return its step."""
    cfg, model, ema, optimizer, scaler, loader, info = (run.cfg, run.model, run.ema, run.optimizer, run.scaler,
                                                       run.loader, run.info)
    saved, now = state.description["config"], cfg.to_dict()[cfg.model]
    # a setting added to elbox after the checkpoint was written is missing from it: that model had the default
    default = RunConfig(model=cfg.model, model_config=type(cfg.model_config)()).to_dict()[cfg.model]
    changed = [k for k in now if saved.get(k, default[k]) != now[k]]
    if state.description["kind"] != cfg.model or changed:
        what = (f"{changed[0]}={saved.get(changed[0])!r}, now {now[changed[0]]!r}" if changed
                else a_model(state.description["kind"]))
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
