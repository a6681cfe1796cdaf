"""A small digits CNN: the offline feature extractor and classifier of the CPU demo.

FID computed with it is a *digits-feature* FID: a Fréchet distance between Gaussians fitted to this
network's 64-d penultimate features. It is not Inception FID and is not comparable with any published
figure; every value it produces is labelled with ``NAME`` and the weights' SHA-256.

Input protocol: whatever the data resolution (the 8×8 digits, or the demo's 16/32 px upsampled
versions), the image is converted to grey (mean over channels), resized to the digits' native
``INPUT_PX``×``INPUT_PX`` (box averaging when the size is a multiple of 8, else antialiased bilinear)
and scaled from [0, 255] to [-1, 1]. The weights are trained by ``evaluation/train_digits_net.py`` on
the digits train split (with up/down-sampling round trips as augmentation, so the demo's upsampled
data looks like the native data to it) and committed as ``evaluation/assets/digits_features.safetensors``.

It fits only data like its own (``misfit``): grey 8x8 images of 10 classes, or scikit-learn's digits
prepared at another size (the manifest's source kind ``digits``). Evaluation refuses it for anything
else before sampling, and reports its class figures only where it fits.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open
from torch import nn

NAME = "digits-cnn-v1"
INPUT_PX = 8  # the digits' native resolution: every input is resized to this
FEATURE_DIM = 64
NUM_CLASSES = 10
WEIGHTS_PATH = Path(__file__).resolve().parent / "assets" / "digits_features.safetensors"
CHANNELS = 1  # the data it was trained on: scikit-learn's digits, grey ...
SOURCE_KIND = "digits"  # ... prepared by `python -m pipeline.data.prepare digits` (manifest source kind)


def misfit(image_size: int, channels: int, num_classes: int, source_kind: str = "") -> list[str]:
    """How data of this geometry and class count differs from what the net was trained on ([] = it fits).

    Its features and classes mean something only for images like its training data: grey, 10 classes, and
    8x8 (or the digits themselves prepared at another size: it was trained with resize round trips, so it
    resizes them back). ``num_classes``: 0 = unlabelled data, -1 = unknown (no manifest); ``image_size`` 0 = unknown.
    """
    out = []
    if channels != CHANNELS:
        out.append(f"{channels} channels, not {CHANNELS} (grey)")
    if image_size != INPUT_PX and source_kind != SOURCE_KIND:
        shown = f"{image_size}x{image_size}" if image_size else "of unknown size"
        out.append(f"images {shown}, not {INPUT_PX}x{INPUT_PX}")
    if num_classes != NUM_CLASSES:
        shown = {0: "no labels", -1: "an unknown class count (no manifest.json)"}.get(num_classes,
                                                                                     f"{num_classes} classes")
        out.append(f"{shown}, not {NUM_CLASSES} classes")
    return out


class DigitsNet(nn.Module):
    """conv(16) → conv(32) → pool → conv(64) → pool → linear(64) = features → linear(10) = logits."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 4×4
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 2×2
            nn.Flatten(),
        )  # fmt: skip
        self.embed = nn.Linear(64 * 2 * 2, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 255] (uint8 or float) → (B, 1, 8, 8) float in [-1, 1]."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"digits net expects images (B, 1 or 3, H, W); got shape {tuple(images.shape)}")
        x = images.float().mean(dim=1, keepdim=True)
        h, w = x.shape[-2:]
        if (h, w) != (INPUT_PX, INPUT_PX):
            if h % INPUT_PX == 0 and w % INPUT_PX == 0:
                x = F.interpolate(x, size=(INPUT_PX, INPUT_PX), mode="area")
            else:
                x = F.interpolate(x, size=(INPUT_PX, INPUT_PX), mode="bilinear", antialias=True, align_corners=False)
        return x / 127.5 - 1.0

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The 64-d embedding (before the ReLU that feeds the classifier): dense, so covariances are well conditioned."""
        return self.embed(self.conv(self.preprocess(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(F.relu(self.features(images)))


class DigitsFeatures(nn.Module):
    """clean-fid's ``custom_feat_extractor`` interface: (B, 3, H, W) float in [0, 255] → (B, 64)."""

    def __init__(self, net: DigitsNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(path: str | Path = WEIGHTS_PATH) -> str:
    """Hash of the tensors (names, dtypes, shapes, bytes; sorted), not of the file: safetensors writes its
    metadata in varying order, so retraining with the same seed gives the same hash."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


def weights_metadata(path: str | Path = WEIGHTS_PATH) -> dict[str, str]:
    """The metadata stored in the weights file (held-out accuracy, training command, split sizes)."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@lru_cache(maxsize=4)
def _load(path: str, device: str) -> DigitsNet:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"digits feature network weights {p} are missing; they ship with the repository "
            "(restore the file from git) or can be re-made with `python -m evaluation.train_digits_net`"
        )
    net = DigitsNet()
    net.load_state_dict(load_file(str(p)))
    return net.to(device).eval().requires_grad_(False)


def load_digits_net(path: str | Path = WEIGHTS_PATH, device: str | torch.device = "cpu") -> DigitsNet:
    """The trained net in eval mode (cached per path and device)."""
    return _load(str(path), str(device))


@torch.no_grad()
def predict_proba(
    images: np.ndarray | torch.Tensor, *, net: DigitsNet | None = None, batch_size: int = 512
) -> np.ndarray:
    """Class probabilities (N, 10) for images (N, 1|3, H, W) with values in [0, 255]."""
    net = net or load_digits_net()
    device = next(net.parameters()).device
    x = torch.as_tensor(images)
    out = [F.softmax(net(x[i : i + batch_size].to(device)), dim=1).cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, NUM_CLASSES))


def class_summary(probs: np.ndarray, threshold: float = 0.9) -> dict:
    """Share of images labelled with confidence >= threshold and the histogram of predicted classes."""
    if len(probs) == 0:
        return {"confident_share": float("nan"), "class_histogram": [0] * NUM_CLASSES, "threshold": threshold}
    conf = probs.max(axis=1)
    hist = np.bincount(probs.argmax(axis=1), minlength=NUM_CLASSES)
    return {
        "confident_share": float((conf >= threshold).mean()),
        "class_histogram": [int(c) for c in hist],
        "threshold": threshold,
    }
