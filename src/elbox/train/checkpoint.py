"""Checkpoints that describe themselves, load without running code, and survive a crash at any moment.

A checkpoint is a folder ``RUN/checkpoints/step-NNNNNNN/`` holding
- ``model.safetensors`` and ``ema.safetensors``: the weights (and persistent buffers) of the model and its EMA;
- ``optimizer.safetensors``: the optimizer's tensors; its other state goes in the manifest;
- ``rng.safetensors``: every random-number generator's state, for exact resume;
- ``manifest.json``, written last: the model's description (kind, config, data shape) from which it is rebuilt,
  the step, the data loader's position, and the sha256 of every other file.

It is written into a temporary folder, each file fsync'ed, then renamed into place, so a reader sees either the
whole checkpoint or none of it; a file that was truncated or changed afterwards fails its checksum and is refused.
Nothing is unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from elbox.errors import UserError

CHECKPOINT_RE = re.compile(r"^step-(\d{7,})$")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------- file helpers
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}


# ------------------------------------------------------------------------------------ optimizer and RNGs
def optimizer_to_flat(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    tensors, scalars = {}, {}
    for idx, per_param in state_dict["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state/{idx}/{key}"] = value
            else:
                scalars[f"{idx}/{key}"] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split("/", 2)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split("/", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_states() -> dict[str, torch.Tensor]:
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda{i}"] = s
    return states


def restore_rng_states(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch"])
    if torch.cuda.is_available():
        cuda = [states[k] for k in sorted(states) if k.startswith("cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------------------------- saving
@dataclass
class Checkpoint:
    """A checkpoint read from disk: tensors on the CPU, metadata from its manifest."""

    path: Path
    manifest: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    rng: dict[str, torch.Tensor] | None

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def description(self) -> dict[str, Any]:
        return self.manifest["model"]


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    description: dict[str, Any],
    model_state: dict[str, torch.Tensor],
    ema_state: dict[str, torch.Tensor] | None,
    optimizer_state: dict[str, Any] | None,
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the ``keep`` newest. Returns its folder.

    If the disk fills up (or any write fails) the half-written folder is removed, the previous checkpoints are
    untouched, and a UserError says so.
    """
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f".step-{step:07d}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        files = {"model.safetensors": _contiguous(model_state), "rng.safetensors": rng_states()}
        if ema_state is not None:
            files["ema.safetensors"] = _contiguous(ema_state)
        optimizer_meta = None
        if optimizer_state is not None:
            opt_tensors, optimizer_meta = optimizer_to_flat(optimizer_state)
            files["optimizer.safetensors"] = _contiguous(opt_tensors)
        digests = {}
        for name, tensors in files.items():
            save_file(tensors, str(tmp / name))
            fsync_path(tmp / name)
            digests[name] = sha256(tmp / name)
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "model": description,
            "optimizer": optimizer_meta,
            "files": digests,
            **extra,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        fsync_path(tmp)
        if final.exists():  # a checkpoint of the same step (re-saved after a resume): replace it
            shutil.rmtree(final)
        tmp.rename(final)
        fsync_path(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir, verify=False)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else f"{e.strerror or e}"
        raise UserError(f"could not save checkpoint {final}: {reason}; {kept}") from None
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary folders of interrupted saves are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def prune_checkpoints(root: Path, keep: int) -> None:
    for stale in root.glob(".step-*.tmp*"):
        if stale.name.endswith(f".tmp{os.getpid()}"):
            continue
        shutil.rmtree(stale, ignore_errors=True)
    ckpts = list_checkpoints(root.parent)
    for old in ckpts[: max(0, len(ckpts) - max(1, keep))]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path, verify: bool = True) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    if verify:
        read_manifest(ckpts[-1], verify=True)
    return ckpts[-1]


# ------------------------------------------------------------------------------------------------ loading
def read_manifest(path: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a checkpoint folder; with verify, every file's checksum is checked first."""
    mpath = Path(path) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        manifest["step"], manifest["model"]["kind"]
    except FileNotFoundError:
        raise UserError(f"{path} is not an elbox checkpoint: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        raise UserError(f"checkpoint manifest {mpath} is damaged (not the JSON elbox writes); refusing to load it") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{mpath}: checkpoint format {manifest.get('format')!r} is not {FORMAT_VERSION}, the one this elbox reads")
    if verify:
        for name, digest in files.items():
            fpath = Path(path) / name
            if not fpath.is_file():
                raise UserError(f"checkpoint file {fpath} is missing; the checkpoint is incomplete")
            if sha256(fpath) != digest:
                raise UserError(f"checkpoint file {fpath} does not match its checksum (truncated or modified); refusing to load it")
    return manifest


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"checkpoint file {path} cannot be read as safetensors ({e})") from None


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder (its latest checkpoint) or a checkpoint folder, checked to exist."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    if not path.exists():
        raise UserError(f"{path} does not exist; give a run folder written by `elbox train --out` or one of its checkpoints")
    latest = latest_checkpoint(path, verify=False)
    if latest is None:
        raise UserError(f"{path} holds no checkpoint (expected {path}/checkpoints/step-NNNNNNN/{MANIFEST})")
    return latest


def load_checkpoint(path: str | Path, *, with_training_state: bool = True) -> Checkpoint:
    """Read and verify a checkpoint folder (or a run folder's latest checkpoint)."""
    path = resolve_checkpoint(path)
    manifest = read_manifest(path, verify=True)
    model = _load_tensors(path / "model.safetensors")
    ema = _load_tensors(path / "ema.safetensors") if (path / "ema.safetensors").is_file() else None
    optimizer = rng = None
    if with_training_state:
        if manifest.get("optimizer") is not None:
            optimizer = optimizer_from_flat(_load_tensors(path / "optimizer.safetensors"), manifest["optimizer"])
        rng = _load_tensors(path / "rng.safetensors")
    return Checkpoint(path=path, manifest=manifest, model=model, ema=ema, optimizer=optimizer, rng=rng)


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with a one-line error when the weights belong to a different model."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"shape of {wrong[0]} is {tuple(state[wrong[0]].shape)}, expected {tuple(own[wrong[0]].shape)}")
        raise UserError(f"{source} holds weights of a different model ({detail}); refusing to load it")
    module.load_state_dict(state)
