"""manifest.json: what `prepare` wrote, read back and validated.

Layout (format 1)::

    {"format": 1, "image_size": 32, "channels": 3, "num_classes": 10, "encoding": "png",
     "class_names": [...], "source": {...}, "options": {...},
     "splits": {"train": {"num_samples": N, "shards": [{"name": "train-000000.tar",
                                                       "num_samples": n, "sha256": "..."}, ...],
                          "index": {"name": "train-index.safetensors", "sha256": "..."}}, ...},
     "unreadable": [{"input": "...", "error": "..."}]}

A split's "index" (pipeline/data/index.py: each sample's byte range and sha256) is absent in manifests
written before it existed; such shards are read from their first byte.

Shard names are relative to the folder holding the manifest, so a prepared folder can be moved,
copied to object storage, or served over HTTP as a whole.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.data import remote
from pipeline.data.report import DataError
from pipeline.files import LARGE_JSON_MAX_BYTES, UnsafeFileError, inside, name_problem, parse_json

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(DataError):
    """A manifest that is missing, unreadable or inconsistent."""


@dataclass(frozen=True)
class Shard:
    url: str  # full path or URL of the tar
    name: str  # file name as written in the manifest
    num_samples: int  # samples in the tar (-1 = unknown: a shard list without a manifest)
    sha256: str = ""


@dataclass
class Manifest:
    location: str  # the folder (or URL prefix) the manifest was read from
    image_size: int
    channels: int
    num_classes: int
    encoding: str
    splits: dict[str, list[Shard]]
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    def shards(self, split: str) -> list[Shard]:
        if split not in self.splits:
            raise ManifestError(
                f"split {split!r} is not in the manifest at {self.location}; it has {sorted(self.splits)} "
                f"(set data.split to one of them, or re-run prepare with --test-fraction for a test split)"
            )
        return self.splits[split]


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def untyped_source(spec: str) -> str:
    """What a data location (data.shards or data.manifest, URLs joined with '::') reaches beyond local files:
    "the shell command 'pipe:...'", "the URL 's3://...'", or "" (local paths and file: URLs)."""
    for part in (p.strip() for p in spec.split("::")):
        if part.startswith("pipe:"):
            return f"the shell command {part[:80]!r}"
        if is_url(part) and local_path(part) is None:
            return f"the URL {part[:80]!r}"
    return ""


def shard_name(url: str) -> str:
    """The file name a shard has in a manifest: the URL's last path part; for `pipe:COMMAND`, that of the
    command's last word naming a .tar (`pipe:aws s3 cp s3://b/train-000000.tar -` -> train-000000.tar)."""
    if url.startswith("pipe:"):
        words = [w.strip("'\"") for w in url[5:].split() if ".tar" in w]
        return words[-1].rsplit("/", 1)[-1] if words else url
    return url.rsplit("/", 1)[-1]


def local_path(url: str) -> str | None:
    """The file a local shard names (a path or file:// URL); None for pipe: and remote URLs."""
    if url.startswith("file:"):

        return url2pathname(urlparse(url).path)
    return None if is_url(url) else url


def join(location: str, name: str) -> str:
    return f"{location.rstrip('/')}/{name}" if is_url(location) else os.path.join(location, name)


def read_file(path: str, max_bytes: int | None = None) -> bytes:
    """A small file (manifest, index) from a local path or any fsspec URL (object storage: retried, and a
    missing bucket, wrong endpoint or missing credentials raise remote.RemoteError with one line); with
    ``max_bytes``, at most one byte more than that is read (the caller refuses a longer file)."""
    if is_url(path) and local_path(path) is None:
        return remote.read_bytes(path) if max_bytes is None else remote.read_range(path, 0, max_bytes + 1)
    with open(local_path(path) or path, "rb") as f:
        return f.read() if max_bytes is None else f.read(max_bytes + 1)


def name_in(location: str, name: object, what: str) -> str:
    """``join(location, name)`` for a name read from the manifest, once it is a plain relative name inside the
    folder (no '..', no absolute path, no URL; locally, no symlink leading out): UnsafeFileError otherwise."""
    problem = name_problem(name)
    if problem:
        raise UnsafeFileError(f"{what} {problem}; only names inside {location} are read")
    if (local := local_path(location)) is not None:
        inside(local, name, what=what)  # a symlink there that leads out
    return join(location, name)


def read_manifest(path_or_dir: str | os.PathLike) -> Manifest:
    """Read and validate a manifest given its path or the prepared folder (local or fsspec URL)."""
    path = str(path_or_dir)
    if not path.endswith(".json"):
        path = join(path, MANIFEST_NAME)
    location = path.rsplit("/", 1)[0] if is_url(path) else os.path.dirname(os.path.abspath(path))
    try:
        raw = parse_json(read_file(path, LARGE_JSON_MAX_BYTES), max_bytes=LARGE_JSON_MAX_BYTES, what="manifest",
                         where=path)
    except FileNotFoundError as exc:
        raise ManifestError(
            f"no manifest at {path}; prepare the data first: python -m pipeline.data.prepare SOURCE --out DIR"
        ) from exc
    except DataError:
        raise  # object storage that cannot be read as configured: its one line says what to set
    except OSError as exc:
        raise ManifestError(f"manifest {path} cannot be read ({type(exc).__name__}: {exc})") from exc
    except UnsafeFileError as exc:
        raise ManifestError(f"manifest {exc}; re-run prepare") from None
    found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
    if found != FORMAT_VERSION:
        raise ManifestError(f"manifest {path} has format {found!r}; this code reads format {FORMAT_VERSION}")
    try:
        splits = {
            name: [
                Shard(name_in(location, s["name"], "a shard name"), s["name"], int(s["num_samples"]),
                      s.get("sha256", ""))
                for s in split["shards"]
            ]
            for name, split in raw["splits"].items()
        }
        for split in raw["splits"].values():
            if isinstance(split.get("index"), dict):  # the sample index beside it (pipeline.data.shards.attach_index)
                name_in(location, split["index"].get("name"), "a sample index name")
        for name, split in raw["splits"].items():
            total = sum(s.num_samples for s in splits[name])
            if total != split["num_samples"]:
                raise ManifestError(
                    f"manifest {path}: split {name!r} says {split['num_samples']} samples but its shards sum to {total}"
                )
        return Manifest(
            location=location,
            image_size=int(raw["image_size"]),
            channels=int(raw["channels"]),
            num_classes=int(raw["num_classes"]),
            encoding=raw["encoding"],
            splits=splits,
            raw=raw,
        )
    except UnsafeFileError as exc:
        raise ManifestError(f"manifest {path} is refused: {exc}; re-run prepare") from None
    except DataError:
        raise
    except KeyError as exc:
        raise ManifestError(f"manifest {path} lacks field {exc}; re-run prepare") from exc
    except (TypeError, AttributeError, ValueError) as exc:  # a field of the wrong type
        raise ManifestError(f"manifest {path} is malformed ({type(exc).__name__}: {exc}); re-run prepare") from exc


def sha256_file(path: str, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def sha256_problem(path: str, expected: str) -> str:
    """What differs when the file at `path` does not have sha256 `expected` (for a message); else ""."""
    try:
        digest = sha256_file(path)
    except OSError as exc:
        return f"cannot be read to check its sha256 ({type(exc).__name__}: {exc})"
    return "" if digest == expected else sha256_differs(digest, expected)


def sha256_differs(digest: str, expected: str) -> str:
    return (f"its sha256 {digest[:12]}... differs from the manifest's {expected[:12]}... "
            "(the file changed after prepare)")


def verify(manifest: Manifest) -> list[str]:
    """Problems found comparing local shards with the manifest (sizes are not recorded; sha256 is)."""
    problems = []
    for split, shards in manifest.splits.items():
        for s in shards:
            if is_url(s.url):
                continue
            if not os.path.exists(s.url):
                problems.append(f"{split}: {s.url} is missing")
            elif s.sha256 and (problem := sha256_problem(s.url, s.sha256)):
                problems.append(f"{split}: {s.url}: {problem}")
    return problems
