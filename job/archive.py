"""What a pg_dump archive holds, read as a stream: `pg_restore --list` reads its table of contents
while we hash its bytes, in one pass, wherever the bytes come from (pg_dump, a file, a bucket).
The bytes stored are compressed as job.compression says; pg_restore reads them decompressed."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import subprocess
import tempfile
import threading
from typing import IO, Callable, Iterable, Iterator, Mapping, NamedTuple

from job import children, compression
from job.errors import BackupFailed

CHUNK = 1 << 20  # bytes read from pg_dump at a time


class Read(NamedTuple):
    """An archive as read: its size and sha256 (None when not read to its end), and its table of contents."""

    size: int | None
    sha256: str | None
    listing: str


class Lister:
    """`pg_restore --list` reading an archive's bytes as they are handed to it: it reads the
    header and the table of contents, and then needs no more."""

    def __init__(self, pg_restore: str, env: Mapping[str, str]) -> None:
        self._stderr = tempfile.TemporaryFile()
        self._process = children.spawn([pg_restore, "--list"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._stderr, env=dict(env))
        self._output: list[bytes] = []
        self._reader = threading.Thread(target=lambda: self._output.append(self._process.stdout.read()), daemon=True)
        self._reader.start()
        self.wanting = True
        self._result: str | BackupFailed | None = None

    def feed(self, chunk: bytes | bytearray) -> None:
        if self.wanting:
            try:
                self._process.stdin.write(chunk)
            except BrokenPipeError:
                self.wanting = False
            self.wanting = self.wanting and self._process.poll() is None

    def listing(self) -> str:
        """The table of contents (once pg_restore has ended: its input closes); BackupFailed if
        pg_restore could not read it."""
        if self._result is None:
            with contextlib.suppress(BrokenPipeError):
                self._process.stdin.close()
            self._process.wait()
            self._reader.join()
            with self._stderr:
                self._result = (b"".join(self._output).decode(errors="replace") if self._process.returncode == 0
                                else BackupFailed("pg_restore --list cannot read the backup: "
                                                  + first_error(written(self._stderr))))
        if isinstance(self._result, BackupFailed):
            raise self._result
        return self._result


class Hashed:
    """Stored bytes as they are read, hashed (sha256) and counted on the way. Iterating again goes
    on where the last iteration stopped; `rest()` reads what is left."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._digest = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            self._digest.update(chunk)
            self.size += len(chunk)
            yield chunk

    def rest(self) -> str:
        """Read to the end: the sha256 of everything."""
        for _ in self:
            pass
        return self._digest.hexdigest()


class Dumped:
    """pg_dump's archive as it comes out of its stdout, in one pass: `pg_restore --list` reads its
    table of contents from the bytes as pg_dump wrote them, and iterating gives the bytes to store
    (compressed by `method`), hashed and counted on the way. `read()` once they are all taken."""

    def __init__(self, stdout: IO[bytes], method: compression.Method, pg_restore: str, env: Mapping[str, str]) -> None:
        self._stdout = stdout
        self._method = method
        self._lister = Lister(pg_restore, env)
        self._stored = Hashed(self._compressed())

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._stored)

    def read(self) -> Read:
        """What was stored: its size and sha256, and the archive's table of contents (BackupFailed
        where pg_restore could not read it)."""
        return Read(self._stored.size, self._stored.rest(), self._lister.listing())

    def close(self) -> None:
        """End pg_restore --list, whatever happened (pg_dump is gone by now)."""
        with contextlib.suppress(BackupFailed):
            self._lister.listing()

    def _compressed(self) -> Iterator[bytes]:
        compressor = self._method.compressor()
        while raw := self._stdout.read(CHUNK):
            self._lister.feed(raw)
            if stored := compressor.compress(raw):
                yield stored
        if stored := compressor.flush():
            yield stored


def spawn_dump(spawn: Callable[..., subprocess.Popen], argv: list[str], env: Mapping[str, str],
               stderr: IO[bytes]) -> subprocess.Popen:
    """pg_dump writing its archive to a pipe. The pipe is 1 MiB, not Linux's 64 KiB: a small pipe
    fills whenever our reading thread waits for the CPU, and pg_dump stops (make bench: 1.23x the
    bare dump with the default, 1.15x with this). 1 MiB is what an unprivileged process may ask for."""
    dumper = spawn(argv, env=env, stdout=subprocess.PIPE, stderr=stderr)
    with contextlib.suppress(OSError):
        fcntl.fcntl(dumper.stdout.fileno(), fcntl.F_SETPIPE_SZ, 1 << 20)
    return dumper


def read(chunks: Iterable[bytes], pg_restore: str, env: Mapping[str, str], whole: bool = True) -> Read:
    """Feed a stored archive's bytes, decompressed, to `pg_restore --list`, and hash them as stored;
    with `whole` False, stop reading once pg_restore has the table of contents. (Once it has, the
    rest is hashed, never decompressed.)"""
    lister = Lister(pg_restore, env)
    stream = Hashed(chunks)
    try:
        for piece in compression.decoded(stream):
            lister.feed(piece)
            if not lister.wanting:
                break
        sha256 = stream.rest() if whole else None
    except BaseException as e:
        with contextlib.suppress(BackupFailed):
            lister.listing()  # (pg_restore ends with its input)
        if isinstance(e, compression.Undecodable):
            raise BackupFailed(f"the backup is damaged: {e}") from None
        raise
    listing = lister.listing()
    return Read(stream.size, sha256, listing) if whole else Read(None, None, listing)


def dumped_by(listing: str) -> str:
    """The pg_dump version an archive records, from `pg_restore --list` (e.g. '15.20 (Debian 15.20-0+deb12u1)')."""
    match = re.search(r"^;\s*Dumped by pg_dump version: (.+)$", listing, re.MULTILINE)
    if not match:
        raise BackupFailed("pg_restore --list shows no pg_dump version: the backup is not a pg_dump archive")
    return match.group(1).strip()


def dumped_from(listing: str) -> str | None:
    """The database the archive itself says it was dumped from (its table of contents' header)."""
    found = re.search(r"(?m)^;\s+dbname: (.*)$", listing)
    return found.group(1).strip() if found else None


def written(file: IO[bytes]) -> str:
    """What a child process wrote into `file` (its stderr, in a temporary file), as text."""
    file.seek(0)
    return file.read().decode(errors="replace")


def first_error(stderr: str) -> str:
    """What went wrong, from pg_dump/pg_restore/psql output: the first error line with the DETAIL
    and HINT lines that follow it (its cause), not the last line (often `Command was: ...`)."""
    lines = [line.strip() for line in stderr.strip().splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if "error:" in line.lower() or "fatal:" in line.lower()), None)
    if first is None:
        return lines[-1] if lines else "no error output"
    cause = [lines[first]]
    for line in lines[first + 1:]:
        if "detail:" in line.lower() or "hint:" in line.lower():
            cause.append(line)
        elif cause:
            break
    return " ".join(cause)
