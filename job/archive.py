"""What a pg_dump archive holds, read as a stream: `pg_restore --list` reads its table of contents
while we hash its bytes, in one pass, wherever the bytes come from (a file, a bucket)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import subprocess
import tempfile
import threading
from typing import IO, Iterable, Mapping, NamedTuple

from job import children
from job.errors import BackupFailed


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


def read(chunks: Iterable[bytes], pg_restore: str, env: Mapping[str, str], whole: bool = True) -> Read:
    """Feed the archive's bytes to `pg_restore --list` and hash them; with `whole` False, stop
    reading once pg_restore has the table of contents."""
    lister = Lister(pg_restore, env)
    digest, size = hashlib.sha256(), 0
    try:
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            lister.feed(chunk)
            if not lister.wanting and not whole:
                break
    finally:
        listing = lister.listing()
    return Read(size, digest.hexdigest(), listing) if whole else Read(None, None, listing)


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
