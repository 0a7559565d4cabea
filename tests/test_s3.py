"""Backups in an S3-compatible bucket (MIGRATE_BACKUP_DIR=s3://bucket/prefix), against moto's
standalone server on loopback, reached over HTTP as AWS would be."""

from __future__ import annotations

import hashlib
import json
import signal
import time
import uuid
from typing import Any, Iterator

import pytest

from tests.conftest import ZSTD_MAGIC, Db, custom_archive, finish, run_job, start_job
from tests.s3server import SECRET_KEY, Server
from tests.tcpproxy import Proxy

# every test of this file on one worker: they share one server
pytestmark = pytest.mark.xdist_group("s3")
HEAD = "0006"


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    started = Server()
    yield started
    started.stop()


@pytest.fixture
def bucket(server: Server) -> str:
    name = f"backups-{uuid.uuid4().hex[:10]}"
    server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture
def s3_env(env: dict[str, str], server: Server, bucket: str) -> dict[str, str]:
    """Only the bucket and credentials configured: no backup directory."""
    return {**env, **server.env(), "MIGRATE_BACKUP_DIR": f"s3://{bucket}/team/app"}


def objects(server: Server, bucket: str) -> dict[str, str]:
    """Every object in the bucket, by key, with its ETag."""
    listed = server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {item["Key"]: item["ETag"] for item in listed}


def uploads(server: Server, bucket: str) -> list[str]:
    """The keys of the bucket's unfinished multipart uploads."""
    return [u["Key"] for u in server.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def with_rows(db: Db, env: dict[str, str], count: int = 20) -> None:
    """The database at 0004 with `count` users (so that the run to head backs it up first)."""
    assert 0 == run_job("run", env={**env, "MIGRATE_TARGET": "0004"}).code
    db.query("INSERT INTO users (email, first_name, last_name) "
             "SELECT 'u' || g || '@example.org', md5(g::text), md5((g * 3)::text) FROM generate_series(1, %s) g",
             (count,))


def big(db: Db, env: dict[str, str]) -> None:
    """Enough data that a dump takes a few seconds (several parts): something to interrupt."""
    with_rows(db, env)
    db.query("CREATE TABLE filler AS SELECT g AS id, md5(g::text) || md5((g * 7)::text) AS a, "
             "md5(random()::text) AS b FROM generate_series(1, 600000) g")


def upload_started(server: Server, bucket: str, proc: Any, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not uploads(server, bucket):
        assert proc.poll() is None and time.monotonic() < deadline, "no upload started"
        time.sleep(0.02)


# --- what works ------------------------------------------------------------------------------

def test_run_backs_up_to_the_bucket_before_migrating(db: Db, s3_env: dict[str, str], server: Server,
                                                     bucket: str) -> None:
    """With only s3:// and credentials set, run uploads a verified backup and its sidecar, then migrates."""
    with_rows(db, s3_env)
    result = run_job("run", env=s3_env)

    assert 0 == result.code, result.stdout
    done = result.event("backup.done")
    assert result.names.index("backup.done") < result.names.index("migration.start")
    key = done["path"].removeprefix(f"s3://{bucket}/")
    assert {key, f"{key}.json"} == set(objects(server, bucket))
    stored = server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    sidecar = json.loads(server.client().get_object(Bucket=bucket, Key=f"{key}.json")["Body"].read())
    assert hashlib.sha256(stored).hexdigest() == sidecar["sha256"] == done["sha256"]
    assert len(stored) == sidecar["bytes"] == done["bytes"]
    assert (db.name, ["0004"], [HEAD]) == (sidecar["database"], sidecar["from_revision"], sidecar["to_revision"])
    assert key.startswith("team/app/2") and stored.startswith(ZSTD_MAGIC) and "zstd:1" == sidecar["compression"]
    assert custom_archive(stored).startswith(b"PGDMP")
    assert [] == uploads(server, bucket)


def test_list_and_status_read_the_bucket(db: Db, s3_env: dict[str, str], bucket: str) -> None:
    """backup --list and status show the bucket's backups, newest first, by their s3:// path."""
    db.holds_data()
    first = run_job("run", env=s3_env).event("backup.done")["path"]
    second = run_job("backup", env=s3_env).event("backup.done")["path"]

    listed = json.loads(run_job("backup", "--list", "--format", "json", env=s3_env).stdout)
    status = json.loads(run_job("status", "--format", "json", env=s3_env).stdout)

    assert [second, first] == [b["path"] for b in listed]
    assert [second, first] == [b["path"] for b in status["backups"]]


def test_restore_from_the_bucket_brings_the_data_back(db: Db, s3_env: dict[str, str]) -> None:
    """restore NAME --yes streams the backup from the bucket into the database, under the lock."""
    with_rows(db, s3_env)
    path = run_job("run", env=s3_env).event("backup.done")["path"]
    db.query("DELETE FROM users")

    result = run_job("restore", path.rsplit("/", 1)[1], "--yes", env=s3_env)

    assert 0 == result.code, result.stdout
    assert [(20,)] == db.query("SELECT count(*) FROM users")
    assert ["0004"] == db.version()


def test_a_damaged_object_in_the_bucket_is_not_restored(db: Db, s3_env: dict[str, str], server: Server,
                                                        bucket: str) -> None:
    """An object whose bytes no longer match its sidecar's sha256 exits 5 and leaves the database unchanged."""
    with_rows(db, s3_env)
    path = run_job("run", env=s3_env).event("backup.done")["path"]
    key = path.removeprefix(f"s3://{bucket}/")
    data = bytearray(server.client().get_object(Bucket=bucket, Key=key)["Body"].read())
    data[-100] ^= 0xFF
    server.client().put_object(Bucket=bucket, Key=key, Body=bytes(data))
    db.query("INSERT INTO users (email, full_name) VALUES ('kept@example.org', 'Kept')")

    result = run_job("restore", path, "--yes", env=s3_env)

    assert 5 == result.code
    assert "sha256" in result.event("run.failed")["error"]
    assert [(21,)] == db.query("SELECT count(*) FROM users")


def test_retention_in_the_bucket_keeps_the_newest(db: Db, s3_env: dict[str, str], server: Server,
                                                  bucket: str) -> None:
    """MIGRATE_BACKUP_KEEP applies to the bucket as to a directory: older backups and their sidecars go."""
    db.holds_data()
    keep = {**s3_env, "MIGRATE_BACKUP_KEEP": "2"}
    run_job("run", env=keep)
    paths = [run_job("backup", env=keep).event("backup.done")["path"] for _ in range(3)]

    kept = {k.rsplit("/", 1)[1] for k in objects(server, bucket)}

    assert {p.rsplit("/", 1)[1] + suffix for p in paths[1:] for suffix in ("", ".json")} == kept


def test_the_secret_key_appears_nowhere(db: Db, s3_env: dict[str, str], tmp_path: Any) -> None:
    """The secret access key is never printed, even at debug level and in a failure."""
    db.holds_data()
    ok = run_job("run", env={**s3_env, "MIGRATE_LOG_LEVEL": "debug"})
    failed = run_job("backup", env={**s3_env, "MIGRATE_BACKUP_DIR": "s3://no-such-bucket-here/x"})

    assert (0, 5) == (ok.code, failed.code)
    for text in (ok.stdout, ok.stderr, failed.stdout, failed.stderr, (tmp_path / "termination-log").read_text()):
        assert SECRET_KEY not in text


# --- what fails: exit 5 before any migration, nothing under a final name ------------------------

def test_a_missing_bucket_exits_5_before_migrating(db: Db, s3_env: dict[str, str]) -> None:
    """A bucket that does not exist: exit 5, named, nothing migrated."""
    with_rows(db, s3_env)
    result = run_job("run", env={**s3_env, "MIGRATE_BACKUP_DIR": "s3://no-such-bucket-here/app"})

    assert 5 == result.code
    assert "no-such-bucket-here" in result.event("run.failed")["error"]
    assert "does not exist" in result.event("run.failed")["error"]
    assert ["0004"] == db.version()


def test_access_denied_by_policy_exits_5_and_writes_nothing(db: Db, env: dict[str, str]) -> None:
    """Credentials whose policy allows reading only: exit 5 naming the refusal, nothing migrated or stored."""
    locked = Server(no_auth_actions=4)
    try:
        locked.client().create_bucket(Bucket="locked")
        key, secret = locked.read_only_user("locked")
        with_rows(db, env)
        job_env = {**env, **locked.env(), "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                   "MIGRATE_BACKUP_DIR": "s3://locked/app"}

        result = run_job("run", env=job_env)

        assert 5 == result.code, result.stdout
        assert "AccessDenied" in result.event("run.failed")["error"]
        assert ["0004"] == db.version()
        assert secret not in result.stdout
        reader = locked.client(key=key, secret=secret)
        assert 0 == reader.list_objects_v2(Bucket="locked").get("KeyCount", 0)
    finally:
        locked.stop()


def test_an_unreachable_endpoint_exits_5_before_migrating(db: Db, s3_env: dict[str, str]) -> None:
    """Nothing listens at AWS_ENDPOINT_URL: exit 5, nothing migrated."""
    from tests.pgcluster import free_port

    with_rows(db, s3_env)
    result = run_job("run", env={**s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"})

    assert 5 == result.code
    assert "endpoint" in result.event("run.failed")["error"]
    assert ["0004"] == db.version()


def test_a_connection_dropped_mid_upload_exits_5_and_the_next_run_clears_it(db: Db, s3_env: dict[str, str],
                                                                             server: Server, bucket: str) -> None:
    """The endpoint goes away mid-upload: exit 5, nothing migrated, no object under a final name,
    older backups intact; the next run aborts the upload left behind and goes on."""
    big(db, s3_env)
    older = run_job("backup", env=s3_env)
    assert 0 == older.code
    before = objects(server, bucket)
    relay = Proxy(server.port)
    proc = start_job("run", env={**s3_env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"})
    upload_started(server, bucket, proc)
    relay.close()
    result = finish(proc)

    assert 5 == result.code, result.stdout
    assert ["0004"] == db.version()
    assert before == objects(server, bucket)
    assert 1 == len(uploads(server, bucket))  # the abort could not reach the bucket either

    again = run_job("run", env=s3_env)
    assert 0 == again.code
    assert "backup.partial_removed" in again.names
    assert [] == uploads(server, bucket)
    assert [HEAD] == db.version()


def test_sigterm_mid_upload_exits_143_and_aborts_the_upload(db: Db, s3_env: dict[str, str], server: Server,
                                                            bucket: str) -> None:
    """SIGTERM while parts are being sent: exit 143, the upload aborted, older backups intact, nothing migrated."""
    big(db, s3_env)
    assert 0 == run_job("backup", env=s3_env).code
    before = objects(server, bucket)
    proc = start_job("run", env=s3_env)
    upload_started(server, bucket, proc)
    proc.send_signal(signal.SIGTERM)
    result = finish(proc, timeout=30)

    assert 143 == result.code, result.stdout
    assert ["0004"] == db.version()
    assert before == objects(server, bucket)
    assert [] == uploads(server, bucket)
    assert 0 == db.advisory_locks()


def test_the_server_stopped_mid_upload_exits_5(db: Db, s3_env: dict[str, str]) -> None:
    """The S3 server itself stops mid-upload: exit 5 with the endpoint named, nothing migrated."""
    doomed = Server()
    try:
        doomed.client().create_bucket(Bucket="doomed")
        big(db, s3_env)
        proc = start_job("run", env={**s3_env, **doomed.env(), "MIGRATE_BACKUP_DIR": "s3://doomed/app"})
        upload_started(doomed, "doomed", proc)
        doomed.stop()
        result = finish(proc)
    finally:
        doomed.stop()

    assert 5 == result.code, result.stdout
    assert "endpoint" in result.event("run.failed")["error"]
    assert ["0004"] == db.version()


def test_a_sigkilled_job_leaves_no_pg_dump_behind_mid_upload(db: Db, s3_env: dict[str, str], server: Server,
                                                             bucket: str) -> None:
    """SIGKILL while parts stream to the bucket: pg_dump dies with the job (no share locks left on the
    tables), and the next run aborts the upload it left and migrates."""
    big(db, s3_env)
    proc = start_job("run", env=s3_env)
    upload_started(server, bucket, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    deadline = time.monotonic() + 10
    while db.query("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name LIKE "
                   "'migrate-job/%%'", (db.name,))[0][0]:
        assert time.monotonic() < deadline, "a session of the job's (pg_dump's) is still there"
        time.sleep(0.1)
    rerun = run_job("run", env=s3_env)
    assert (0, [HEAD], []) == (rerun.code, db.version(), uploads(server, bucket)), rerun.stdout[-1500:]
