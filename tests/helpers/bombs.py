"""Decompression bombs and a data set that carries one: small files whose decoded pixels would take ~300 MB.

    bomb_png(10000)                   # ~284 KiB on disk, a 10000x10000 RGB PNG of zeros
    plant_sample(folder, "train-000000.tar", 3, {"png": bomb_png(10000)})
    peak_mb("...python code...")      # extra peak resident memory of a snippet, in a fresh process
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

from pipeline.data.index import encode, first_offsets, index_name, shard_index
from pipeline.data.manifest import MANIFEST_NAME, sha256_file

REPO = Path(__file__).resolve().parents[2]


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int, channels: int = 3) -> bytes:
    """A side x side 8-bit PNG (grey or RGB) of zeros, compressed row by row: never the whole image in memory."""
    color_type = {1: 0, 3: 2}[channels]
    z = zlib.compressobj(9)
    row = bytes(1 + side * channels)  # filter byte 0, then the row's samples
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def plant_sample(folder: str | os.PathLike, shard: str, position: int, parts: dict[str, bytes]) -> str:
    """Replace the members of sample `position` of `shard` by `parts` ({ext: bytes}) and re-seal the data set as
    its author would (the shard's sha256 and sample index in the manifest rewritten): a consistent data set that
    carries the planted sample. Returns the sample's key."""
    folder = Path(folder)
    path = folder / shard
    with tarfile.open(path) as tf:
        members = [(m.name, tf.extractfile(m).read()) for m in tf.getmembers()]
    keys = list(dict.fromkeys(name.partition(".")[0] for name, _ in members))
    key = keys[position]
    out, placed = [], False
    for name, data in members:
        k, _, ext = name.partition(".")
        if k != key:
            out.append((name, data))
            continue
        if not placed:  # the new image members where the old ones were, before the label, as prepare writes
            out += [(f"{key}.{e}", d) for e, d in parts.items() if e != "cls"]
            placed = True
        if ext == "cls":
            out.append((name, parts.get("cls", data)))
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in out:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tf.addfile(info, io.BytesIO(data))
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    for split, entry in manifest["splits"].items():
        indexes = {}
        for s in entry["shards"]:
            indexes[s["name"]], s["sha256"] = shard_index(str(folder / s["name"]), first_offsets(str(folder / s["name"])))
        if "index" in entry:
            (folder / index_name(split)).write_bytes(encode(indexes))
            entry["index"]["sha256"] = sha256_file(str(folder / index_name(split)))
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    return key


def peak_mb(setup: str, measured: str, timeout: float = 120) -> tuple[float, float, str]:
    """(extra peak resident memory in MB, seconds, stdout) of `measured` run after `setup` in a fresh Python.

    Measured as the growth of the process's peak RSS (resource.getrusage(RUSAGE_SELF).ru_maxrss, KiB on Linux)
    across `measured`: the high-water mark of everything the process allocated, PIL's C buffers included
    (tracemalloc sees only Python's allocator). `setup` warms everything up first (imports, a small decode)."""
    code = (
        "import resource, time\n" + setup + "\n"
        "_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "_t = time.perf_counter()\n" + measured + "\n"
        "_dt = time.perf_counter() - _t\n"
        "print('PEAK', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _base) / 1024, _dt)\n"
    )
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env,
                       cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("PEAK "))
    _, mb, seconds = line.split()
    return float(mb), float(seconds), r.stdout + r.stderr
