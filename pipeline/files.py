"""Reading files someone else may have written: JSON bounded in size and depth, safetensors headers bounded
before the library reads them, and names that must stay inside their folder (docs/security.md).

A checkpoint, a prepared data set or a run folder may come from elsewhere (downloaded, a shared disk), so what
we read from them is checked before it is used:

    meta = read_json(folder / "meta.json", max_bytes=JSON_MAX_BYTES, what="meta.json")
    raw = parse_json(data, max_bytes=LARGE_JSON_MAX_BYTES, what="manifest.json", where=url)
    metadata = safetensors_metadata(path, max_header_bytes=SAFETENSORS_HEADER_MAX_BYTES, what="weights file")
    path = inside(folder, name, what="shard name")      # no "..", no absolute path, no symlink out

Each raises ``UnsafeFileError``: a ValueError (the callers' ``except ValueError`` wraps it in their layer's
error with what to do) and an InputError (exit 2, one line, where nothing wraps it).
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from safetensors import SafetensorError, safe_open

from pipeline.cli import InputError

MiB = 1 << 20
# The most bytes a file of each kind may have before it is refused unread: far above what real ones hold.
JSON_MAX_BYTES = 16 * MiB  # meta.json, records, configs: kilobytes (a 4096-rank DeepSpeed meta.json: ~1 MiB)
LARGE_JSON_MAX_BYTES = 64 * MiB  # manifest.json (~150 bytes a shard), the loader position data.json
SAFETENSORS_HEADER_MAX_BYTES = 16 * MiB  # a U-Net's weights: ~150 bytes of header a tensor
INDEX_HEADER_MAX_BYTES = 64 * MiB  # a sample index: two entries (~200 bytes) a shard; safetensors' own cap: 100 MB
MAX_JSON_DEPTH = 64  # ours nest at most ~6 levels; deeper would exhaust the recursion of whoever walks it


class UnsafeFileError(ValueError, InputError):
    """A file (or a name read from one) that is refused before use: too large, too deep, not JSON, or a name that
    leaves its folder. The message names the file and what is wrong."""


def _depth_problem(value: Any) -> bool:
    """Whether ``value`` nests deeper than MAX_JSON_DEPTH (iterative: a deep value cannot exhaust our stack)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


def parse_json(data: bytes | str, *, max_bytes: int, what: str, where: str | os.PathLike) -> Any:
    """JSON ``data`` read from ``where`` (named in messages), refused when over ``max_bytes``, invalid (also
    invalid UTF-8), or nested deeper than MAX_JSON_DEPTH."""
    if len(data) > max_bytes:
        raise UnsafeFileError(f"{where} is over {max_bytes // MiB} MiB, more than a {what} holds; refused unread")
    try:
        value = json.loads(data)
    except RecursionError:  # the decoder recurses once per level: [[[[... deeper than the stack
        raise UnsafeFileError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels; a {what} nests a few: "
                              "refused") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, an integer of too many digits
        raise UnsafeFileError(f"{where} is not valid JSON ({exc})") from None
    if isinstance(value, (dict, list)) and _depth_problem(value):
        raise UnsafeFileError(f"{where} nests deeper than {MAX_JSON_DEPTH} levels; a {what} nests a few: refused")
    return value


def read_json(path: str | os.PathLike, *, max_bytes: int, what: str) -> Any:
    """A local JSON file, its size bounded before it is read (OSError when it cannot be read at all)."""
    with open(path, "rb") as f:
        data = f.read(max_bytes + 1)
    return parse_json(data, max_bytes=max_bytes, what=what, where=path)


def safetensors_header_problem(first8: bytes, size: int, max_header_bytes: int, what: str) -> str:
    """What is wrong with a safetensors file's 8-byte header length (little-endian u64), given the file's
    ``size``; "" when it is plausible. Checked before the library reads (and allocates) the header."""
    if len(first8) < 8:
        return "is not a safetensors file (shorter than the 8 bytes that give its header's length)"
    n = int.from_bytes(first8[:8], "little")
    if n > max_header_bytes:
        return (f"has a safetensors header of {n:,} bytes, over the {max_header_bytes // MiB} MiB a {what} has; "
                "refused unread")
    if n > size - 8:
        return f"has a safetensors header of {n:,} bytes but only {size - 8:,} bytes follow (cut short)"
    return ""


def check_safetensors_header(path: str | os.PathLike, *, max_header_bytes: int, what: str) -> None:
    """UnsafeFileError when ``path``'s header length is implausible (OSError when it cannot be read)."""
    with open(path, "rb") as f:
        problem = safetensors_header_problem(f.read(8), os.fstat(f.fileno()).st_size, max_header_bytes, what)
    if problem:
        raise UnsafeFileError(f"{path} {problem}")


def safetensors_metadata(path: str | os.PathLike, *, max_header_bytes: int, what: str) -> dict[str, Any]:
    """A safetensors file's metadata with each value JSON-decoded (how our files store it), the header bounded
    first; UnsafeFileError for a file the library refuses or a value that is not bounded JSON."""
    check_safetensors_header(path, max_header_bytes=max_header_bytes, what=what)
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
    except SafetensorError as exc:
        raise UnsafeFileError(f"{path} is not a readable safetensors file ({exc})") from None
    return {k: parse_json(v, max_bytes=max_header_bytes, what=what, where=f"{path} (metadata {k!r})")
            for k, v in metadata.items()}


def name_problem(name: Any) -> str:
    """What makes ``name`` (read from a file) other than a plain relative path; "" when it is one."""
    if not isinstance(name, str) or not name or "\0" in name:
        return f"{name!r} is not a file name"
    if "://" in name or name.startswith("pipe:"):
        return f"{name!r} is a URL or a command, not a name inside the folder"
    if os.path.isabs(name) or name.startswith("~"):
        return f"{name!r} is an absolute path"
    if ".." in PurePosixPath(name).parts:
        return f"{name!r} leads out of the folder ('..')"
    return ""


def inside(folder: str | os.PathLike, name: Any, *, what: str) -> Path:
    """``folder / name`` for a ``name`` read from a file in that local folder, once it is a plain relative path
    that, with symlinks followed, stays inside the folder; UnsafeFileError naming ``what`` otherwise."""
    problem = name_problem(name)
    path = Path(folder) / name if not problem else None
    if path is not None:
        root = os.path.realpath(folder)
        real = os.path.realpath(path)
        if os.path.commonpath([root, real]) != root:
            problem = f"{name!r} is a symlink that leads out of the folder (to {real})"
    if problem:
        raise UnsafeFileError(f"{what} {problem}; only names inside {folder} are read")
    return path
