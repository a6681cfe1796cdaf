"""Input sources for `prepare`: each becomes a list of picklable items plus a loader for one item.

A loader runs in a worker process and returns a uint8 array (H, W) or (H, W, C); it raises on an
unreadable input (prepare records or, with --strict, stops on it).
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipeline.cli import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# prepare --max-pixels: larger images are skipped from their header, never decoded (a 284 KiB PNG can hold
# 10000x10000 pixels, ~1 GB decoded). 8192x8192 admits 60-megapixel photos; decoding one costs up to ~0.5 GB.
MAX_PIXELS = 8192 * 8192


class SourceError(ValueError, InputError):
    """A source that cannot be used at all (wrong path, wrong format)."""


@dataclass
class Source:
    kind: str  # folder | cifar10 | cifar100 | npz | npy | digits
    description: dict[str, Any]  # recorded in the manifest
    items: list[Any]  # one picklable payload per input (a path, or an image array)
    labels: list[int] | None  # one label per item, or None when unlabelled
    class_names: list[str] = field(default_factory=list)
    predefined_split: list[str] | None = None  # "train"/"test" per item where the source has its own split

    def load(self, item: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
        return load_item(self.kind, item, max_pixels)

    def input_name(self, index: int) -> str:
        item = self.items[index]
        return item if isinstance(item, str) else f"{self.kind}[{index}]"


def load_item(kind: str, item: Any, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 (H, W) or (H, W, C) for one item of a source of this kind; a file of more than `max_pixels` pixels
    raises from its header, before it is decoded."""
    if kind != "folder":
        return item  # array sources carry the pixels already

    with warnings.catch_warnings():
        # PIL warns above Image.MAX_IMAGE_PIXELS (and refuses above twice that) as it opens; max_pixels decides
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        im = Image.open(item)
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ValueError(f"{width}x{height} is {width * height} pixels, over --max-pixels {max_pixels}; "
                             "not decoded")
        im.load()  # decode now so a truncated file raises here, inside the worker
        if im.mode not in ("L", "RGB"):
            # palette, alpha, 16-bit and CMYK images: RGB (alpha is dropped, not composited)
            im = im.convert("RGB")
        return np.asarray(im)


def item_channels(kind: str, item: Any) -> int:
    """1 or 3: what load_item gives for this item (grey stays grey, every other mode becomes RGB), from a file's
    header only."""
    if kind != "folder":
        return 1 if item.ndim == 2 else 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(item) as im:
            return 1 if im.mode == "L" else 3


def _folder(root: str) -> Source:
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        paths.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not paths:
        raise SourceError(f"{root} holds no images (looked recursively for {', '.join(IMAGE_EXTENSIONS)})")
    paths.sort()
    top = [os.path.relpath(p, root).split(os.sep) for p in paths]
    at_root = [len(parts) == 1 for parts in top]
    if all(at_root):
        return Source("folder", {"kind": "folder", "path": os.path.abspath(root)}, paths, None)
    if any(at_root):
        loose = [p for p, r in zip(paths, at_root) if r][:3]
        raise SourceError(
            f"{root} mixes images at its top level ({loose}...) with class sub-folders; move them into a "
            "sub-folder (one per class) or put all images at the top level for an unlabelled set"
        )
    class_names = sorted({parts[0] for parts in top})
    index = {c: i for i, c in enumerate(class_names)}
    labels = [index[parts[0]] for parts in top]
    desc = {"kind": "folder", "path": os.path.abspath(root)}
    return Source("folder", desc, paths, labels, class_names)


# The globals a CIFAR python batch references: numpy's array and dtype and the functions that rebuild them (numpy
# 1.x and 2.x module names). A batch is a dict of lists, ints, bytes and one uint8 array; nothing else is admitted.
_CIFAR_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
}


def _latin1(text: str, encoding: str) -> bytes:
    """_codecs.encode as Python 3 writes bytes into a protocol-2 pickle (a re-saved batch), and nothing more."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not how bytes are "
                                     "pickled")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """pickle without code: any global outside _CIFAR_GLOBALS (os.system, builtins.open, ...) is refused before it
    is looked up, so a crafted batch cannot run anything while it is read."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("_codecs", "encode"):
            return _latin1
        if (module, name) in _CIFAR_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}, which a CIFAR batch never holds")


def _unpickle(path: str) -> dict:
    """A CIFAR python-version file (pickled by Python 2: encoding='bytes'), read as data only."""
    with open(path, "rb") as f:
        data = f.read()  # from memory, a length field past the file's end fails at once instead of allocating
    try:
        obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as exc:  # a crafted or damaged pickle raises many types; each means "not a CIFAR batch"
        raise SourceError(f"{path} refused: not a CIFAR python-version file ({type(exc).__name__}: {exc}); "
                          "download the 'python version' again") from exc
    if not isinstance(obj, dict):
        raise SourceError(f"{path} holds a {type(obj).__name__}, not the dict of a CIFAR python-version file; "
                          "download the 'python version' again")
    return obj


def _cifar_batch(path: str, label_key: bytes) -> tuple[np.ndarray, list[int]]:
    """(uint8 (N, 3072) rows, N labels) of one batch file, its structure checked."""
    batch = _unpickle(path)
    data, labels = batch.get(b"data"), batch.get(label_key)
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == 3072
            and isinstance(labels, list) and len(labels) == len(data)
            and all(isinstance(v, (int, np.integer)) for v in labels)):
        raise SourceError(f"{path} lacks a CIFAR batch's uint8 (N, 3072) {b'data'!r} and N int {label_key!r}; "
                          "download the 'python version' again")
    return data, [int(v) for v in labels]


def _cifar_rows(data: np.ndarray) -> list[np.ndarray]:
    # the python version stores each image as 3072 bytes: 1024 red, 1024 green, 1024 blue, row-major
    images = np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return list(np.ascontiguousarray(images))


def _cifar(root: str) -> Source:
    files = set(os.listdir(root))
    if "data_batch_1" in files:
        kind, train_files, test_files = "cifar10", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        label_key, meta_file, names_key = b"labels", "batches.meta", b"label_names"
    else:
        kind, train_files, test_files = "cifar100", ["train"], ["test"]
        label_key, meta_file, names_key = b"fine_labels", "meta", b"fine_label_names"
    missing = [f for f in [*train_files, *test_files] if f not in files]
    if missing:
        raise SourceError(f"{root} looks like {kind} but lacks {missing}; download the 'python version' again")
    items, labels, split = [], [], []
    for name, files_ in (("train", train_files), ("test", test_files)):
        for f in files_:
            data, batch_labels = _cifar_batch(os.path.join(root, f), label_key)
            rows = _cifar_rows(data)
            items += rows
            labels += batch_labels
            split += [name] * len(rows)
    class_names = []
    if meta_file in files:
        path = os.path.join(root, meta_file)
        names = _unpickle(path).get(names_key)
        if not (isinstance(names, list) and all(isinstance(n, bytes) for n in names)):
            raise SourceError(f"{path} lacks the list of class names {names_key!r}; download the 'python version' "
                              "again")
        class_names = [n.decode() for n in names]
    desc = {"kind": kind, "path": os.path.abspath(root)}
    return Source(kind, desc, items, labels, class_names, predefined_split=split)


def _check_images(images: np.ndarray, path: str) -> np.ndarray:
    if images.dtype != np.uint8:
        raise SourceError(f"{path}: images must be uint8 (0..255), got {images.dtype}; convert with .astype(np.uint8)")
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (3, 4)):
        raise SourceError(f"{path}: images must have shape (N, H, W) or (N, H, W, C) with C in 1, 3, 4; got {images.shape}")
    if images.ndim == 4 and images.shape[-1] == 4:
        images = images[..., :3]  # alpha dropped
    return images


def _array(path: str) -> Source:
    labels = None
    if path.endswith(".npz"):
        with np.load(path) as z:
            image_key = next((k for k in ("images", "x", "data", "arr_0") if k in z.files), None)
            if image_key is None:
                raise SourceError(f"{path}: no image array; name it 'images' (found {z.files})")
            images = z[image_key]
            label_key = next((k for k in ("labels", "y", "targets", "arr_1") if k in z.files), None)
            if label_key is not None:
                labels = [int(v) for v in np.asarray(z[label_key]).reshape(-1)]
    else:
        images = np.load(path, allow_pickle=False)
    images = _check_images(images, path)
    if labels is not None:
        if len(labels) != len(images):
            raise SourceError(f"{path}: {len(labels)} labels for {len(images)} images")
        if min(labels) < 0:
            raise SourceError(f"{path}: labels must be >= 0 (found {min(labels)})")
    kind = "npz" if path.endswith(".npz") else "npy"
    return Source(kind, {"kind": kind, "path": os.path.abspath(path)}, list(images), labels)


def _digits() -> Source:
    # scikit-learn: ~3.5 s of import, only for the digits source
    from sklearn.datasets import load_digits

    d = load_digits()
    # 17 grey levels 0..16 -> 0..255, rounded to the nearest integer
    images = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)
    return Source(
        "digits",
        {"kind": "digits", "origin": "sklearn.datasets.load_digits"},
        list(images),
        [int(t) for t in d.target],
        [str(i) for i in range(10)],
    )


def open_source(spec: str) -> Source:
    """Resolve the SOURCE argument of prepare."""
    if spec == "digits":
        return _digits()
    if not os.path.exists(spec):
        raise SourceError(
            f"source {spec!r} does not exist; give an image folder, a CIFAR python-version folder, "
            "an .npz/.npy file of uint8 images, or 'digits'"
        )
    if os.path.isfile(spec):
        if spec.endswith((".npz", ".npy")):
            return _array(spec)
        raise SourceError(f"source file {spec} is not .npz or .npy")
    files = set(os.listdir(spec))
    if "data_batch_1" in files or {"train", "test", "meta"} <= files:
        return _cifar(spec)
    return _folder(spec)
