"""Feature extractors for FID/KID: clean-fid's InceptionV3 and the bundled digits network.

An extractor maps uint8 images (N, C, H, W) to features (N, D) and carries its provenance: its name,
the SHA-256 of its weights and how images are resized before it. The Inception path is clean-fid's own
code (its TorchScript InceptionV3 wrapper, its per-mode resizers, its batch feature function); what is
ours is where the weights are looked up (a per-user cache or a file the user names, never a shared /tmp),
their pinned sha256, checked before torch.jit.load, and a clear error when they cannot be had.
"""

from __future__ import annotations

import functools
import os
import pickle
import shutil
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
# The sha256 a weights file must have before torch.jit.load reads it. clean-fid ships no digest; this is the one
# k-diffusion pins for the same download (crowsonkb/k-diffusion, k_diffusion/evaluation.py:
# InceptionV3FeatureExtractor checks clean-fid's inception_url against it), 95,607,719 bytes.
PINNED_SHA256 = {INCEPTION_FILE: "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"}

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
        f"from {url} ({reason}). On a machine with network access download that URL (sha256 "
        f"{PINNED_SHA256[INCEPTION_FILE]}), then either put the file at {os.path.join(looked_in, INCEPTION_FILE)} "
        f"(where evaluate looks) or pass eval.inception_weights=/path/to/{INCEPTION_FILE}. {instead}"
    )


def inception_cache_dir() -> Path:
    """Where the weights are looked up and downloaded: this user's cache, $XDG_CACHE_HOME/ddpm-pipeline or
    ~/.cache/ddpm-pipeline. Not clean-fid's /tmp, where on a shared machine anyone can put the file first."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm-pipeline"


def _mismatch(path: Path) -> tuple[str, str] | None:
    """(pinned, actual) sha256 of a weights file that is not the pinned one; None when it is."""
    expected, actual = PINNED_SHA256[INCEPTION_FILE], digits_net.file_sha256(path)
    return (expected, actual) if actual != expected else None


def _check_pinned(path: Path, url: str, setting: str) -> None:
    """Refuse a weights file whose sha256 is not the pinned one, before anything reads it as a model."""
    if wrong := _mismatch(path):
        expected, actual = wrong
        raise InceptionWeightsUnavailable(
            f"{setting}{path} has sha256 {actual}, not that of clean-fid's {INCEPTION_FILE} ({expected}): the file "
            f"may be truncated or replaced, and is not loaded; delete it and download {url} again (check "
            f"`sha256sum {INCEPTION_FILE}` says {expected}), or point eval.inception_weights at such a copy"
        )


def inception_weights_file(weights: str = "", *, download_dir: str = "", url: str = "",
                           instead: str = OFFLINE_ALTERNATIVES) -> Path:
    """The InceptionV3 TorchScript file, its sha256 checked against PINNED_SHA256: the user's path, else the
    per-user cache (``download_dir`` instead, for tests), downloaded there if missing; ``instead``: the offline
    error's last sentence, what to use without the file."""
    url = url or downloads_helper.inception_url
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise InceptionWeightsUnavailable(
                f"eval.inception_weights={weights!r} does not exist; download {INCEPTION_FILE} from "
                f"{url} and point eval.inception_weights at it"
            )
        _check_pinned(path, url, "eval.inception_weights=")
        return path
    looked_in = Path(download_dir) if download_dir else inception_cache_dir()
    path = looked_in / INCEPTION_FILE
    if not path.is_file():
        _download(url, looked_in, instead)
    _check_pinned(path, url, "")
    return path


def _download(url: str, looked_in: Path, instead: str) -> None:
    """clean-fid's download into a private folder beside the cache; the file is moved into place only once its
    sha256 is the pinned one (an interrupted or wrong download never lands where the next run looks)."""
    try:
        looked_in.mkdir(parents=True, exist_ok=True, mode=0o700)
        part = tempfile.mkdtemp(prefix=".download-", dir=looked_in)
    except OSError as exc:
        raise InceptionWeightsUnavailable(f"cannot write to the weights' cache {looked_in} ({exc}); set "
                                          f"XDG_CACHE_HOME or pass eval.inception_weights=/path/to/{INCEPTION_FILE}"
                                          ) from exc
    saved = downloads_helper.inception_url
    downloads_helper.inception_url = url  # clean-fid reads its module constant; restore it afterwards
    try:
        got = Path(downloads_helper.check_download_inception(fpath=part))
        if wrong := _mismatch(got):
            expected, actual = wrong
            raise InceptionWeightsUnavailable(
                f"{url} sent a file with sha256 {actual}, not that of clean-fid's {INCEPTION_FILE} ({expected}); it "
                f"was not kept. Download it elsewhere, check `sha256sum {INCEPTION_FILE}` says {expected}, and pass "
                f"eval.inception_weights=/path/to/{INCEPTION_FILE}"
            )
        os.replace(got, looked_in / INCEPTION_FILE)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InceptionWeightsUnavailable(_offline_message(url, str(looked_in), getattr(exc, "reason", exc),
                                                           instead)) from exc
    finally:
        downloads_helper.inception_url = saved
        shutil.rmtree(part, ignore_errors=True)


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
        import cleanfid.inception_pytorch as pytorch_fid_port
        from cleanfid.features import feature_extractor

        # clean-fid loads pytorch-fid's weights with torch hub's defaults: a full unpickle of whatever file sits in
        # the hub cache, and a download with no hash check. Weights-only, and the download checked against the
        # sha256 prefix in the file's name (6726825d), for the length of this call.
        loads = pytorch_fid_port.load_state_dict_from_url
        pytorch_fid_port.load_state_dict_from_url = functools.partial(
            torch.hub.load_state_dict_from_url, weights_only=True, check_hash=True)
        try:
            fn = feature_extractor("pytorch_inception", device=device, use_dataparallel=False)
        except (urllib.error.URLError, OSError) as exc:
            raise InceptionWeightsUnavailable(
                f"clean-fid's legacy_pytorch Inception (pytorch-fid weights pt_inception-2015-12-05) could not be "
                f"downloaded ({exc}); use eval.fid_mode=clean or legacy_tensorflow with eval.inception_weights. "
                f"{instead}"
            ) from exc
        except (pickle.UnpicklingError, RuntimeError) as exc:  # a file that is not weights, a download of others
            raise InceptionWeightsUnavailable(
                f"clean-fid's legacy_pytorch Inception weights in {torch.hub.get_dir()}/checkpoints were refused "
                f"({str(exc).splitlines()[0]}); delete pt_inception-2015-12-05-6726825d.pth there to download "
                "it again, or use eval.fid_mode=clean"
            ) from exc
        finally:
            pytorch_fid_port.load_state_dict_from_url = loads
        return FeatureExtractor(
            # torch hub checks a download against the hash prefix in the file's name; a cached file is loaded
            # weights-only
            "inception-v3-pytorch-fid", "sha256-prefix:6726825d", RESIZE_MODES[mode],
            _Callable(fn), mode, device, batch_size, num_workers,
        )  # fmt: skip
    path = inception_weights_file(weights, download_dir=download_dir, url=url, instead=instead)
    model = _InceptionFromFile(path, resize_inside=(mode == "legacy_tensorflow")).to(device)
    return FeatureExtractor(
        INCEPTION_NAME, PINNED_SHA256[INCEPTION_FILE], RESIZE_MODES[mode], model, mode, device, batch_size,
        num_workers,
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
