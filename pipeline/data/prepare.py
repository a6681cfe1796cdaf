"""Turn images into WebDataset shards plus manifest.json.

    python -m pipeline.data.prepare digits --out data/digits --test-fraction 0.1
    python -m pipeline.data.prepare ~/cifar-10-batches-py --out data/cifar10 --samples-per-shard 5000
    python -m pipeline.data.prepare ~/photos --out data/photos --resolution 256 --workers 16
    python -m pipeline.data.prepare ~/cifar-10-batches-py --out s3://bucket/cifar10    # object storage

Writes DIR/<split>-NNNNNN.tar (members `<key>.png` or `<key>.u8`, and `<key>.cls` when labelled), the
sample index DIR/<split>-index.safetensors (each sample's byte range and sha256: pipeline/data/index.py)
and DIR/manifest.json (see pipeline/data/manifest.py). Re-running on the same input gives byte-identical
files: tar headers carry fixed mtime/uid/gid/mode, samples are written in a seeded order, and PNG
encoding is deterministic. An `--out` URL (s3://, gs://, ...: anything fsspec writes) gets the same
bytes: each file is written to a local staging folder, uploaded once complete (then removed there), and
the manifest last, so a reader never finds a manifest whose shards are not all there. See docs/data.md.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Callable
from multiprocessing import get_context
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline import cli
from pipeline.data import remote
from pipeline.data.index import ShardIndex, index_name, shard_index
from pipeline.data.index import encode as encode_index
from pipeline.data.manifest import FORMAT_VERSION, MANIFEST_NAME, is_url, join, sha256_file
from pipeline.data.report import DataError
from pipeline.data.sources import MAX_PIXELS, Source, SourceError, item_channels, load_item, open_source

SHARD_RE = re.compile(r"^(train|test)-\d{6}\.tar$")
INDEX_RE = re.compile(r"^(train|test)-index\.safetensors$")
PNG_COMPRESS_LEVEL = 6  # fixed, so shards are byte-identical across runs


class PrepareError(RuntimeError, cli.InputError):
    """prepare cannot continue; the message says why and what to do."""


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side is `size` (Lanczos, antialiased), then crop the centre square."""

    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    im = Image.fromarray(image)
    scale = size / min(h, w)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    im = im.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)))


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    if channels == 1 and image.ndim == 3:

        return np.asarray(Image.fromarray(image).convert("L"))  # ITU-R 601-2 luma
    if channels == 3 and image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def encode(image: np.ndarray, encoding: str) -> bytes:
    if encoding == "u8":
        return np.ascontiguousarray(image).tobytes()

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def _work(args: tuple) -> tuple[bytes | None, str | None]:
    """In a worker process: load, resize, convert and encode one input. Errors are returned, not raised."""
    kind, item, size, channels, encoding, max_pixels = args
    try:
        image = load_item(kind, item, max_pixels)
        if size:
            image = resize_center_crop(image, size)
        image = to_channels(image, channels)
        if image.shape[0] != image.shape[1]:
            raise ValueError(f"image is {image.shape[1]}x{image.shape[0]}, not square; pass --resolution N")
        return encode(image, encoding), None
    except Exception as exc:  # any decode/resize failure of one input is that input's problem
        return None, f"{type(exc).__name__}: {exc}"


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class _ShardWriter:
    """Sequential shards with fixed headers; each is written to a temp name and renamed when complete, then
    handed to `done(path)` (an upload, for an --out URL). Records each sample's first byte for the index."""

    def __init__(self, out: str, split: str, samples_per_shard: int, encoding: str,
                 done: Callable[[str], None] | None = None):
        self.out, self.split, self.per_shard, self.ext = out, split, samples_per_shard, encoding
        self.shards: list[dict[str, Any]] = []
        self.index: dict[str, ShardIndex] = {}
        self.tar: tarfile.TarFile | None = None
        self.count = 0
        self.starts: list[int] = []
        self.done = done

    def _close_current(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        name = f"{self.split}-{len(self.shards):06d}.tar"
        final = os.path.join(self.out, name)
        os.replace(final + ".tmp", final)
        self.index[name], sha256 = shard_index(final, self.starts)
        self.shards.append({"name": name, "num_samples": self.count, "sha256": sha256})
        self.tar, self.count, self.starts = None, 0, []
        if self.done is not None:
            self.done(final)

    def write(self, key: str, data: bytes, label: int | None) -> None:
        if self.tar is None:
            path = os.path.join(self.out, f"{self.split}-{len(self.shards):06d}.tar.tmp")
            self.tar = tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115 (closed in _close_current)
        self.starts.append(self.tar.offset)  # where this sample's first header goes
        self.tar.addfile(_tarinfo(f"{key}.{self.ext}", len(data)), io.BytesIO(data))
        if label is not None:
            text = str(label).encode()
            self.tar.addfile(_tarinfo(f"{key}.cls", len(text)), io.BytesIO(text))
        self.count += 1
        if self.count == self.per_shard:
            self._close_current()

    def close(self) -> list[dict[str, Any]]:
        self._close_current()
        return self.shards


def _split_order(source: Source, test_fraction: float, seed: int) -> dict[str, list[int]]:
    """Item indices per split, each in a seeded random order (shards come out pre-shuffled)."""
    rng = np.random.default_rng(seed)
    n = len(source.items)
    if source.predefined_split is not None:
        split = np.asarray(source.predefined_split)
        return {s: [int(i) for i in rng.permutation(np.flatnonzero(split == s))] for s in ("train", "test")}
    perm = rng.permutation(n)
    n_test = int(round(n * test_fraction))
    return {"train": [int(i) for i in perm[n_test:]], "test": [int(i) for i in perm[:n_test]]}


def _probe_channels(source: Source) -> int:
    """The channels of the first input whose header reads (an unreadable one is skipped later, by its worker)."""
    for item in source.items:
        try:
            return item_channels(source.kind, item)
        except Exception:  # any failure to open one input is that input's problem
            continue
    raise PrepareError(f"none of the {len(source.items)} inputs opens as an image (the first: "
                       f"{source.input_name(0)})")


def _ours(name: str) -> bool:
    """A file prepare writes (and --overwrite replaces): shards, indexes, the manifest, leftovers."""
    return bool(SHARD_RE.match(name) or INDEX_RE.match(name)) or name == MANIFEST_NAME or name.endswith(".tmp")


def _prepare_out_dir(out: str, overwrite: bool) -> None:
    if is_url(out):  # object storage: no folders, a prefix is empty when no object lies under it
        names = remote.listdir(out)
        if names and not overwrite:
            raise PrepareError(f"{out} is not empty ({len(names)} objects, e.g. {names[0]}); pass --overwrite to "
                               "replace its shards, indexes and manifest")
        for f in names:
            if _ours(f):
                remote.remove(join(out, f))
        return
    if os.path.isdir(out) and os.listdir(out):
        if not overwrite:
            raise PrepareError(f"{out} is not empty; pass --overwrite to replace its shards and manifest")
        for f in os.listdir(out):
            if _ours(f):
                os.remove(os.path.join(out, f))
    os.makedirs(out, exist_ok=True)


def prepare(
    source: str,
    out: str,
    *,
    resolution: int | None = None,
    channels: int | None = None,
    samples_per_shard: int = 1000,
    test_fraction: float = 0.0,
    seed: int = 0,
    encoding: str = "png",
    overwrite: bool = False,
    strict: bool = False,
    workers: int | None = None,
    progress: bool = True,
    max_pixels: int = MAX_PIXELS,
) -> dict[str, Any]:
    """Write shards and manifest.json into `out`; return the manifest."""
    if encoding not in ("png", "u8"):
        raise PrepareError(f"--encoding {encoding!r}: choose png (lossless, default) or u8 (raw bytes)")
    if channels not in (None, 1, 3):
        raise PrepareError(f"--channels {channels}: choose 1 (grey) or 3 (RGB)")
    if samples_per_shard <= 0:
        raise PrepareError(f"--samples-per-shard {samples_per_shard} must be > 0")
    if resolution is not None and resolution <= 0:
        raise PrepareError(f"--resolution {resolution} must be > 0")
    if not 0.0 <= test_fraction < 1.0:
        raise PrepareError(f"--test-fraction {test_fraction} must lie in [0, 1)")
    if max_pixels <= 0:
        raise PrepareError(f"--max-pixels {max_pixels} must be > 0")
    try:
        src = open_source(source)
    except SourceError as exc:
        raise PrepareError(str(exc)) from exc
    if src.predefined_split is not None and test_fraction:
        raise PrepareError(f"{src.kind} has its own train/test split; drop --test-fraction")
    if is_url(out) and out.startswith("pipe:"):
        raise PrepareError(f"--out {out!r}: write to a folder or an object-storage URL (s3://bucket/prefix)")
    try:
        _prepare_out_dir(out, overwrite)
    except (DataError, OSError) as exc:
        raise PrepareError(f"cannot write to {out}: {exc}") from exc
    if not is_url(out):
        return _prepare(src, source, out, resolution, channels, samples_per_shard, test_fraction, seed, encoding,
                        strict, workers, progress, max_pixels)
    stage = tempfile.mkdtemp(prefix="prepare-")  # each file is uploaded once complete, then removed here

    def upload(path: str) -> None:
        try:
            remote.put_file(path, join(out, os.path.basename(path)))
        except (DataError, OSError) as exc:
            raise PrepareError(f"cannot write {join(out, os.path.basename(path))}: {exc}") from exc
        os.remove(path)

    try:
        return _prepare(src, source, stage, resolution, channels, samples_per_shard, test_fraction, seed, encoding,
                        strict, workers, progress, max_pixels, upload)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _prepare(src: Source, source: str, out: str, resolution: int | None, channels: int | None,
             samples_per_shard: int, test_fraction: float, seed: int, encoding: str, strict: bool,
             workers: int | None, progress: bool, max_pixels: int,
             upload: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the shards, indexes and manifest of `src` (named `source`) into the local folder `out`, handing
    each finished file to `upload` (for an --out URL)."""
    if channels is None:
        channels = _probe_channels(src)
    workers = workers or len(os.sched_getaffinity(0))
    order = _split_order(src, test_fraction, seed)

    unreadable: list[dict[str, str]] = []
    splits: dict[str, Any] = {}
    image_size = resolution
    pool = get_context("fork").Pool(workers) if workers > 1 else None
    try:
        for split, indices in order.items():
            if not indices:
                continue
            writer = _ShardWriter(out, split, samples_per_shard, encoding, upload)
            jobs = ((src.kind, src.items[i], resolution, channels, encoding, max_pixels) for i in indices)
            results = pool.imap(_work, jobs, chunksize=64) if pool else map(_work, jobs)
            bar = tqdm(results, total=len(indices), desc=f"prepare {split}", unit="img", disable=not progress)
            for i, (data, error) in zip(indices, bar):
                if error is not None:
                    if strict:
                        raise PrepareError(f"unreadable input {src.input_name(i)}: {error} (without --strict it is skipped and listed in the manifest)")
                    unreadable.append({"input": src.input_name(i), "error": error})
                    tqdm.write(f"prepare: skipped {src.input_name(i)}: {error}", file=sys.stderr)
                    continue
                if image_size is None:
                    image_size = _image_size(data, encoding, channels)
                elif resolution is None and _image_size(data, encoding, channels) != image_size:
                    raise PrepareError(
                        f"{src.input_name(i)} is not {image_size}x{image_size} like the first image; pass --resolution N"
                    )
                label = src.labels[i] if src.labels is not None else None
                writer.write(f"{i:08d}", data, label)
            shards = writer.close()
            index_path = os.path.join(out, index_name(split))
            with open(index_path, "wb") as f:
                f.write(encode_index(writer.index))
            splits[split] = {"num_samples": sum(s["num_samples"] for s in shards), "shards": shards,
                             "index": {"name": index_name(split), "sha256": sha256_file(index_path)}}
            if upload is not None:
                upload(index_path)
    finally:
        if pool is not None:
            pool.terminate()
    if not splits:
        raise PrepareError(f"no readable images in {source}; see the errors: {unreadable[:3]}")
    num_classes = len(src.class_names) or (max(src.labels) + 1 if src.labels else 0)
    manifest = {
        "format": FORMAT_VERSION,
        "image_size": image_size,
        "channels": channels,
        "num_classes": num_classes,
        "class_names": src.class_names,
        "encoding": encoding,
        "source": src.description,
        "options": {
            "resolution": resolution,
            "resize": "shorter side to resolution (Lanczos), centre crop" if resolution else "none",
            "channels": channels,
            "samples_per_shard": samples_per_shard,
            "test_fraction": test_fraction,
            "seed": seed,
            "encoding": encoding,
            "max_pixels": max_pixels,
        },
        "num_samples": sum(s["num_samples"] for s in splits.values()),
        "splits": splits,
        "unreadable": unreadable,
    }
    tmp = os.path.join(out, MANIFEST_NAME + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
    os.replace(tmp, os.path.join(out, MANIFEST_NAME))
    if upload is not None:
        upload(os.path.join(out, MANIFEST_NAME))  # last: its shards and indexes are all there already
    return manifest


def _image_size(data: bytes, encoding: str, channels: int) -> int:
    if encoding == "u8":
        return int(round((len(data) / channels) ** 0.5))

    with Image.open(io.BytesIO(data)) as im:
        return im.size[0]


def main(argv: list[str] | None = None) -> int:
    p = cli.parser(
        "python -m pipeline.data.prepare",
        "Write WebDataset shards and manifest.json from images (see docs/data.md). Exit codes as every "
        f"command's (pipeline/cli.py); here {cli.EXIT_INPUT}: nothing usable written, {cli.EXIT_PARTIAL}: written, "
        "but unreadable inputs were skipped (the last line names them).",
        full_description=True,
    )
    p.add_argument("source", help="image folder | CIFAR-10/100 python-version folder | file.npz/.npy | digits")
    p.add_argument("--out", required=True, help="output folder, or object-storage URL (s3://bucket/prefix; the "
                                                "AWS_* variables name the endpoint and credentials); must be empty "
                                                "unless --overwrite")
    p.add_argument("--resolution", type=int, help="output size N: shorter side resized to N (Lanczos), centre crop")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 = grey, 3 = RGB (default: as the source)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--test-fraction", type=float, default=0.0, help="seeded held-out fraction (sources without a split)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split and the order of samples in the shards")
    p.add_argument("--encoding", choices=("png", "u8"), default="png", help="lossless PNG or raw uint8 bytes")
    p.add_argument("--overwrite", action="store_true", help="replace shards and manifest in a non-empty --out")
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable input")
    p.add_argument("--max-pixels", type=int, default=MAX_PIXELS,
                   help="skip (or with --strict, stop at) an image of more pixels, from its header, before it is "
                        "decoded: a small file can inflate to gigabytes")
    p.add_argument("--workers", type=int, default=0, help="processes for decode/resize/encode (0 = all cores)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    return cli.run("prepare", lambda: _main(a))


def _main(a: argparse.Namespace) -> int:
    m = prepare(
        a.source, a.out, resolution=a.resolution, channels=a.channels, samples_per_shard=a.samples_per_shard,
        test_fraction=a.test_fraction, seed=a.seed, encoding=a.encoding, overwrite=a.overwrite,
        strict=a.strict, workers=a.workers or None, progress=not a.quiet, max_pixels=a.max_pixels,
    )
    counts = ", ".join(f"{k}: {v['num_samples']} samples in {len(v['shards'])} shards" for k, v in m["splits"].items())
    print(f"wrote {a.out}: {counts}; {m['image_size']}x{m['image_size']}x{m['channels']}, {m['num_classes']} classes")
    print(f"next: stream it with data.shards={a.out}")
    if m["unreadable"]:  # the last line, and a distinct exit status, so that neither a reader nor a script misses it
        first = m["unreadable"][0]
        print(f"prepare: SKIPPED {len(m['unreadable'])} unreadable inputs (listed under 'unreadable' in "
              f"{a.out}/manifest.json; first: {first['input']}: {first['error']}); the shards hold the rest. "
              f"Exit status {cli.EXIT_PARTIAL}: fix or remove them and re-run with --overwrite, or accept the "
              "skips", file=sys.stderr)
        return cli.EXIT_PARTIAL
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
