"""Checkpoints that describe themselves, load without running code, and survive a crash at any moment.

A checkpoint is a folder ``RUN/checkpoints/step-NNNNNNN/`` holding
- ``model.safetensors`` and ``ema.safetensors``: the weights (and persistent buffers) of the model and its EMA;
- ``optimizer.safetensors``: the optimizer's tensors; its other state goes in the manifest;
- ``rng.safetensors``: the random-number generators' states of every process, for exact resume;
- ``manifest.json``, written last: the model's description (kind, config, data shape) from which it is rebuilt,
  the step, the data loader's position, the sha256 of every other file, and a checksum of the manifest itself.

Crash safety: the folder is first written as ``checkpoints/.step-NNNNNNN.tmp<pid>`` (each file fsync'ed), then
renamed into place and the parent fsync'ed, so a reader sees either the whole checkpoint or none of it; dot-folders
are never taken for checkpoints. Old checkpoints are pruned by renaming them to a dot-folder first, so a crash
mid-delete cannot leave a half-deleted folder that looks like a checkpoint. A save that fails (a full disk) removes
its temporary folder and leaves the earlier checkpoints as they were.

Integrity: a file that was truncated or changed fails its checksum and is refused, on one line. Nothing is
unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as safetensors_bytes

from elbox.errors import UserError

CHECKPOINT_RE = re.compile(r"^step-(\d{7,})$")
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# --------------------------------------------------------------------------------------------- file helpers
def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()  # read in blocks, no loop of ours to get wrong


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write and fsync: when this returns, the bytes are on the disk (or an OSError said why not)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that a crash leaves either the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write_bytes_durably(tmp, text.encode())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _manifest_checksum(manifest: dict[str, Any]) -> str:
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes: equal digests mean bit-identical tensors (to compare processes)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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


def all_finite(state: dict[str, torch.Tensor]) -> bool:
    """Whether every floating-point tensor of a state dict is free of NaN/Inf."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's generator states: torch's CPU generator and, training on a GPU, that GPU's (only that one:
    asking every visible GPU would open a CUDA context on each from every process)."""
    states = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def restore_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


# ------------------------------------------------------------------------------------------------- saving
@dataclass
class Checkpoint:
    """A checkpoint read from disk: tensors on the CPU, metadata from its manifest."""

    path: Path
    manifest: dict[str, Any]
    model: dict[str, torch.Tensor]
    ema: dict[str, torch.Tensor] | None
    optimizer: dict[str, Any] | None
    rng: dict[str, dict[str, torch.Tensor]] | None  # per rank: {"0": {"torch": ..., "cuda": ...}, ...}

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
    rng: dict[str, dict[str, torch.Tensor]],
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the ``keep`` newest. Returns its folder.

    ``rng`` holds each rank's generator states, keyed by rank. A complete checkpoint of the same step is kept as it
    is (after a resume it holds the same state), so that no moment exists in which it is missing. If the disk fills
    up (or any write fails) the half-written folder is removed, the previous checkpoints are untouched, and a
    UserError says so.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    if (final / MANIFEST).is_file():
        return final
    tmp = root / f".step-{step:07d}.tmp{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = {"model.safetensors": _cpu(model_state),
                 "rng.safetensors": {f"{rank}/{k}": v for rank, s in rng.items() for k, v in s.items()}}
        if ema_state is not None:
            files["ema.safetensors"] = _cpu(ema_state)
        optimizer_meta = None
        if optimizer_state is not None:
            opt_tensors, optimizer_meta = optimizer_to_flat(optimizer_state)
            files["optimizer.safetensors"] = _cpu(opt_tensors)
        digests = {}
        for name, tensors in files.items():
            data = safetensors_bytes(tensors)
            write_bytes_durably(tmp / name, data)
            digests[name] = hashlib.sha256(data).hexdigest()
        manifest = {"format": FORMAT_VERSION, "step": step, "model": description, "optimizer": optimizer_meta,
                    "files": digests, **extra}
        manifest["checksum"] = _manifest_checksum(manifest)
        write_bytes_durably(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        fsync_path(tmp)
        tmp.rename(final)  # the moment the checkpoint appears, whole
        fsync_path(root)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir, verify=False)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        reason = f"the disk is full ({e.strerror})" if e.errno in DISK_FULL else f"{e.strerror or e}"
        raise UserError(f"could not save checkpoint {final}: {reason}; {kept}") from None
    prune_checkpoints(root, keep)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temporary and half-deleted dot-folders are not)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and (p / MANIFEST).is_file()]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the ``keep`` newest checkpoints; remove older ones and the leftovers of interrupted saves."""
    for old in list_checkpoints(root.parent)[: -max(1, keep)]:
        trash = root / f".{old.name}.del{os.getpid()}"
        old.rename(trash)  # from here on it is no longer a checkpoint, even if the delete below is cut short
    for leftover in root.glob(".step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(run_dir: Path, verify: bool = True) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return None
    if verify:
        try:
            read_manifest(ckpts[-1], verify=True)
        except UserError as e:
            hint = f"; delete it to go back to {ckpts[-2]}" if len(ckpts) > 1 else ""
            raise UserError(f"{e}{hint}") from None
    return ckpts[-1]


def latest_valid_checkpoint(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, for a resume; newer step folders that do not (no manifest, a bad
    checksum: hand-damaged or foreign) are renamed to ``step-NNNNNNN.invalid`` so that no later save trips on
    them, and each move is described in the returned notes."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None, []
    folders = sorted((p for p in root.iterdir() if CHECKPOINT_RE.match(p.name) and p.is_dir()),
                     key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))
    notes = []
    for folder in reversed(folders):
        try:
            read_manifest(folder, verify=True)
            return folder, notes
        except UserError as e:
            aside = folder.with_name(folder.name + ".invalid")
            n = 1
            while aside.exists():
                aside, n = folder.with_name(f"{folder.name}.invalid-{n}"), n + 1
            folder.rename(aside)
            notes.append(f"moved the invalid checkpoint {folder} aside to {aside} ({e})")
    return None, notes


# ------------------------------------------------------------------------------------------------ loading
def read_manifest(path: Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of a checkpoint folder; with verify, every file's checksum is checked first."""
    mpath = Path(path) / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
        manifest["step"], manifest["model"]["kind"], manifest["checksum"]
    except FileNotFoundError:
        raise UserError(f"{path} is not an elbox checkpoint: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError, OSError, RecursionError):
        raise UserError(f"checkpoint manifest {mpath} is damaged (not the JSON elbox writes); refusing to load it") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise UserError(f"{mpath}: checkpoint format {manifest.get('format')!r} is not {FORMAT_VERSION}, the one this elbox reads")
    problem = manifest_problem(manifest)
    if problem:  # checked whole before anything is read or allocated (a checksum anyone can recompute is no proof)
        raise UserError(f"checkpoint manifest {mpath} is not valid ({problem}); refusing to load it")
    if verify:
        if _manifest_checksum(manifest) != manifest["checksum"]:
            raise UserError(f"checkpoint manifest {mpath} does not match its checksum (modified); refusing to load it")
        for name, digest in files.items():
            fpath = Path(path) / name
            if not fpath.is_file():
                raise UserError(f"checkpoint file {fpath} is missing; the checkpoint is incomplete")
            if sha256(fpath) != digest:
                raise UserError(f"checkpoint file {fpath} does not match its checksum (truncated or modified); refusing to load it")
    return manifest


#: the files a checkpoint may hold (a manifest naming any other, "../x" say, is refused)
CHECKPOINT_FILES = ("model.safetensors", "rng.safetensors", "ema.safetensors", "optimizer.safetensors")
MAX_DATA_DIMS = 2**26  # 64M numbers per example: far above any image, far below a memory error


def _is_int(v: Any, low: int = 0, high: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)


def manifest_problem(m: Any) -> str | None:
    """What is wrong with a manifest's structure, in a few words, or None: the schema elbox writes."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if not _is_int(m.get("step")):
        return "step must be an integer >= 0"
    if not isinstance(m.get("checksum"), str):
        return "checksum must be a string"
    files = m.get("files")
    if not isinstance(files, dict) or not {"model.safetensors", "rng.safetensors"} <= set(files):
        return "files must map model.safetensors, rng.safetensors (and optionally ema/optimizer) to checksums"
    for name, digest in files.items():
        if name not in CHECKPOINT_FILES:
            return f"unknown file {name!r} (allowed: {', '.join(CHECKPOINT_FILES)})"
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)):
            return f"the checksum of {name} is not a sha256 hex digest"
    model = m.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("kind"), str) or not isinstance(model.get("config"), dict):
        return "model must hold a kind (string) and a config (object)"
    shape = model.get("data_shape")
    if not (isinstance(shape, list) and 1 <= len(shape) <= 3 and all(_is_int(d, 1, 2**16) for d in shape)
            and math.prod(shape) <= MAX_DATA_DIMS):
        return f"data_shape must be 1 to 3 sizes between 1 and 65536 (at most {MAX_DATA_DIMS} numbers)"
    if not isinstance(model.get("data", {}), dict):
        return "model.data must be an object"
    if m.get("optimizer") is not None and not isinstance(m["optimizer"], dict):
        return "optimizer must be an object or null"
    loader = m.get("loader", {})
    if not isinstance(loader, dict) or not all(isinstance(v, dict) for v in loader.values()):
        return "loader must map ranks to objects"
    if not _is_int(m.get("ema_updates", 0)):
        return "ema_updates must be an integer >= 0"
    if m.get("scaler") is not None and not isinstance(m["scaler"], dict):
        return "scaler must be an object or null"
    return None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_safetensors_bytes(path.read_bytes())
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
    if latest is None and path.name == "checkpoints":  # RUN/checkpoints: its run's latest
        latest = latest_checkpoint(path.parent, verify=False)
    if latest is None:
        raise UserError(f"{path} holds no checkpoint (expected {path}/checkpoints/step-NNNNNNN/{MANIFEST})")
    return latest


def load_checkpoint(path: str | Path, *, with_training_state: bool = True) -> Checkpoint:
    """Read and verify a checkpoint folder (or a run folder's latest checkpoint)."""
    path = resolve_checkpoint(path)
    manifest = read_manifest(path, verify=True)
    model = _load_tensors(path / "model.safetensors")
    ema = _load_tensors(path / "ema.safetensors") if "ema.safetensors" in manifest["files"] else None
    optimizer = rng = None
    if with_training_state:
        if manifest.get("optimizer") is not None:
            optimizer = optimizer_from_flat(_load_tensors(path / "optimizer.safetensors"), manifest["optimizer"])
        rng = {}
        for key, value in _load_tensors(path / "rng.safetensors").items():
            rank, name = key.split("/", 1)
            rng.setdefault(rank, {})[name] = value
    return Checkpoint(path=path, manifest=manifest, model=model, ema=ema, optimizer=optimizer, rng=rng)


def load_weights(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """load_state_dict with a one-line error when the weights belong to a different model."""
    check_weights_fit(module, state, source)
    module.load_state_dict(state)


def check_weights_fit(module: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """A one-line error unless ``state`` has exactly the names, shapes and dtypes of ``module``'s state dict. The
    module may live on the "meta" device: a model described by a manifest is checked against the weights on disk
    before any memory is allocated for it."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and (tuple(own[k].shape) != tuple(state[k].shape) or own[k].dtype != state[k].dtype)]
    if missing or unexpected or wrong:
        detail = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                  else f"{wrong[0]} is {state[wrong[0]].dtype} {tuple(state[wrong[0]].shape)}, expected "
                  f"{own[wrong[0]].dtype} {tuple(own[wrong[0]].shape)}")
        raise UserError(f"{source} holds weights of a different model ({detail}); refusing to load it")
