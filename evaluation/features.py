"""Feature extractors for FID/KID: clean-fid's InceptionV3 and the bundled digits network.

An extractor maps uint8 images (N, C, H, W) to features (N, D) and carries its provenance: its name,
the SHA-256 of its weights and how images are resized before it. The Inception path is clean-fid's own
code (its TorchScript InceptionV3 wrapper, its per-mode resizers, its batch feature function); what is
ours is loading the weights from a file the user names and a clear error when they cannot be had.
"""

from __future__ import annotations

import os
import tempfile
import urllib.error
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cleanfid import downloads_helper
from cleanfid.fid import get_batch_features
from cleanfid.inception_torchscript import InceptionV3W
from cleanfid.resize import build_resizer
from torch import nn
from tqdm import tqdm

from evaluation import digits_net
from pipeline.cli import InputError

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_NAME = "inception-v3-2015-12-05"

# How clean-fid's modes resize (cleanfid/resize.py, cleanfid/features.py); recorded with every figure.
RESIZE_MODES = {
    "clean": "clean: PIL bicubic to 299x299 in float32, no quantisation (clean-fid)",
    "legacy_pytorch": "legacy_pytorch: torch bilinear to 299x299 (pytorch-fid style)",
    "legacy_tensorflow": "legacy_tensorflow: resize inside the TorchScript Inception graph (TF-FID compatible)",
}


class InceptionWeightsUnavailable(RuntimeError, InputError):
    """clean-fid's InceptionV3 file could not be found or downloaded."""


@dataclass
class FeatureExtractor:
    """uint8 images → features, with the provenance every FID/KID value carries."""

    name: str  # e.g. inception-v3-2015-12-05 or digits-cnn-v1
    weights_sha256: str
    resize: str  # how images are resized before the network
    model: nn.Module  # clean-fid's custom_feat_extractor interface: (B, 3, H', W') float in [0, 255] → (B, D)
    fid_mode: str  # clean-fid mode for Inception; "digits" for the digits net
    device: torch.device
    batch_size: int = 128
    num_workers: int = 0  # processes for the per-image resize (clean-fid's DataLoader)

    @property
    def provenance(self) -> dict[str, str]:
        return {"name": self.name, "weights_sha256": self.weights_sha256, "resize": self.resize, "mode": self.fid_mode}

    @property
    def short_id(self) -> str:
        """Name plus the first 12 hex digits of the weights hash, for file names and labels."""
        return f"{self.name}@{self.weights_sha256[:12]}"

    def __call__(self, images: np.ndarray | torch.Tensor, *, desc: str = "features") -> np.ndarray:
        """Features (N, D) float64 of uint8 images (N, 1|3, H, W)."""
        images = torch.as_tensor(images)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"features need uint8 images (N, 1 or 3, H, W); got {images.dtype} {tuple(images.shape)}"
            )
        if len(images) == 0:
            raise ValueError("features of an empty image set: there is nothing to measure")
        loader = torch.utils.data.DataLoader(
            _ResizeImages(images, self.fid_mode),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
        )
        feats = [get_batch_features(batch, self.model, self.device) for batch in tqdm(loader, desc=desc, leave=False)]
        return np.concatenate(feats).astype(np.float64)


class _ResizeImages(torch.utils.data.Dataset):
    """In-memory images through clean-fid's per-mode resizer, as its ResizeDataset does for files.

    Grey images are repeated to RGB as PIL's ``convert('RGB')`` does in clean-fid's folder path. The
    digits net resizes inside itself, so its images pass through unchanged (float, [0, 255]).
    """

    def __init__(self, images: torch.Tensor, mode: str) -> None:
        self.images = images
        self.mode = mode
        self.fn_resize = None if mode == "digits" else build_resizer(mode)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        img = self.images[i]
        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        if self.fn_resize is None:
            return img.float()
        out = self.fn_resize(np.ascontiguousarray(img.permute(1, 2, 0).numpy()))  # HWC in, HWC out
        return torch.from_numpy(np.asarray(out, dtype=np.float32).transpose(2, 0, 1).copy())


def default_device(name: str = "") -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


def digits_extractor(device: torch.device, *, batch_size: int = 512, weights: str | Path = "") -> FeatureExtractor:
    path = Path(weights) if weights else digits_net.WEIGHTS_PATH
    net = digits_net.load_digits_net(path, device)
    return FeatureExtractor(
        name=digits_net.NAME,
        weights_sha256=digits_net.weights_sha256(path),
        resize=f"digits: grey, box/antialiased resize to {digits_net.INPUT_PX}x{digits_net.INPUT_PX} inside the net",
        model=digits_net.DigitsFeatures(net),
        fid_mode="digits",
        device=device,
        batch_size=batch_size,
    )


# What the offline error offers instead when the data are not known here; evaluate names the one that fits.
OFFLINE_ALTERNATIVES = ("Without it: eval.feature_extractor=none (no FID: the sample grid and bits/dim only), or, "
                        "for scikit-learn's digits, eval.feature_extractor=digits (a digits-feature FID, not "
                        "Inception FID).")


def _offline_message(url: str, looked_in: str, reason: Any, instead: str) -> str:
    return (
        f"clean-fid's InceptionV3 weights {INCEPTION_FILE} are not in {looked_in} and could not be downloaded "
        f"from {url} ({reason}). On a machine with network access download that URL, then either put the file "
        f"at {os.path.join(looked_in, INCEPTION_FILE)} (where clean-fid looks) or pass "
        f"eval.inception_weights=/path/to/{INCEPTION_FILE}. {instead}"
    )


def inception_weights_file(weights: str = "", *, download_dir: str = "", url: str = "",
                           instead: str = OFFLINE_ALTERNATIVES) -> Path:
    """The InceptionV3 TorchScript file: the user's path, else clean-fid's cache (downloaded if missing);
    ``instead``: the offline error's last sentence, what to use without the file."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsUnavailable(
                f"eval.inception_weights={weights!r} does not exist; download {INCEPTION_FILE} from "
                f"{url or downloads_helper.inception_url} and point eval.inception_weights at it"
            )
        return path
    # clean-fid keeps the file in the system temp folder (cleanfid/features.py: "/tmp", "./" on Windows)
    looked_in = download_dir or ("./" if os.name == "nt" else tempfile.gettempdir())
    url = url or downloads_helper.inception_url
    path = Path(looked_in) / INCEPTION_FILE
    if path.is_file():
        return path
    saved = downloads_helper.inception_url
    downloads_helper.inception_url = url  # clean-fid reads its module constant; restore it afterwards
    try:
        return Path(downloads_helper.check_download_inception(fpath=looked_in))
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if path.is_file() and path.stat().st_size == 0:
            path.unlink()  # clean-fid opens the file only once the connection is up; never leave an empty one
        raise InceptionWeightsUnavailable(_offline_message(url, looked_in, getattr(exc, "reason", exc),
                                                           instead)) from exc
    finally:
        downloads_helper.inception_url = saved


class _InceptionFromFile(InceptionV3W):
    """clean-fid's InceptionV3W (same forward), loaded from any file name instead of <dir>/inception-2015-12-05.pt."""

    def __init__(self, path: Path, resize_inside: bool) -> None:
        nn.Module.__init__(self)
        try:
            self.base = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # TorchScript raises RuntimeError subclasses of many kinds
            raise InceptionWeightsUnavailable(
                f"could not load {path} as clean-fid's TorchScript InceptionV3 ({exc}); the file may be truncated: "
                f"delete it and download {downloads_helper.inception_url} again"
            ) from exc
        self.layers = self.base.layers
        self.resize_inside = resize_inside


def inception_extractor(
    mode: str,
    device: torch.device,
    *,
    weights: str = "",
    batch_size: int = 128,
    num_workers: int = 0,
    download_dir: str = "",
    url: str = "",
    instead: str = OFFLINE_ALTERNATIVES,
) -> FeatureExtractor:
    """clean-fid's InceptionV3 feature extractor for a clean-fid mode (clean, legacy_tensorflow, legacy_pytorch);
    ``instead``: what the offline error offers in place of the weights.

    legacy_pytorch uses clean-fid's pytorch-fid port, whose weights come from torchvision/pytorch-fid
    downloads; clean and legacy_tensorflow use the TorchScript file ``inception-2015-12-05.pt``.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"eval.fid_mode={mode!r} is not a clean-fid mode; choose one of {sorted(RESIZE_MODES)}")
    if mode == "legacy_pytorch":
        # clean-fid imports torchvision (~4 s): only the processes that compute FID pay it
        from cleanfid.features import feature_extractor

        try:
            fn = feature_extractor("pytorch_inception", device=device, use_dataparallel=False)
        except (urllib.error.URLError, OSError) as exc:
            raise InceptionWeightsUnavailable(
                f"clean-fid's legacy_pytorch Inception (pytorch-fid weights pt_inception-2015-12-05) could not be "
                f"downloaded ({exc}); use eval.fid_mode=clean or legacy_tensorflow with eval.inception_weights. "
                f"{instead}"
            ) from exc
        return FeatureExtractor(
            # torch hub names the file by its hash prefix; clean-fid does not check it, so we say so
            "inception-v3-pytorch-fid", "unverified:pt_inception-2015-12-05-6726825d", RESIZE_MODES[mode],
            _Callable(fn), mode, device, batch_size, num_workers,
        )  # fmt: skip
    path = inception_weights_file(weights, download_dir=download_dir, url=url, instead=instead)
    model = _InceptionFromFile(path, resize_inside=(mode == "legacy_tensorflow")).to(device)
    return FeatureExtractor(
        INCEPTION_NAME, digits_net.file_sha256(path), RESIZE_MODES[mode], model, mode, device, batch_size, num_workers
    )


class _Callable(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


def build_extractor(eval_cfg, device: torch.device | None = None, *,
                    instead: str = OFFLINE_ALTERNATIVES) -> FeatureExtractor:
    """The extractor named by ``eval.feature_extractor`` (config: pipeline.config.EvalConfig); ``instead``: what
    an unavailable InceptionV3 error offers in its place (the caller knows the data)."""
    device = device or default_device(eval_cfg.device)
    if eval_cfg.feature_extractor == "digits":
        return digits_extractor(device, batch_size=eval_cfg.feature_batch_size)
    return inception_extractor(
        eval_cfg.fid_mode,
        device,
        weights=eval_cfg.inception_weights,
        batch_size=eval_cfg.feature_batch_size,
        num_workers=eval_cfg.num_workers,
        instead=instead,
    )
