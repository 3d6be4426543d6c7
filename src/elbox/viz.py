"""Pictures a user opens: grids of images, scatter plots of 2-D samples, loss curves. PNG via Pillow only."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def pairs_grid(pairs: torch.Tensor) -> Image.Image:
    """uint8 images (2N, C, H, W) that alternate a test image and its reconstruction, tiled an even number of
    columns wide so each pair sits side by side, under a header that says which column is which."""
    nrow = 2 * math.ceil(math.ceil(math.sqrt(pairs.shape[0])) / 2)
    return image_grid(pairs, nrow=nrow, column_labels=("data", "recon."))


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 2, min_cell: int = 64,
               column_labels: Sequence[str] = ()) -> Image.Image:
    """Tile uint8 images (N, C, H, W) into one picture; small images are scaled up (nearest) to >= min_cell px.
    ``column_labels``, repeated across the columns, are written in a header strip above them."""
    images = images.detach().cpu()
    if images.dtype != torch.uint8:
        raise TypeError("image_grid takes uint8 images; convert with elbox.data.from_model first")
    n, c, h, w = images.shape
    nrow = nrow or max(1, int(math.ceil(math.sqrt(n))))
    ncol = int(math.ceil(n / nrow))
    scale = max(1, int(math.ceil(min_cell / max(h, w))))
    hs, ws = h * scale, w * scale
    grid = np.full((ncol * (hs + pad) + pad, nrow * (ws + pad) + pad, 3), 255, dtype=np.uint8)
    arr = images.numpy()
    for i in range(n):
        img = arr[i].transpose(1, 2, 0)
        img = np.repeat(img, 3, axis=2) if c == 1 else img[..., :3]
        img = img.repeat(scale, axis=0).repeat(scale, axis=1)
        r, col = divmod(i, nrow)
        y, x = pad + r * (hs + pad), pad + col * (ws + pad)
        grid[y : y + hs, x : x + ws] = img
    picture = Image.fromarray(grid)
    if column_labels:
        picture = _with_header(picture, [column_labels[i % len(column_labels)] for i in range(nrow)], ws, pad)
    return picture


def _with_header(picture: Image.Image, labels: Sequence[str], cell: int, pad: int) -> Image.Image:
    """``picture`` under a white strip with one label centred over each column of cells ``cell`` px wide."""
    from PIL import ImageFont

    font = ImageFont.load_default(size=max(9, min(14, cell // 5)))  # Pillow without FreeType: its bitmap font
    height = int(getattr(font, "size", 11) * 1.6)
    out = Image.new("RGB", (picture.width, picture.height + height), "white")
    out.paste(picture, (0, height))
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(labels):
        draw.text((pad + i * (cell + pad) + cell / 2, height / 2 + 1), label, fill=(60, 60, 60), font=font, anchor="mm")
    return out


def scatter_plot(points: np.ndarray, size: int = 512, extent: float | None = None) -> Image.Image:
    """A 2-D scatter plot of points (N, 2) on a white square, axes through the origin (of points (N, ...) with more
    dimensions, the first two)."""
    points = np.asarray(points, dtype=np.float64)
    points = points.reshape(len(points), -1)[:, :2]
    extent = extent or float(np.quantile(np.abs(points), 0.995)) * 1.1 or 1.0
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    mid = size / 2
    draw.line([(0, mid), (size, mid)], fill=(200, 200, 200))
    draw.line([(mid, 0), (mid, size)], fill=(200, 200, 200))
    px = (points[:, 0] / extent + 1) * mid
    py = (1 - points[:, 1] / extent) * mid
    for x, y in zip(px, py):
        draw.point((float(x), float(y)), fill=(31, 119, 180))
    return img


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) that cover [lo, hi]."""
    if not hi > lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    if not (raw > 0 and math.isfinite(raw)):  # a span too small or too large for round numbers
        return [lo, hi]
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.floor(lo / step) * step
    return [first + i * step for i in range(int(math.ceil((hi - first) / step - 1e-9)) + 1)]


def _tick_label(value: float, step: float) -> str:
    """A tick's number with as many decimals as its step needs (1234.5 beside 1235.0, not 1234 beside 1235)."""
    if not (math.isfinite(step) and step > 0) or abs(value) >= 1e7 or step < 1e-6:
        return f"{value:.6g}"
    return f"{value:.{max(0, -math.floor(math.log10(step)))}f}"


def line_plot(series: dict[str, Sequence[tuple[float, float]]], title: str, size: tuple[int, int] = (640, 400),
              xlabel: str = "optimizer step") -> Image.Image:
    """A line chart of named (x, y) series on round-numbered, gridded axes; enough for a loss curve without
    matplotlib. A series of one or two points is drawn with markers."""
    w, h = size
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 64, 20, 30, 44
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    all_pts = [p for pts in series.values() for p in pts if math.isfinite(p[0]) and math.isfinite(p[1])]
    draw.text((left, 8), title, fill="black")
    xs, ys = [p[0] for p in all_pts], [p[1] for p in all_pts]
    if not all_pts or not (math.isfinite(max(xs) - min(xs)) and math.isfinite(max(ys) - min(ys))):
        draw.text((left, h // 2), "not enough points yet", fill="black")
        return img
    xticks, yticks = nice_ticks(min(xs), max(xs)), nice_ticks(min(ys), max(ys))
    x0, x1 = xticks[0], (xticks[-1] if len(xticks) > 1 else xticks[0] + 1)
    y0, y1 = yticks[0], (yticks[-1] if len(yticks) > 1 else yticks[0] + 1e-12 + abs(yticks[0]) * 1e-3)
    ystep = yticks[1] - yticks[0] if len(yticks) > 1 else 1.0

    def to_px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    for y in yticks:  # grid lines and round numbers
        py = to_px(x0, y)[1]
        draw.line([(left, py), (w - right, py)], fill=(225, 225, 225))
        draw.text((left - 6, py), _tick_label(y, ystep), fill="black", anchor="rm")
    for x in xticks:
        px = to_px(x, y0)[0]
        draw.line([(px, top), (px, h - bottom)], fill=(225, 225, 225))
        draw.text((px, h - bottom + 4), f"{x:g}", fill="black", anchor="ma")
    draw.text(((left + w - right) / 2, h - 14), xlabel, fill="black", anchor="ma")
    draw.rectangle([left, top, w - right, h - bottom], outline=(120, 120, 120))
    for k, (name, pts) in enumerate(series.items()):
        colour = colours[k % len(colours)]
        finite = [to_px(x, y) for x, y in pts if math.isfinite(x) and math.isfinite(y)]
        if len(finite) > 1:
            draw.line(finite, fill=colour, width=2)
        if len(finite) < 3:
            for px, py in finite:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.text((w - right - 150, top + 6 + 14 * k), name, fill=colour)
    return img


def save_png(img: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    return path
