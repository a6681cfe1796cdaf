"""The one tar reader: opening a shard, parsing its headers, iterating its members, grouping them into samples.

A small POSIX/GNU tar reader: tarfile spends ~100 us of Python per member (header objects, pax
bookkeeping), which is most of the per-sample cost at 32x32; this reads only what WebDataset shards
use (ustar, GNU long names, pax path) and checks each header's checksum. A stream that ends without
tar's end-of-archive block (a zero block) is truncated, wherever the cut fell.

Samples follow the WebDataset convention: consecutive members with the same key (the file name up to
its first dot) form one sample, {extension: bytes}.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator

from pipeline.data.manifest import is_url

ZERO_BLOCK = bytes(512)
_REGULAR = (b"0", b"\0", b"7")
# what reading a shard can raise: a cut or corrupted tar, an unreachable URL, a failing pipe: command
READ_ERRORS = (OSError, EOFError, tarfile.TarError, ValueError)


def _open(url: str):
    """Local path, pipe:COMMAND, or any URL fsspec knows (s3://, gs://, http://, ...)."""
    if url.startswith("pipe:") or not is_url(url) or url.startswith("file:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb", bufsize=1 << 20)
    import fsspec

    return fsspec.open(url, "rb").open()


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    field = field.split(b"\0", 1)[0].strip()
    return int(field, 8) if field else 0


def _pax(data: bytes) -> dict[str, str]:
    out, i = {}, 0
    while i < len(data):
        length = int(data[i:data.index(b" ", i)])
        key, _, value = data[data.index(b" ", i) + 1:i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "replace")
        i += length
    return out


class _Truncated(EOFError):
    """The tar stops before a member or its header is whole; `name` is the cut member's (None: unknown)."""

    def __init__(self, what: str, name: str | None = None):
        super().__init__(what)
        self.name = name


def _tar_members(stream) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream, in order (see the module docstring)."""
    long_name = None
    while True:
        header = stream.read(512)
        if not header:
            raise _Truncated("tar ends without its end-of-archive block (cut at a member boundary)")
        if header == ZERO_BLOCK:
            return
        if len(header) < 512:
            raise _Truncated(f"tar header cut short ({len(header)} of 512 bytes)")
        stored = _octal(header[148:156])
        if stored != sum(header[:148]) + 256 + sum(header[156:]):  # checksum field counts as 8 spaces
            raise tarfile.ReadError("bad tar header checksum (not a tar, or corrupted)")
        size, kind = _octal(header[124:136]), header[156:157]
        data = stream.read(size)
        if len(data) < size:
            name = long_name or header[:100].split(b"\0", 1)[0].decode(errors="replace")
            raise _Truncated(f"member {name} truncated ({len(data)} of {size} bytes)", name)
        if size % 512:
            stream.read(512 - size % 512)  # a short padding read shows up as a missing header next
        if kind == b"L":
            long_name = data.split(b"\0", 1)[0].decode()
            continue
        if kind == b"x":
            long_name = _pax(data).get("path", long_name)
            continue
        if kind not in _REGULAR:
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode()
            if header[257:262] == b"ustar" and header[345]:
                name = header[345:500].split(b"\0", 1)[0].decode() + "/" + name
        yield name, data


def _key_ext(name: str) -> tuple[str, str]:
    key, _, ext = name.rsplit("/", 1)[-1].partition(".")
    return key, ext.lower()


def tar_samples(url: str, members: frozenset[str] = frozenset()) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, grouping consecutive members by key (WebDataset convention).

    At a cut or unreadable member, the sample being grouped is yielded only if it is provably whole:
    the failing member belongs to another key, or it has every member a sample of this shard has
    (`members`, from the manifest; without one, the previous sample's). Then the error is raised
    (one of READ_ERRORS); for a `pipe:` command, its exit status.
    """
    stream = _open(url)
    finished = False
    try:
        key, parts, ref = None, {}, members or None
        try:
            for name, data in _tar_members(stream):
                k, ext = _key_ext(name)
                if k != key and key is not None:
                    yield key, parts  # complete: the next key's header has been read
                    ref, parts = members or frozenset(parts), {}
                key = k
                parts[ext] = data
        except READ_ERRORS as exc:
            cut = exc.name if isinstance(exc, _Truncated) else None
            if key is not None and (
                (cut is not None and _key_ext(cut)[0] != key) or (ref is not None and ref <= parts.keys())
            ):
                yield key, parts
            try:
                stream.close()  # a pipe: command's exit status says more than "truncated"
            except OSError as status:
                raise status from exc
            raise
        if key is not None:
            yield key, parts
        finished = True
    finally:
        try:
            stream.close()
        except OSError:
            if finished:  # a command that failed after writing a whole tar
                raise
            # stopped early on purpose: a pipe's command may die of SIGPIPE, which is no error


def count_samples(path: str) -> int:
    """Samples (distinct keys) in a local tar, from its headers only: tarfile seeks over the data.

    Raises one of READ_ERRORS for a truncated or corrupted tar, as tar_samples would when reading it.
    """
    with tarfile.open(path, "r:") as tf:
        keys = {_key_ext(m.name)[0] for m in tf if m.isfile()}
        end = tf.offset  # where the end-of-archive block must be
    with open(path, "rb") as f:
        f.seek(end)
        if f.read(512) != ZERO_BLOCK:  # tarfile stops quietly at a cut header or member
            raise EOFError("no end-of-archive block after its last whole member (truncated)")
    return len(keys)
