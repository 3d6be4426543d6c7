"""Maps between stored uint8 images and a model's data range, and the resizing done once at load time.

Every image data set is stored as uint8; a model sees it through exactly one transform, ``to_model``:

- ``"symmetric"``: x / 127.5 - 1, in [-1, 1] (Ho et al. 2020, §3.3: "data consisting of integers in {0, ..., 255}
  scaled linearly to [-1, 1]"; the DDPM's discrete decoder assumes this grid);
- ``"unit"``: x / 255, in [0, 1] (a VAE with a Gaussian or continuous-Bernoulli decoder);
- ``"binary"``: dynamic binarization, a fresh Bernoulli(x / 255) draw each time (a VAE with a Bernoulli decoder;
  Salakhutdinov & Murray 2008).

``from_model`` goes back to uint8 for PNGs. Vector data (toy2d) is already float and passes through ``to_model``.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from elbox.errors import UserError

DataRange = Literal["symmetric", "unit", "binary"]
DATA_RANGES: tuple[str, ...] = get_args(DataRange)


def check_data_range(data_range: str) -> DataRange:
    if data_range not in DATA_RANGES:
        raise UserError(f"unknown data range {data_range!r}; use one of {', '.join(DATA_RANGES)}")
    return data_range  # type: ignore[return-value]


def to_model(x: Tensor, data_range: str, *, generator: torch.Generator | None = None) -> Tensor:
    """uint8 images -> float32 in the model's range; float (vector) data is returned unchanged."""
    check_data_range(data_range)
    if x.is_floating_point():
        return x
    if x.dtype != torch.uint8:
        raise TypeError(f"to_model takes uint8 images or float vectors, got {x.dtype}")
    xf = x.to(torch.float32)  # a new tensor: the in-place ops below touch no one else's memory
    if data_range == "symmetric":
        return xf.div_(127.5).sub_(1.0)
    if data_range == "unit":
        return xf.div_(255.0)
    # "binary": one Bernoulli draw per pixel with p = x/255 (dynamic binarization)
    return torch.bernoulli(xf.div_(255.0), generator=generator)


def from_model(x: Tensor, data_range: str) -> Tensor:
    """Model-range floats -> uint8 (clamped, rounded to nearest); the inverse of ``to_model`` on the uint8 grid."""
    check_data_range(data_range)
    if x.dtype == torch.uint8:
        return x
    u = (x.float() + 1.0) * 127.5 if data_range == "symmetric" else x.float() * 255.0
    return u.clamp(0.0, 255.0).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------ load-time fitting


def grey_to_rgb(x: Tensor) -> Tensor:
    return x.expand(-1, 3, -1, -1).contiguous()


def rgb_to_grey(x: Tensor) -> Tensor:
    """ITU-R 601-2 luma in PIL's fixed-point form, so tensors and PIL's convert("L") give the same bytes."""
    r, g, b = (x[:, i].to(torch.int32) for i in range(3))
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8).unsqueeze(1)


def center_crop_resize(x: Tensor, size: int, *, chunk: int = 4096) -> Tensor:
    """Center-crop uint8 (N, C, H, W) images to a square, then resize to size x size (bicubic, antialiased)."""
    h, w = x.shape[-2:]
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = x[..., top : top + s, left : left + s]
    if s == size:
        return x.contiguous()
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        y = F.interpolate(x[i : i + chunk].float(), size=(size, size), mode="bicubic", antialias=True, align_corners=False)
        out[i : i + chunk] = y.clamp_(0, 255).round_().to(torch.uint8)
    return out


def fit_images(x: Tensor, image_size: int | None, channels: int | None) -> tuple[Tensor, list[str]]:
    """Convert uint8 (N, C, H, W) to the requested channel count and size; also returns what was done, in words."""
    notes: list[str] = []
    if channels is not None and channels != x.shape[1]:
        x = grey_to_rgb(x) if channels == 3 else rgb_to_grey(x)
        notes.append(f"converted to {channels} channel{'s' if channels > 1 else ''}")
    if image_size is not None and tuple(x.shape[-2:]) != (image_size, image_size):
        notes.append(f"resized to {image_size}x{image_size}")
        x = center_crop_resize(x, image_size)
    return x, notes


def hflip_(x: Tensor, which: Tensor) -> Tensor:
    """Flip the images x[which] (N, C, H, W) left-right, in place; ``which`` is an index tensor. Returns x.

    Only the chosen images are copied (torch.where would copy the whole batch twice); with ``which`` made on the
    CPU and moved to the GPU, nothing waits for the GPU.
    """
    if len(which):
        x.index_copy_(0, which, x.index_select(0, which).flip(-1))  # twice as fast as x[which] = ... on CPU
    return x
