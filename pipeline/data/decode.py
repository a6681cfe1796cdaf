"""The one image decoder (a sample's image member -> uint8 (H, W, C)) and the one uint8 -> [-1, 1] scaling
(numpy, ``to_unit_range``, and its torch twin ``unit_range`` for batches converted on the device).

Training (pipeline.data.loader) and evaluation (pipeline.data.sequential: FID reference statistics,
held-out bits/dim) both go through these two functions, so evaluation sees the training pixels, bit
for bit.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

IMAGE_EXTS = ("png", "u8", "jpg", "jpeg", "webp", "ppm")
_SCALE = np.float32(1.0 / 127.5)


def decode_image(parts: dict[str, bytes], size: int, channels: int, encoding: str) -> np.ndarray:
    """uint8 (H, W, C) from a sample's image member; checks the geometry the manifest promises.

    `size`/`channels` 0 and `encoding` "" mean unknown (no manifest): the image is kept as decoded and
    the member is found by extension. Raw `u8` members need the geometry.
    """
    ext = encoding if encoding in parts else next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        raise ValueError(f"no image member (has {sorted(parts)})")
    data = parts[ext]
    if ext == "u8":
        if not size or not channels:
            raise ValueError("raw u8 samples need image_size/channels from a manifest")
        if len(data) != size * size * channels:
            raise ValueError(f"{len(data)} bytes, expected {size}x{size}x{channels}")
        return np.frombuffer(data, np.uint8).reshape(size, size, channels)

    with Image.open(io.BytesIO(data), formats=None if ext != "png" else ("PNG",)) as im:
        # the size from the header, before any pixel is decoded: a few hundred KiB of PNG can inflate to
        # gigabytes (docs/security.md). Without a manifest, PIL's own bound (where it only warns) is the limit.
        width, height = im.size
        if size and (width, height) != (size, size):
            raise ValueError(f"image is {width}x{height}, expected {size}x{size} (its header; not decoded)")
        if not size and Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
            raise ValueError(f"image is {width}x{height}, over {Image.MAX_IMAGE_PIXELS} pixels (its header; not "
                             "decoded)")
        want = {1: "L", 3: "RGB"}.get(channels)
        if want and im.mode != want:
            im = im.convert(want)
        image = np.asarray(im)
    if image.ndim == 2:
        image = image[:, :, None]
    return image


def unit_range(batch: torch.Tensor) -> torch.Tensor:
    """``to_unit_range`` in torch, on the batch's device: a uint8 batch -> float32 in [-1, 1], bit for bit the same
    values (the same float32 scale, then minus 1). The trainer converts on the GPU what crossed as uint8."""
    return batch.to(torch.float32).mul_(float(_SCALE)).sub_(1.0)


def to_unit_range(image: np.ndarray, out: np.ndarray) -> np.ndarray:
    """uint8 -> float32 in [-1, 1] (0 -> -1, 255 -> 1 exactly), written into `out` of the same shape.

    `image` may be a strided view (the loader passes HWC transposed to CHW); per-sample numpy passes
    stay in cache and never touch torch's intra-op thread pool.
    """
    np.multiply(image, _SCALE, out=out, casting="unsafe")
    out -= np.float32(1.0)
    return out
