"""What a pg_dump archive holds, read as a stream: `pg_restore --list` reads its table of contents
while we hash its bytes, in one pass, wherever the bytes come from (a file, a bucket)."""

from __future__ import annotations

import contextlib
import hashlib
import re
import subprocess
import tempfile
import threading
from typing import Iterable, Mapping, NamedTuple

from job.errors import BackupFailed


class Read(NamedTuple):
    """An archive as read: its size and sha256 (None when not read to its end), and its table of contents."""

    size: int | None
    sha256: str | None
    listing: str


def read(chunks: Iterable[bytes], pg_restore: str, env: Mapping[str, str], whole: bool = True) -> Read:
    """Feed the archive's bytes to `pg_restore --list` and hash them; with `whole` False, stop
    reading once pg_restore has the table of contents (it reads no further). A table of contents
    pg_restore cannot read raises BackupFailed."""
    with tempfile.TemporaryFile() as stderr:
        lister = subprocess.Popen([pg_restore, "--list"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=stderr, env=dict(env))
        listing: list[bytes] = []
        reader = threading.Thread(target=lambda: listing.append(lister.stdout.read()), daemon=True)
        reader.start()
        digest, size, listening = hashlib.sha256(), 0, True
        try:
            for chunk in chunks:
                digest.update(chunk)
                size += len(chunk)
                if listening:
                    try:
                        lister.stdin.write(chunk)
                    except BrokenPipeError:
                        listening = False
                    listening = listening and lister.poll() is None
                if not listening and not whole:
                    break
        finally:
            with contextlib.suppress(BrokenPipeError):
                lister.stdin.close()
            lister.wait()
            reader.join()
        if lister.returncode != 0:
            stderr.seek(0)
            raise BackupFailed(f"pg_restore --list cannot read the backup: {first_error(stderr.read().decode(errors='replace'))}")
    text = b"".join(listing).decode(errors="replace")
    return Read(size, digest.hexdigest(), text) if whole else Read(None, None, text)


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
