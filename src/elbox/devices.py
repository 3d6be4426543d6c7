"""Which torch device a command runs on: used by training, sampling and evaluation alike."""

from __future__ import annotations

import torch

from elbox.errors import UserError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"device={name!r} was asked for but no CUDA GPU is available; use device='cpu' or 'auto'")
        return torch.device(f"cuda:{local_rank}") if name == "cuda" else torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise UserError(f"device={name!r} is not known; use cpu, cuda, cuda:N or auto")
