"""How a backup's archive is compressed (MIGRATE_BACKUP_COMPRESSION).

pg_dump's custom format compresses each table's data with zlib, in pg_dump's own process, at
level 6 by default: on a database of any size, that is most of a backup's time, more than reading
the data. So by default pg_dump writes its archive uncompressed (`--compress=0`) and the job
compresses the stream with zstandard, on as many threads as the machine has, as it passes on its
way to the file or the bucket: `make bench` measured it close to the read floor, with a smaller
archive than pg_dump's. The file is then a zstd frame holding a custom-format archive (`zstd -dc
NAME | pg_restore ...` by hand); its sidecar says `"compression": "zstd:1"`.

`gzip[:LEVEL]` keeps pg_dump's own compression (the file a plain custom-format archive, any
pg_restore reads it as it is), `none` none at all. Whatever a backup was written with, reading it
(restore, rehearsal, the table-of-contents check) goes by its first bytes: a zstd frame is
decompressed as it streams, anything else is passed to pg_restore as it is, so backups taken
before, or with another setting, restore the same way.
"""

from __future__ import annotations

import itertools
import os
from typing import Any, Iterable, Iterator, NamedTuple

from job.errors import ConfigError

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
DEFAULT = "zstd:1"
LEVELS = {"zstd": (1, 19, 1), "gzip": (0, 9, 6), "none": (0, 0, 0)}


class Method(NamedTuple):
    """A compression method and its level."""

    name: str  # zstd (the job's, over an uncompressed archive), gzip (pg_dump's own), none
    level: int

    def __str__(self) -> str:
        return self.name if self.name == "none" else f"{self.name}:{self.level}"

    def pg_dump_option(self) -> str:
        """pg_dump's --compress: its own level for gzip, else none (the job compresses, or nothing does)."""
        return f"--compress={self.level if self.name == 'gzip' else 0}"

    def compressor(self) -> Any:
        """An object whose compress(bytes) and flush() give the stored bytes, in order."""
        if self.name != "zstd":
            return _Unchanged()
        import zstandard

        return zstandard.ZstdCompressor(level=self.level, threads=_threads(), write_checksum=True).compressobj()


def parse(value: str, name: str = "MIGRATE_BACKUP_COMPRESSION") -> Method:
    """`zstd`, `zstd:LEVEL` (1-19), `gzip`, `gzip:LEVEL` (0-9: pg_dump's own), `none`."""
    method, _, level = value.strip().lower().partition(":")
    if method not in LEVELS:
        raise ConfigError(f"{name}={value!r}: expected zstd[:1-19], gzip[:0-9] or none")
    low, high, default = LEVELS[method]
    if not level:
        return Method(method, default)
    if method == "none" or not level.isdigit() or not low <= int(level) <= high:
        raise ConfigError(f"{name}={value!r}: the level of {method} is {low} to {high}" if method != "none"
                          else f"{name}={value!r}: none takes no level")
    return Method(method, int(level))


class Undecodable(Exception):
    """A stored archive whose zstd stream does not decompress: damaged, or cut short."""


def decoded(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """A stored archive's bytes as pg_restore reads them: a zstd frame decompressed as it streams
    (its first bytes say so), anything else as it is. Undecodable where the frame is damaged (its
    checksum) or cut short."""
    iterator = iter(chunks)
    first = b""
    for first in iterator:  # (the first non-empty chunk decides)
        if first:
            break
    if not first.startswith(ZSTD_MAGIC):
        if first:
            yield first
        yield from iterator
        return
    import zstandard

    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        for chunk in itertools.chain([first], iterator):
            out = decompressor.decompress(chunk)
            if out:
                yield out
    except zstandard.ZstdError as e:
        raise Undecodable(f"its zstd stream does not decompress: {e}") from None
    if not decompressor.eof:
        raise Undecodable("its zstd stream ends before its frame does: the file is cut short")


def _threads() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Unchanged:
    def compress(self, chunk: bytes) -> bytes:
        return chunk

    def flush(self) -> bytes:
        return b""
