"""Fixtures: a fresh database per test on the machine's PostgreSQL, throwaway clusters for tests
that stop or delay a server, and a runner that starts the real `migrate-job` console script."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import psycopg2
import pytest

from tests.pgcluster import Cluster

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ROOT / "tests" / "scenarios"
ADMIN_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
MIGRATE_JOB = str(Path(sys.executable).parent / "migrate-job")
# a password with every character that needs URL-encoding
SECRET = "s3cr%t@p:ss/w0rd"
SECRET_IN_URL = "s3cr%25t%40p%3Ass%2Fw0rd"


@dataclass
class Result:
    """A finished job: exit code, and its stdout parsed as one JSON object per line."""

    code: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.splitlines()]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line["event"] == name]

    def event(self, name: str) -> dict[str, Any]:
        found = self.events(name)
        assert len(found) == 1, f"expected one {name!r} event, got {len(found)}: {self.stdout}"
        return found[0]

    @property
    def failure(self) -> str:
        """The error of the job's one `run.failed`, on whichever stream it logs to (`status`, `plan
        --sql` and `lint` keep stdout for what they print)."""
        (error,) = [json.loads(line)["error"] for line in self.stdout.splitlines() + self.stderr.splitlines()
                    if line.startswith("{") and '"run.failed"' in line]
        return error

    @property
    def names(self) -> list[str]:
        return [line["event"] for line in self.lines]


ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # how a zstd frame begins


def base_env(**extra: str) -> dict[str, str]:
    """The test process's environment less anything that would configure the job by accident."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("MIGRATE_", "PG", "DATABASE_URL", "ALEMBIC_"))
    }
    env.update(MIGRATE_LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def run_job(*args: str, env: dict[str, str], timeout: float = 120, cwd: Path = ROOT) -> Result:
    proc = subprocess.run([MIGRATE_JOB, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def start_job(*args: str, env: dict[str, str], cwd: Path = ROOT) -> subprocess.Popen:
    return subprocess.Popen([MIGRATE_JOB, *args], env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 120) -> Result:
    stdout, stderr = proc.communicate(timeout=timeout)
    return Result(proc.returncode, stdout, stderr)


def start_logged(env: dict[str, str], out: Path, *args: str, **kw: Any) -> subprocess.Popen:
    """Start the job with its stdout going to `out`, so a test can watch its events as they come."""
    return subprocess.Popen([MIGRATE_JOB, *(args or ("run",))], env=env, cwd=kw.pop("cwd", ROOT), stdout=out.open("w"),
                            stderr=subprocess.PIPE, text=True, **kw)


def finish_logged(proc: subprocess.Popen, out: Path, timeout: float = 60) -> Result:
    proc.wait(timeout=timeout)
    return Result(proc.returncode, out.read_text(), proc.stderr.read())


def hold_lock(db: "Db", key: int | None = None, application_name: str = "someone-else",
              shared: bool = False) -> tuple[Any, int]:
    """Another session holding the migration lock (the default key for `db`; exclusive unless
    `shared`): its connection and pid."""
    from job.config import lock_key_for
    from job.plan import VersionTable

    holder = db.connect(application_name=application_name)
    function = "pg_advisory_lock_shared" if shared else "pg_advisory_lock"
    with holder.cursor() as cur:
        cur.execute(f"SELECT {function}(%s)", (lock_key_for(db.name, VersionTable()) if key is None else key,))
        cur.execute("SELECT pg_backend_pid()")
        return holder, cur.fetchone()[0]




class Db:
    """One fresh database."""

    def __init__(self, admin_url: str, name: str) -> None:
        self.admin_url = admin_url
        self.name = name
        self.url = admin_url.rsplit("/", 1)[0] + f"/{name}"

    def connect(self, **kw: Any) -> Any:
        conn = psycopg2.connect(self.url, **kw)
        conn.autocommit = True
        return conn

    def query(self, sql: str, params: Any = None) -> list[tuple]:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall() if cur.description else []
        finally:
            conn.close()

    def tables(self, schema: str = "public") -> set[str]:
        return {r[0] for r in self.query("SELECT tablename FROM pg_tables WHERE schemaname = %s", (schema,))}

    def version(self) -> list[str]:
        if "alembic_version" not in self.tables():
            return []
        return sorted(r[0] for r in self.query("SELECT version_num FROM alembic_version"))

    def holds_data(self) -> "Db":
        """Give the database something of its own, as a service's database has (a first deploy's
        empty database is not backed up: there is nothing to restore)."""
        self.query("CREATE TABLE legacy_notes (id int PRIMARY KEY, body text)")
        self.query("INSERT INTO legacy_notes VALUES (1, 'kept')")
        return self

    def advisory_locks(self) -> int:
        return self.query(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
        )[0][0]


def custom_archive(stored: bytes) -> bytes:
    """A backup's custom-format archive, as an operator gets it by hand (`zstd -dc NAME`): a backup
    is a zstd frame around it, unless it was taken with pg_dump's own compression (or by an older
    job), when the file is the archive itself."""
    import zstandard

    return zstandard.ZstdDecompressor().decompressobj().decompress(stored) if stored[:4] == ZSTD_MAGIC else stored


def pg_restore(*args: str, backup: str | Path, **kwargs: Any) -> subprocess.CompletedProcess:
    """pg_restore ARGS reading a backup's archive (`zstd -dc NAME | pg_restore ARGS`)."""
    return subprocess.run(["pg_restore", *args], input=custom_archive(Path(backup).read_bytes()), capture_output=True,
                          **kwargs)


def create_database(admin_url: str, prefix: str = "t") -> Db:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
    admin.close()
    return Db(admin_url, name)


def drop_database(db: Db) -> None:
    admin = psycopg2.connect(db.admin_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def db() -> Iterator[Db]:
    database = create_database(ADMIN_URL)
    yield database
    drop_database(database)


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    path = tmp_path / "backups"
    path.mkdir()
    return path


@pytest.fixture
def env(db: Db, backup_dir: Path, tmp_path: Path) -> dict[str, str]:
    """The job's environment for the example project against the test's database."""
    return base_env(
        DATABASE_URL=db.url,
        ALEMBIC_CONFIG=str(ROOT / "alembic.ini"),
        MIGRATE_BACKUP_DIR=str(backup_dir),
        MIGRATE_TERMINATION_LOG=str(tmp_path / "termination-log"),
        MIGRATE_WAIT_TIMEOUT="10",
        MIGRATE_LOCK_TIMEOUT="30",
    )


def scenario(name: str) -> str:
    return str(SCENARIOS / name / "alembic.ini")


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    """A throwaway cluster, not started: the test decides when."""
    directory = Path(tempfile.mkdtemp(prefix="migrate-job-pg-"))
    c = Cluster(directory)
    c.init()
    yield c
    c.destroy()


@pytest.fixture(scope="session")
def password_cluster() -> Iterator[Cluster]:
    """A running cluster with password authentication over TCP, and a role `app` whose password is SECRET."""
    directory = Path(tempfile.mkdtemp(prefix="migrate-job-pgpw-"))
    c = Cluster(directory, password_auth=True)
    c.start()
    c.psql(f"CREATE ROLE app LOGIN PASSWORD '{SECRET}'")
    yield c
    c.destroy()


@pytest.fixture
def app_db(password_cluster: Cluster) -> Iterator[Db]:
    """A fresh database owned by `app` on the password cluster; its url carries the encoded SECRET."""
    name = f"p_{uuid.uuid4().hex[:12]}"
    password_cluster.psql(f'CREATE DATABASE "{name}" OWNER app')
    database = Db(password_cluster.url(password="password"), name)
    database.url = f"postgresql://app:{SECRET_IN_URL}@127.0.0.1:{password_cluster.port}/{name}"
    yield database
    password_cluster.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def kill(proc: subprocess.Popen, signum: int = signal.SIGTERM) -> None:
    proc.send_signal(signum)
