"""Backups in a directory (a mounted volume): written to a private temporary name, fsynced and
renamed, so a file under a backup's name is always complete."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Mapping

from job import archive, compression
from job.errors import BackupFailed, DumpExited
from job.logs import log

CHUNK = 1 << 20
PARTIAL = ".partial"


class Directory:
    """A backup store in a directory: the operations job.backup needs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __str__(self) -> str:
        return str(self.path)

    def path_of(self, name: str) -> str:
        return str(self.path / name)

    def locate(self, given: str) -> tuple[Directory, str]:
        """The store and name of the backup an operator names: an absolute path, or a name in this
        directory (never the working directory's)."""
        path = Path(given)
        return (Directory(path.parent), path.name) if path.is_absolute() else (self, given)

    def ready(self) -> None:
        if not self.path.is_dir():
            raise BackupFailed(
                f"backup directory {str(self.path)!r} does not exist: mount a volume there, "
                "set MIGRATE_BACKUP_DIR, or set MIGRATE_BACKUP=off"
            )

    def names(self) -> list[str]:
        try:
            return [entry.name for entry in os.scandir(self.path) if entry.is_file()]
        except OSError:
            return []

    def read(self, name: str) -> bytes | None:
        try:
            return (self.path / name).read_bytes()
        except (FileNotFoundError, IsADirectoryError):
            return None

    def write(self, name: str, content: bytes) -> None:
        with _atomically(self.path / name) as partial:
            partial.write_bytes(content)

    def delete(self, name: str) -> None:
        (self.path / name).unlink(missing_ok=True)

    def free_space(self) -> int | None:
        """Bytes an unprivileged writer may still write on the volume."""
        try:
            stat = os.statvfs(self.path)
        except OSError:
            return None
        return stat.f_bavail * stat.f_frsize

    def size(self, name: str) -> int | None:
        try:
            return (self.path / name).stat().st_size
        except OSError:
            return None

    @contextlib.contextmanager
    def chunks(self, name: str) -> Iterator[Iterator[bytes]]:
        try:
            file = open(self.path / name, "rb")
        except OSError as e:
            raise BackupFailed(f"cannot read backup {self.path_of(name)!r}: {e.strerror}") from None
        with file:
            yield iter(lambda: file.read(CHUNK), b"")

    def remove_partials(self, matches: Callable[[str], bool]) -> None:
        """A partial file of a backup `matches` accepts is a dead run's leftover: under the lock no
        other job writes one. Another set's (another database on the same volume) may be being written."""
        for leftover in self.path.glob(f".*{PARTIAL}"):
            if leftover.is_file() and matches(leftover.name[1:-len(PARTIAL)]):
                leftover.unlink(missing_ok=True)
                log.warning("backup.partial_removed", path=str(leftover))

    def dump(self, name: str, argv: list[str], env: Mapping[str, str], spawn: Callable[..., subprocess.Popen],
             pg_restore: str, prepare: Callable[[], None], method: compression.Method) -> archive.Read:
        """pg_dump's archive (`argv` writes to stdout), compressed by `method` as it streams, into a
        private temporary file that becomes `name` only once complete and readable by `pg_restore
        --list`; hashed as written (nothing is read back). `prepare` first: it frees the space a dead
        run's partial file holds."""
        prepare()
        with _atomically(self.path / name) as partial, tempfile.TemporaryFile() as stderr:
            dumper = archive.spawn_dump(spawn, argv, env, stderr)
            dumped = archive.Dumped(dumper.stdout, method, pg_restore, env)
            try:
                with open(partial, "wb") as file:
                    for chunk in dumped:
                        file.write(chunk)
                returncode = dumper.wait()
            finally:
                if dumper.poll() is None:
                    dumper.kill()
                dumper.wait()
                dumper.stdout.close()
                dumped.close()
            if returncode != 0:
                raise DumpExited(returncode, archive.written(stderr))
            return dumped.read()


@contextlib.contextmanager
def _atomically(final: Path) -> Iterator[Path]:
    """A temporary file beside `final`, created 0600 before anything writes to it (so no byte is ever
    readable by others); when the body succeeds it is fsynced and renamed over `final`, the directory
    fsynced; whatever happens, no temporary file is left."""
    partial = final.with_name(f".{final.name}{PARTIAL}")
    try:
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise BackupFailed(f"cannot write to backup directory {str(final.parent)!r}: {e.strerror}") from None
    try:
        yield partial
        _fsync(partial)
        os.rename(partial, final)
        _fsync(final.parent)
    except OSError as e:
        raise BackupFailed(f"cannot write {str(final)!r}: {e.strerror}") from None
    finally:
        partial.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
