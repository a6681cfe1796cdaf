"""The corruption policy: an unreadable shard or sample is counted and warned about, or raised when strict.

A failed shard read leaves placeholder slots for its lost samples; counts and the warning happen when
a slot is emitted, never when a block is (re)read, so the loader's stats are a function of the
consumer's position and survive resume. A shard counts once per epoch over all streams: by the stream
whose piece holds its first lost sample. The sequential read for evaluation (pipeline.data.sequential)
follows the same policy with the same Report.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.data.manifest import Shard
    from pipeline.data.samples import Raw


class CorruptDataWarning(UserWarning):
    """A shard or sample was unreadable and has been skipped (counted in loader.stats)."""


class CorruptDataError(RuntimeError):
    """A shard or sample was unreadable and data.strict=true."""


class Report:
    """Skip counting and warnings (or raising, when strict) for one stream.

    Counts change only when a slot is emitted (the decode stage), so a batch's snapshot of them covers
    exactly the positions up to its cursor, and a stream restarted at that cursor never counts twice.
    """

    def __init__(self, strict: bool):
        self.strict = strict
        self.skipped_samples = 0
        self.skipped_shards = 0

    def shard_failed(self, shard: Shard, last_key: str | None, exc: BaseException, lost: str) -> str:
        """The message for a failed shard read; raises when strict (at read time, as early as possible)."""
        where = f"after key {last_key}" if last_key else "before its first sample"
        msg = f"shard {shard.url}: unreadable {where} ({type(exc).__name__}: {exc})"
        if self.strict:
            raise CorruptDataError(f"{msg}; re-run prepare for it, or set data.strict=false to skip it") from exc
        return f"{msg}; skipping {lost} (data.strict=true raises instead)"

    def emitted(self, raw: Raw) -> None:
        if raw.failure:
            self.skipped_shards += 1
            warnings.warn(raw.failure, CorruptDataWarning, stacklevel=2)
        if raw.parts is None and raw.lost:
            self.skipped_samples += 1

    def sample_failed(self, raw: Raw, why: str) -> None:
        msg = f"shard {raw.shard}, key {raw.key}: {why}"
        if self.strict:
            raise CorruptDataError(f"{msg}; re-run prepare, or set data.strict=false to skip it")
        self.skipped_samples += 1
        warnings.warn(f"{msg}; sample skipped (data.strict=true raises instead)", CorruptDataWarning, stacklevel=2)
