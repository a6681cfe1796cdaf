"""uint8 image helpers for logging and figures: tile samples into a grid, normalise one image to HWC."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def upscale_factor(count: int, width: int, nrow: int, padding: int, min_width: int) -> int:
    """The smallest integer factor that makes a grid of ``count`` images ``width`` px wide, ``nrow`` per row,
    at least ``min_width`` px wide (tiny images, e.g. 8x8 digits, are unreadable at their own size)."""
    if min_width <= 0 or count <= 0:
        return 1
    cols = min(nrow, count)
    if count == 1:  # make_grid returns a single image as it is, without padding
        return max(1, math.ceil(min_width / width))
    return max(1, math.ceil((min_width - padding * (cols + 1)) / (cols * width)))


def image_grid(images: Any, nrow: int | None = None, padding: int = 2, pad_value: int = 0,
               min_width: int = 0) -> np.ndarray:
    """Tile uint8 images (N, C, H, W) into one HWC uint8 image (torchvision's make_grid; grey becomes RGB).

    ``nrow`` images per row; default: ceil(sqrt(N)), a square-ish grid. ``min_width`` > 0: each image is
    first enlarged by the smallest integer factor (nearest neighbour: every pixel becomes a k x k block, no
    new values) that makes the grid at least that many pixels wide; the padding stays ``padding`` px.
    """
    # torchvision: ~4 s of import, only when a grid is drawn
    from torchvision.utils import make_grid

    t = torch.as_tensor(images).cpu()
    if t.dtype != torch.uint8 or t.ndim != 4:
        raise ValueError(f"image_grid wants uint8 images shaped (N, C, H, W); got {t.dtype} {tuple(t.shape)}")
    n = t.shape[0]
    nrow = nrow or math.ceil(math.sqrt(n))
    factor = upscale_factor(n, t.shape[-1], nrow, padding, min_width)
    if factor > 1:
        t = t.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    grid = make_grid(t, nrow=nrow, padding=padding, pad_value=pad_value)
    return grid.permute(1, 2, 0).contiguous().numpy()


def to_hwc_uint8(image: Any) -> np.ndarray:
    """A private copy of a uint8 image (array or tensor; HW, HWC or CHW) as HW (grey) or HWC (RGB, RGBA)."""
    arr = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image)
    if arr.dtype != np.uint8:
        raise ValueError(f"log_image wants uint8 pixels (0..255); got {arr.dtype} (convert with image_grid or .to(uint8))")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[2] not in (1, 3, 4):
        arr = arr.transpose(1, 2, 0)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"log_image wants HW, HWC or CHW with 1, 3 or 4 channels; got shape {arr.shape}")
    # a copy: the caller may change its buffer before the sender thread reads this one
    return np.ascontiguousarray(arr).copy()
