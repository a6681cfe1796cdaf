"""The corruption policy: an unreadable shard or sample is counted and warned about, or raised when strict.

A failed shard read (cut or unparsable tar, or bytes that differ from the manifest's sha256) leaves
placeholder slots for its lost samples; counts and the warning happen when a slot is emitted, never
when a block is (re)read, so the loader's stats are a function of the consumer's position and survive
resume. A shard counts once per epoch over all streams: by the stream whose piece holds the slot that
carries the failure (pipeline.data.samples.read_piece). The sequential read for evaluation
(pipeline.data.sequential) follows the same policy with the same Report.

Every error about the data input (a missing or empty folder, no manifest, an unknown split, a corrupt
shard under data.strict) is a DataError with a one-line message naming the path or key and the fix;
launch/train.py exits 2 on it.
"""

from __future__ import annotations

import warnings
from typing import Any

from pipeline.cli import InputError


class DataError(ValueError, InputError):
    """The data input is wrong: fix the path, the split or the shards (one line; training exits 2)."""


class CorruptDataWarning(UserWarning):
    """A shard or sample was unreadable and has been skipped (counted in loader.stats)."""


class CorruptDataError(DataError):
    """A shard or sample was unreadable (or differs from the manifest) and data.strict=true."""


class Report:
    """Skip counting and warnings (or raising, when strict) for one stream.

    Counts change only when a slot is emitted (the decode stage), so a batch's snapshot of them covers
    exactly the positions up to its cursor, and a stream restarted at that cursor never counts twice.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self.skipped_samples = 0
        self.skipped_shards = 0

    def shard_failed(self, shard: Any, problem: str, lost: str, exc: BaseException | None = None) -> str:
        """The message for a failed shard read (``shard``: a manifest.Shard; this module sits below the readers, so
        it takes them by duck type); raises when strict (at read time, as early as possible)."""
        msg = f"shard {shard.url}: {problem}"
        if self.strict:
            raise CorruptDataError(f"{msg}; re-run prepare for it, or set data.strict=false to skip it") from exc
        return f"{msg}; skipping {lost} (data.strict=true raises instead)"

    def emitted(self, raw: Any) -> None:
        if raw.failure:
            self.skipped_shards += 1
            warnings.warn(raw.failure, CorruptDataWarning, stacklevel=2)
        if raw.parts is None and raw.lost:
            self.skipped_samples += 1

    def sample_failed(self, raw: Any, why: str) -> None:
        msg = f"shard {raw.shard}, key {raw.key}: {why}"
        if self.strict:
            raise CorruptDataError(f"{msg}; re-run prepare, or set data.strict=false to skip it")
        self.skipped_samples += 1
        warnings.warn(f"{msg}; sample skipped (data.strict=true raises instead)", CorruptDataWarning, stacklevel=2)
