"""How backups are compressed (MIGRATE_BACKUP_COMPRESSION): every method restores what it took, a
backup of any method (or of the job's previous version) restores, damage to a compressed archive
is named as damage and changes nothing, and a bad setting exits 2 before anything runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, ZSTD_MAGIC, Db, custom_archive, pg_restore, run_job
from tests.test_retention import schema_and_rows

# the last version of the job whose backups were pg_dump's own compressed archives, no sidecar
# field saying so
PREVIOUS_VERSION = "cc1dc76792a77ad2ab618006516a7d1151fd697b"


def _at_0003_with_rows(db: Db, env: dict[str, str]) -> None:
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0003"}).code
    db.query("INSERT INTO users (email, first_name, last_name) "
             "SELECT 'u' || g || '@example.org', md5(g::text), repeat('x', g % 50) FROM generate_series(1, 2000) g")


@pytest.mark.parametrize("setting, stored_as, first_bytes", [
    (None, "zstd:1", ZSTD_MAGIC),
    ("zstd:19", "zstd:19", ZSTD_MAGIC),
    ("gzip", "gzip:6", b"PGDMP"),
    ("gzip:1", "gzip:1", b"PGDMP"),
    ("none", "none", b"PGDMP"),
])
def test_every_method_restores_the_state_it_backed_up(db: Db, env: dict[str, str], setting: str | None,
                                                     stored_as: str, first_bytes: bytes) -> None:
    """Each method's backup says how it is compressed, is a custom-format archive (in a zstd frame
    for zstd), and restores the schema and rows of its time after later migrations."""
    env = {**env, **({"MIGRATE_BACKUP_COMPRESSION": setting} if setting else {})}
    _at_0003_with_rows(db, env)
    at_backup = schema_and_rows(db)
    done = run_job("backup", env=env).event("backup.done")
    path = Path(done["path"])
    sidecar = json.loads(Path(f"{path}.json").read_text())
    assert 0 == run_job("run", env=env).code
    assert at_backup != schema_and_rows(db)

    result = run_job("restore", path.name, "--yes", env=env)

    assert 0 == result.code, result.stdout[-800:]
    assert at_backup == schema_and_rows(db)
    assert (stored_as, True) == (sidecar["compression"], path.read_bytes().startswith(first_bytes))
    assert custom_archive(path.read_bytes()).startswith(b"PGDMP")
    assert path.stat().st_size == sidecar["bytes"] == done["bytes"]


def test_zstd_is_smaller_than_pg_dumps_own_compression(db: Db, env: dict[str, str]) -> None:
    """The default compresses application-like rows at least as well as pg_dump -Fc's default."""
    _at_0003_with_rows(db, env)
    sizes = {}
    for setting in ("zstd", "gzip"):
        path = run_job("backup", env={**env, "MIGRATE_BACKUP_COMPRESSION": setting}).event("backup.done")["path"]
        sizes[setting] = Path(path).stat().st_size
    assert sizes["zstd"] <= sizes["gzip"], sizes


def test_a_backup_taken_by_the_previous_version_restores(db: Db, env: dict[str, str], tmp_path: Path) -> None:
    """A plain custom-format archive whose sidecar has no `compression` (the previous version's)
    restores: reading goes by the archive's first bytes, not by the sidecar."""
    previous = tmp_path / "previous"
    previous.mkdir()
    archived = subprocess.run(["git", "-C", str(ROOT), "archive", PREVIOUS_VERSION, "job"], capture_output=True)
    assert 0 == archived.returncode, archived.stderr.decode()
    subprocess.run(["tar", "-x", "-C", str(previous)], input=archived.stdout, check=True)
    _at_0003_with_rows(db, env)
    at_backup = schema_and_rows(db)
    # (from `previous`: python -m puts the working directory first on the path)
    taken = subprocess.run([sys.executable, "-m", "job", "backup"], cwd=previous, capture_output=True, text=True,
                           env={**env, "ALEMBIC_CONFIG": str(ROOT / "alembic.ini")}, timeout=120)
    assert 0 == taken.returncode, taken.stdout[-800:] + taken.stderr[-800:]
    path = Path(next(json.loads(line) for line in taken.stdout.splitlines()
                     if json.loads(line)["event"] == "backup.done")["path"])
    assert path.read_bytes().startswith(b"PGDMP") and "compression" not in json.loads(Path(f"{path}.json").read_text())
    assert 0 == run_job("run", env=env).code

    result = run_job("restore", path.name, "--yes", env=env)

    assert 0 == result.code, result.stdout[-800:]
    assert at_backup == schema_and_rows(db)


@pytest.mark.parametrize("damage", ["a flipped byte", "cut short"])
def test_a_damaged_compressed_backup_changes_nothing(db: Db, env: dict[str, str], damage: str) -> None:
    """A zstd backup with a flipped byte, or cut short with its sidecar made to agree (size and
    sha256: only the frame itself can tell), exits 5, says it is damaged, and changes nothing."""
    _at_0003_with_rows(db, env)
    path = Path(run_job("backup", env=env).event("backup.done")["path"])
    data = bytearray(path.read_bytes())
    if damage == "a flipped byte":
        data[len(data) // 2] ^= 0xFF
    else:
        import hashlib

        del data[len(data) * 3 // 4:]
        sidecar = Path(f"{path}.json")
        meta = json.loads(sidecar.read_text())
        sidecar.write_text(json.dumps({**meta, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}))
    path.write_bytes(bytes(data))
    db.query("DELETE FROM users WHERE id % 2 = 0")
    before = schema_and_rows(db)

    result = run_job("restore", path.name, "--yes", env=env)

    error = result.event("run.failed")["error"]
    assert (5, True) == (result.code, "damaged" in error), error
    assert before == schema_and_rows(db)


def test_pg_restore_reads_the_archive_inside_the_frame(db: Db, env: dict[str, str]) -> None:
    """By hand, `zstd -dc NAME | pg_restore --list` reads a backup's table of contents."""
    _at_0003_with_rows(db, env)
    path = run_job("backup", env=env).event("backup.done")["path"]

    listing = pg_restore("--list", backup=path, check=True).stdout.decode()

    assert "TABLE DATA public users" in listing


@pytest.mark.parametrize("value", ["lz4", "zstd:0", "zstd:20", "gzip:10", "none:3", "zstd:fast"])
def test_a_bad_compression_setting_exits_2(db: Db, env: dict[str, str], value: str) -> None:
    """A method or level the job does not know is a configuration error, before anything connects."""
    result = run_job("backup", env={**env, "MIGRATE_BACKUP_COMPRESSION": value})

    assert 2 == result.code
    assert "MIGRATE_BACKUP_COMPRESSION" in result.event("run.failed")["error"]
