"""The one tar reader: opening a shard, parsing its headers, iterating its members, grouping them into samples.

A small POSIX/GNU tar reader: tarfile spends ~100 us of Python per member (header objects, pax
bookkeeping), which is most of the per-sample cost at 32x32; this reads only what WebDataset shards
use (ustar, GNU long names, pax path) and checks each header's checksum. A stream that ends without
tar's end-of-archive block (a zero block) is truncated, wherever the cut fell.

Header fields are bounded, so a corrupted header fails as a bad header instead of as a huge
allocation: a member's size must fit in what is left of a local file, and in MAX_MEMBER_BYTES where
the stream's size is unknown (pipe:, remote URLs). A checksum, number field or pax record that does
not parse raises TarFormatError; every failure is one of READ_ERRORS, which the caller counts as a
failed shard, naming it (pipeline.data.report).

Samples follow the WebDataset convention: consecutive members with the same key (the file name up to
its first dot) form one sample, {extension: bytes}.

Reading each byte once: where prepare's sample index gives every sample's byte offset, a stream reads
only its piece of a shard, `Span(url, offsets[lo], offsets[hi])` (a seek into a local file, range
requests to object storage through pipeline.data.remote, or a pipe: command's output after skipping
the bytes before the piece), and parses each sample from exactly its own bytes (`sample_from_bytes`).
`READ` counts the bytes this process has read from shards, wherever they came from.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import IO, Any

from webdataset.gopen import gopen

from pipeline.data import remote
from pipeline.data.manifest import local_path

ZERO_BLOCK = bytes(512)
_REGULAR = (b"0", b"\0", b"7")
# The largest member a stream of unknown size may declare: samples are images of kilo- to megabytes,
# so a bigger size field is corruption, and reading it would first try to allocate it.
MAX_MEMBER_BYTES = 1 << 30
_BUFFER = 1 << 20


class TarFormatError(ValueError):
    """A tar header or pax record that does not parse, or declares more bytes than the shard can hold."""


class TruncatedTar(EOFError):
    """The tar stops before a member or its header is whole; `name` is the cut member's (None: unknown)."""

    def __init__(self, what: str, name: str | None = None):
        super().__init__(what)
        self.name = name


# what reading a shard can raise: a cut or corrupted tar, an unreachable URL, a failing pipe: command
READ_ERRORS = (OSError, EOFError, ValueError)
LOCAL_CHUNK = 1 << 20  # bytes per read of a piece of a local shard (never past the piece's end)
REMOTE_CHUNK = 8 << 20  # bytes per range request to object storage (never past the piece's end)


class ReadCounter:
    """Bytes (and reads) this process has taken from shards: local files, range requests, pipe: output.

    Counted where the bytes arrive, so it is what "read each byte once" is measured with (tests/test_data_index.py,
    benchmarks/loader_s3_bench.py): sum it over every stream of an epoch and divide by the shards' size.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0

    def add(self, nbytes: int) -> None:
        self.bytes += nbytes
        self.requests += 1

    def reset(self) -> None:
        self.bytes = self.requests = 0


READ = ReadCounter()


class _Counted(io.RawIOBase):
    """A raw stream with read() (a file opened unbuffered, a pipe: command's output) whose bytes are counted."""

    def __init__(self, raw: Any):
        self.raw = raw

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(len(buf))
        buf[:len(data)] = data
        READ.add(len(data))
        return len(data)

    def close(self) -> None:
        try:
            self.raw.close()  # a pipe: command's exit status is raised here
        finally:
            super().close()


class _Remote(io.RawIOBase):
    """An object read from its first byte to its end by range requests (retried: pipeline.data.remote)."""

    def __init__(self, url: str):
        self.url, self.pos, self.eof = url, 0, False

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self.eof or not len(buf):
            return 0
        data = remote.read_range(self.url, self.pos, self.pos + len(buf))
        READ.add(len(data))
        self.eof = len(data) < len(buf)
        buf[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _Hashed(io.RawIOBase):
    """A byte stream that feeds every byte read from it into `digest`. Under a BufferedReader the hash
    is updated once per buffer fill (1 MiB), not once per member."""

    def __init__(self, raw: Any, digest: Any):
        self.raw, self.digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.raw.read(len(buf))  # read(), not readinto(): a pipe: stream has only read()
        buf[:len(data)] = data
        self.digest.update(data)
        return len(data)

    def close(self) -> None:
        try:
            self.raw.close()  # a pipe: command's exit status is raised here
        finally:
            super().close()


def _open(url: str, digest: Any = None) -> tuple[IO[bytes], int | None]:
    """(stream, its size in bytes or None where unknown) of a local path or file:// URL, pipe:COMMAND or
    any URL fsspec knows (s3://, gs://, http://, ...); with `digest`, every byte read is hashed into it."""
    size = None
    buffer = _BUFFER
    if url.startswith("pipe:"):
        raw: Any = _Counted(gopen(url, "rb", bufsize=_BUFFER))
    elif (path := local_path(url)) is not None:
        f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the caller, through the reader
        size = os.fstat(f.fileno()).st_size
        raw = _Counted(f)
    else:
        raw, buffer = _Remote(url), REMOTE_CHUNK
    return io.BufferedReader(_Hashed(raw, digest) if digest is not None else raw, buffer), size


def _number(header: bytes, lo: int, hi: int, what: str) -> int:
    """A header's numeric field: NUL/space-terminated octal, or GNU base-256 (0x80 first: positive)."""
    field = header[lo:hi]
    if field[0] == 0x80:
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip(b" ")
    if field[0] & 0x80 or digits.strip(b"01234567"):  # 0xff = a negative base-256 number: never valid here
        raise TarFormatError(f"tar header field {what} is not a number ({field!r})")
    return int(digits, 8) if digits else 0


def _pax(data: bytes) -> dict[str, str]:
    """pax records "LENGTH key=value\\n"; one that does not parse raises (length 0 would loop forever)."""
    out, i = {}, 0
    data = data.rstrip(b"\0")  # some writers pad the records with NULs
    while i < len(data):
        space = data.find(b" ", i)
        length = data[i:space]
        end = i + int(length) if length.isdigit() else -1
        if not i < space < end <= len(data) or data[end - 1] != 0x0A or b"=" not in data[space:end]:
            raise TarFormatError(f"pax record at byte {i} of its header does not parse ({data[i:i + 40]!r})")
        key, _, value = data[space + 1:end - 1].partition(b"=")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "replace")
        i = end
    return out


def _name(header: bytes, long_name: str | None) -> str:
    """A member's name for a message (the header may be corrupted)."""
    return long_name or header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")


def _tar_members(stream: IO[bytes], size: int | None, skip_data: bool = False,
                 open_end: bool = False) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a tar stream of `size` bytes (None: unknown), in order (see
    the module docstring). With `skip_data` a seekable stream seeks over regular members' data (b"").
    With `open_end` (one sample's bytes, cut out by the index) the stream may end at a member boundary,
    or inside tar's zero blocks, instead of with an end-of-archive block."""
    long_name = None
    left = size  # bytes after the current position; None = unknown
    while True:
        header = stream.read(512)
        if not header:
            if open_end:
                return
            raise TruncatedTar("tar ends without its end-of-archive block (cut at a member boundary)")
        if header == ZERO_BLOCK or (open_end and len(header) < 512 and not header.strip(b"\0")):
            return
        if len(header) < 512:
            raise TruncatedTar(f"tar header cut short ({len(header)} of 512 bytes)")
        if _number(header, 148, 156, "chksum") != sum(header[:148]) + 256 + sum(header[156:]):  # as 8 spaces
            raise TarFormatError("bad tar header checksum (not a tar, or corrupted)")
        size_, kind = _number(header, 124, 136, "size"), header[156:157]
        padded = size_ + -size_ % 512
        if left is not None:
            left -= 512
            if size_ > left:  # a cut file, or a corrupted size field that passed the checksum
                name = _name(header, long_name)
                raise TruncatedTar(f"member {name} needs {size_} bytes, {max(left, 0)} are left in the file",
                                   name)
            left -= padded
        elif size_ > MAX_MEMBER_BYTES:
            raise TarFormatError(f"member {_name(header, long_name)} declares {size_} bytes, more than a "
                                 f"member may have (MAX_MEMBER_BYTES = {MAX_MEMBER_BYTES})")
        if skip_data and kind in _REGULAR:
            stream.seek(padded, io.SEEK_CUR)  # within the file: the bound above
            data = b""
        else:
            data = stream.read(size_)
            if len(data) < size_:
                name = _name(header, long_name)
                raise TruncatedTar(f"member {name} truncated ({len(data)} of {size_} bytes)", name)
            if size_ % 512:
                stream.read(512 - size_ % 512)  # a short padding read shows up as a missing header next
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


def tar_samples(url: str, members: frozenset[str] = frozenset(),
                digest: Any = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) per sample, grouping consecutive members by key (WebDataset convention).

    At a cut or unreadable member, the sample being grouped is yielded only if it is provably whole:
    the failing member belongs to another key, or it has every member a sample of this shard has
    (`members`, from the manifest; without one, the previous sample's). Then the error is raised
    (one of READ_ERRORS); for a `pipe:` command, its exit status.

    With `digest` (a hashlib object) every byte of the stream is hashed into it, up to the end of the
    file (tar pads its end-of-archive block to a record), before the last sample is yielded; so when
    the generator is exhausted, the digest is the whole file's.
    """
    stream, size = _open(url, digest)
    finished = False
    try:
        key, parts, ref = None, {}, members or None
        try:
            for name, data in _tar_members(stream, size):
                k, ext = _key_ext(name)
                if k != key and key is not None:
                    yield key, parts  # complete: the next key's header has been read
                    ref, parts = members or frozenset(parts), {}
                key = k
                parts[ext] = data
        except READ_ERRORS as exc:
            cut = exc.name if isinstance(exc, TruncatedTar) else None
            if key is not None and (
                (cut is not None and _key_ext(cut)[0] != key) or (ref is not None and ref <= parts.keys())
            ):
                yield key, parts
            try:
                stream.close()
            except OSError as status:
                if isinstance(exc, EOFError):  # a pipe: command's exit status says more than "truncated"
                    raise status from exc
            raise
        if digest is not None:
            while stream.read(_BUFFER):
                pass
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


def sample_from_bytes(data: bytes, members: frozenset[str], last: bool = False) -> tuple[str, dict[str, bytes]]:
    """(key, {ext: bytes}) of one sample from exactly its bytes in the shard (its headers, data and padding;
    the shard's last sample also holds tar's end-of-archive blocks), as prepare's index delimits them.

    Raises one of READ_ERRORS unless the bytes hold whole members of one key, and every member a sample of
    this shard has (`members`, from the manifest): bytes that are cut, or that do not line up with a sample
    (the shard changed after the index was written), never make a sample. With `last` (the shard's last
    sample) members of another key end it instead: what follows the samples the manifest counts is not
    parsed, as in a read from the shard's first byte (a verifying read still checks those bytes' sha256).
    """
    key, parts = None, {}
    for name, member in _tar_members(io.BytesIO(data), len(data), open_end=True):
        k, ext = _key_ext(name)
        if key is not None and k != key:
            if last:
                break
            raise TarFormatError(f"the bytes the index gives sample {key} hold members of another sample ({name}); "
                                 "the shard changed after prepare")
        key = k
        parts[ext] = member
    if key is None:
        raise TruncatedTar("no tar member where the index puts a sample")
    if not members <= parts.keys():
        raise TruncatedTar(f"sample {key} lacks its member(s) {sorted(members - parts.keys())}", f"{key}.?")
    return key, parts


class Span:
    """Bytes [start, end) of one shard, read in order, each byte once: a local file from `start` (pread, in
    LOCAL_CHUNK reads), an object by range requests of at most REMOTE_CHUNK bytes (retried on transient
    errors, pipeline.data.remote), a pipe: command's output after reading past the `start` bytes before it
    (a pipe cannot seek). No read goes past `end`; `read(n)` returns fewer than n bytes only where the
    shard ends early (a truncated file), and then `ended_at` is the shard's size (None: unknown)."""

    def __init__(self, url: str, start: int, end: int):
        self.url, self.pos, self.end = url, start, end
        self.ended_at: int | None = None
        self._buf, self._at = b"", 0
        self._fd: int | None = None
        self._pipe: Any = None
        if url.startswith("pipe:"):
            self._pipe = gopen(url, "rb", bufsize=_BUFFER)
            at = 0
            while at < start:
                got = self._pipe.read(min(start - at, _BUFFER))
                READ.add(len(got))
                if not got:
                    self.ended_at = at
                    break
                at += len(got)
        elif (path := local_path(url)) is not None:
            self._fd = os.open(path, os.O_RDONLY)

    def _size(self) -> int | None:
        """The shard's size, after a read at self.pos returned nothing (it is at most self.pos)."""
        if self._fd is not None:
            return os.fstat(self._fd).st_size
        if self._pipe is not None:
            return self.pos

        try:
            return remote.size(self.url)
        except OSError:
            return None

    def _fetch(self, want: int) -> bytes:
        if self.ended_at is not None:
            return b""
        n = min(max(want, LOCAL_CHUNK if self._fd is not None or self._pipe is not None else REMOTE_CHUNK),
                self.end - self.pos)
        if n <= 0:
            return b""
        if self._pipe is not None:
            data = self._pipe.read(n)
        elif self._fd is not None:
            data = os.pread(self._fd, n, self.pos)
        else:

            data = remote.read_range(self.url, self.pos, self.pos + n)
        READ.add(len(data))
        self.pos += len(data)
        if len(data) < n:
            self.ended_at = self.pos if data else self._size()
        return data

    def read(self, n: int) -> bytes:
        """The next n bytes (fewer only where the shard ends first)."""
        out = []
        while n > 0:
            if self._at >= len(self._buf):
                self._buf, self._at = self._fetch(n), 0
                if not self._buf:
                    break
            chunk = self._buf[self._at:self._at + n]
            self._at += len(chunk)
            n -= len(chunk)
            out.append(chunk)
        return b"".join(out)

    def close(self, check: bool = False) -> None:
        """Release the file, connection or command; with `check`, a pipe: command's failure is raised."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._pipe is not None:
            pipe, self._pipe = self._pipe, None
            try:
                pipe.close()
            except OSError:
                if check:  # the command failed before writing what was asked of it
                    raise  # otherwise it was stopped early on purpose, and may have died of SIGPIPE


def count_samples(path: str) -> int:
    """Samples (distinct keys) in a local tar, from its headers only: the reader seeks over the data.

    Raises one of READ_ERRORS for a truncated or corrupted tar, as tar_samples would when reading it.
    """
    with open(path, "rb") as f:
        return len({_key_ext(name)[0] for name, _ in _tar_members(f, os.fstat(f.fileno()).st_size, True)})
