"""data.shards -> the list of shards to read, with their counts and image geometry, checked at start.

`data.shards` is a prepared folder, its manifest.json, a brace pattern (`/data/train-{000000..000099}.tar`)
or URLs joined with `::`. A pattern or URL list is matched against a manifest.json beside its first
shard when there is one, or against the one `data.manifest` names (any URL: so `pipe:` lists get exact
mode too), by shard name (counts, geometry, members, sha256); a manifest that is there but invalid is an
error, not a silent fallback. Local shards are checked for existence and remote protocols for an
installed fsspec backend at start; pipe: commands and remote objects are checked when opened
(docs/data.md). With data.verify=start, every local shard's sha256 is checked here too. `attach_index`
loads prepare's sample index (pipeline/data/index.py), checked against the manifest's sha256.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
from webdataset.shardlists import expand_urls

from pipeline.data.index import ShardIndex, decode
from pipeline.data.manifest import (
    MANIFEST_NAME,
    Manifest,
    ManifestError,
    Shard,
    is_url,
    join,
    local_path,
    read_file,
    read_manifest,
    sha256_problem,
    shard_name,
)
from pipeline.data.remote import RemoteError
from pipeline.data.report import CorruptDataError, DataError
from pipeline.data.tar import READ_ERRORS, count_samples


@dataclass
class ShardSet:
    shards: list[Shard]  # num_samples == -1 where unknown
    image_size: int  # 0 = unknown (taken from each PNG)
    channels: int  # 0 = unknown (images kept as decoded)
    encoding: str  # png | u8 | "" (unknown: by member extension)
    source: str  # what data.shards resolved to, for messages
    members: frozenset[str] = frozenset()  # extensions every sample has (from the manifest); empty = unknown
    num_classes: int = 0  # from the manifest: labels lie in [0, num_classes); 0 = unlabelled or unknown
    verify: str = "stream"  # data.verify: stream | start | off
    # verify=start: url -> what differs, for local shards whose bytes are not the manifest's (read as failed)
    changed: dict[str, str] = field(default_factory=dict)
    manifest: Manifest | None = field(default=None, repr=False)  # where counts and the sample index come from
    # url -> each sample's byte range and sha256 (attach_index); a shard without one is read from its first byte
    index: dict[str, ShardIndex] = field(default_factory=dict, repr=False)

    def hashed_while_read(self, shard: Shard) -> bool:
        """Whether a read of `shard` to its end checks its sha256 (start mode checked local ones at start)."""
        return bool(shard.sha256) and (
            self.verify == "stream" or (self.verify == "start" and local_path(shard.url) is None)
        )

    @property
    def counts_known(self) -> bool:
        return all(s.num_samples >= 0 for s in self.shards)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)


def _count_tar(path: str) -> int:
    """Samples in a local tar, from its headers; a truncated tar raises naming it and the ways out."""
    try:
        return count_samples(path)
    except READ_ERRORS as exc:
        raise CorruptDataError(
            f"shard {path} is unreadable ({type(exc).__name__}: {exc}), so exact mode cannot count its samples; "
            "re-run prepare (its manifest.json gives the counts), remove it, or use data.mode=resampled"
        ) from exc


def _no_manifest(folder: str) -> DataError:
    """The error for a local folder without manifest.json: what is in it, and the ways out."""
    tars = sorted(f for f in os.listdir(folder) if f.endswith(".tar"))
    if not tars:
        what = "is empty" if not os.listdir(folder) else "holds no shards and no manifest.json"
        return DataError(f"data.shards={folder!r} {what}; prepare the data into it: "
                         f"python -m pipeline.data.prepare SOURCE --out {folder}")
    return DataError(
        f"data.shards={folder!r} holds {len(tars)} .tar files ({tars[0]}, ...) but no {MANIFEST_NAME}; "
        f"re-run prepare, or give the shards as a brace pattern (e.g. {os.path.join(folder, tars[0])}) "
        "to read them without a manifest"
    )


def resolve_shards(spec: str, split: str, *, need_counts: bool, manifest: str = "") -> ShardSet:
    """data.shards -> shard list: a prepared folder, a manifest path, a brace pattern or URLs ('::'-joined);
    `manifest` (data.manifest) names the manifest of a pattern or URL list, wherever it lies."""
    spec, manifest = spec.strip(), manifest.strip()
    if not spec:
        raise DataError("data.shards is empty; set it to a prepared folder "
                        "(python -m pipeline.data.prepare ...)")
    looks_like_tars = ".tar" in spec or "{" in spec or "::" in spec or spec.startswith("pipe:")
    if manifest and not looks_like_tars:
        raise DataError(f"data.manifest={manifest!r} is for shard patterns and URL lists, but data.shards={spec!r} "
                        "is a prepared folder (or manifest) with its own manifest.json; unset data.manifest")
    if not looks_like_tars:
        if not is_url(spec) and not os.path.exists(spec):
            raise DataError(
                f"data.shards={spec!r} does not exist; give a folder written by "
                "`python -m pipeline.data.prepare SOURCE --out DIR`, its manifest.json, a brace pattern or URLs"
            )
        try:
            m = read_manifest(spec)
        except ManifestError as exc:
            if isinstance(exc.__cause__, FileNotFoundError) and os.path.isdir(spec):
                raise _no_manifest(spec) from exc
            raise
        return from_manifest(m, m.shards(split), spec)
    urls = expand_urls(spec)
    if not urls:
        raise DataError(f"data.shards={spec!r} expands to an empty shard list")
    if manifest:
        try:
            m: Manifest | None = read_manifest(manifest)
        except ManifestError as exc:
            raise ManifestError(f"data.manifest: {exc}") from exc
    else:
        m = None if urls[0].startswith("pipe:") else _manifest_beside(urls[0], spec)
    if m is not None:
        by_name = {s.name: s for shards in m.splits.values() for s in shards}
        shards = []
        for u in urls:
            n, sha = _count_sha(by_name, u)
            if n < 0 and need_counts and (p := local_path(u)) is not None and os.path.isfile(p):
                n = _count_tar(p)  # in the pattern but not in the manifest: count it (headers only)
            shards.append(Shard(u, shard_name(u), n, sha))
        return from_manifest(m, shards, spec)
    shards = []
    for u in urls:
        n = -1
        if need_counts and (p := local_path(u)) is not None and os.path.isfile(p):
            n = _count_tar(p)  # local shards without a manifest: count them (reads tar headers only)
        shards.append(Shard(u, u.rsplit("/", 1)[-1], n))
    return ShardSet(shards, 0, 0, "", spec)


def _manifest_beside(first: str, spec: str) -> Manifest | None:
    """The manifest.json in the folder of the first shard; None when there is none."""
    folder = first.rsplit("/", 1)[0] if "/" in first else "."
    path = f"{folder}/{MANIFEST_NAME}"
    try:
        return read_manifest(path)
    except RemoteError:
        raise  # a missing bucket, no credentials, an unreachable store: say so, do not read without counts
    except ManifestError as exc:
        if isinstance(exc.__cause__, FileNotFoundError):
            return None  # shards without a manifest: counts come from their headers (or are unknown)
        # a broken manifest would silently drop the counts, geometry and labels it promises
        raise ManifestError(
            f"{exc}. data.shards={spec!r} takes its shards' counts and image geometry from {path}: fix or "
            "re-prepare it, or move it away to read the shards without a manifest"
        ) from exc
    except (OSError, ValueError, ImportError):
        return None  # also an unknown protocol: check_shards names it


def check_shards(shards: list[Shard], spec: str) -> None:
    """At start: every local shard exists, and every remote protocol has an fsspec backend installed.

    pipe: commands and remote objects are checked when opened (a failure is counted and skipped, or
    raises with data.strict=true): probing them all here would cost a round trip per shard per rank.
    """
    missing = [s.url for s in shards if (p := local_path(s.url)) is not None and not os.path.isfile(p)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} of {len(shards)} shards of data.shards={spec!r} are missing: {shown}; "
            "re-run prepare, or fix data.shards"
        )
    protocols = sorted({s.url.split("://", 1)[0] for s in shards
                        if "://" in s.url and not s.url.startswith(("pipe:", "file:"))})
    for proto in protocols:
        try:
            fsspec.get_filesystem_class(proto)
        except (ImportError, ValueError) as exc:
            raise DataError(
                f"data.shards={spec!r} uses {proto}:// URLs, which fsspec cannot open here ({exc}); install "
                f"its backend (e.g. s3fs, gcsfs, aiohttp for http) or use pipe: commands"
            ) from exc


def _count_sha(by_name: dict[str, Shard], url: str) -> tuple[int, str]:
    s = by_name.get(shard_name(url))
    return (s.num_samples, s.sha256) if s else (-1, "")


def from_manifest(m: Manifest, shards: list[Shard], spec: str) -> ShardSet:
    """A ShardSet of `shards` with the counts, geometry and per-sample members that manifest `m` gives."""
    # prepare writes <key>.<encoding> for every sample, and <key>.cls for all of them when labelled
    members = frozenset({m.encoding} | ({"cls"} if m.num_classes > 0 else set())) if m.encoding else frozenset()
    return ShardSet(shards, m.image_size, m.channels, m.encoding, spec, members, m.num_classes, manifest=m)


def attach_index(shardset: ShardSet) -> list[Shard]:
    """Load the sample index of every split whose shards `shardset` reads (checked against the manifest's
    sha256, then against its counts) into shardset.index. Shards without one are read from their first
    byte: those the manifest lists without a sha256 (the index describes the bytes a sha256 names; these
    are warned about as unverified already), and those it lists with one but no index, which are returned
    (a manifest written before the index existed)."""
    m = shardset.manifest
    if m is None:
        return list(shardset.shards)
    by_name: dict[str, list[Shard]] = {}
    for s in shardset.shards:
        if s.num_samples >= 0 and s.sha256:  # the index describes the bytes that sha256 names
            by_name.setdefault(s.name, []).append(s)
    for split, entry in m.raw.get("splits", {}).items():
        info = entry.get("index") if isinstance(entry, dict) else None
        counts = {s.name: s.num_samples for s in m.splits.get(split, []) if s.name in by_name}
        if not info or not counts:
            continue
        path = join(m.location, str(info.get("name", "")))
        try:
            data = read_file(path)
        except FileNotFoundError as exc:
            raise ManifestError(f"the manifest in {m.location} names the sample index {path}, which is missing; "
                                "copy it beside the manifest, or re-run prepare") from exc
        except OSError as exc:
            if isinstance(exc, RemoteError):
                raise
            raise ManifestError(f"sample index {path} cannot be read ({type(exc).__name__}: {exc})") from exc
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.get("sha256"):
            raise ManifestError(f"sample index {path}: its sha256 {digest[:12]}... differs from the manifest's "
                                f"{str(info.get('sha256'))[:12]}... (changed after prepare); re-run prepare")
        for name, ix in decode(data, counts, path).items():
            for s in by_name[name]:
                if s.num_samples == len(ix.digests):
                    shardset.index[s.url] = ix
    return [s for s in shardset.shards if s.url not in shardset.index and s.sha256]


def start_verification(shardset: ShardSet, verify: str, strict: bool) -> None:
    """data.verify at start: say once that shards without a manifest sha256 go unverified; with `start`,
    hash every local shard now (in threads: hashlib releases the GIL) and mark those that differ."""
    shardset.verify = verify
    if verify == "off":
        return
    unhashed = [s for s in shardset.shards if not s.sha256]
    if unhashed:  # pattern or URL lists without a manifest.json beside them
        warnings.warn(
            f"data.verify={verify}: {len(unhashed)} of {len(shardset.shards)} shards "
            f"(e.g. {unhashed[0].url}) have no sha256 in a manifest.json beside them, so they are read "
            "unverified",
            UserWarning, stacklevel=3,
        )
    if verify != "start":
        return
    local = [(s, p) for s in shardset.shards if s.sha256 and (p := local_path(s.url)) is not None]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(lambda sp: sha256_problem(sp[1], sp[0].sha256), local))
    shardset.changed = {s.url: p for (s, _), p in zip(local, problems) if p}
    if shardset.changed and strict:
        shown = "; ".join(f"{u}: {p}" for u, p in list(shardset.changed.items())[:3])
        more = f" (and {len(shardset.changed) - 3} more)" if len(shardset.changed) > 3 else ""
        raise CorruptDataError(
            f"data.verify=start: {len(shardset.changed)} of {len(local)} shards differ from their manifest: "
            f"{shown}{more}; re-run prepare, or set data.strict=false to skip them"
        )
