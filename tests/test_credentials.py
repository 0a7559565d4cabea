"""Credentials that change while the job runs (DATABASE_PASSWORD_FILE, MIGRATE_PASSWORD_COMMAND,
MIGRATE_AUTH's cloud providers): every new connection is authenticated by a fresh one, on a real
server with password authentication and TLS, and none of them shows in any output."""

from __future__ import annotations

import re
import secrets
import shlex
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import ROOT, base_env, finish_logged, run_job, scenario, start_logged
from tests.events import wait_for_event
from tests.pgcluster import BIN, Cluster
from tests.tokens import RdsIamGateway, TokenEndpoint

pytestmark = pytest.mark.xdist_group("credentials")


@pytest.fixture(scope="module")
def server() -> Iterator[Cluster]:
    """Password authentication over TCP (scram), TLS offered, and every connection logged."""
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="migrate-job-pgcred-")), password_auth=True, ssl=True)
    cluster.start()
    cluster.psql("ALTER SYSTEM SET log_connections = on")
    cluster.psql("SELECT pg_reload_conf()")
    yield cluster
    cluster.destroy()


class Role:
    """A login role of its own and a database it owns; `rotate()` gives it a new password."""

    def __init__(self, server: Cluster) -> None:
        self.server = server
        self.name = f"r_{uuid.uuid4().hex[:10]}"
        self.database = f"d_{uuid.uuid4().hex[:10]}"
        self.passwords = [f"first-{secrets.token_hex(6)}"]
        server.psql(f"CREATE ROLE {self.name} LOGIN PASSWORD '{self.passwords[0]}'")
        server.psql(f'CREATE DATABASE "{self.database}" OWNER {self.name}')

    def rotate(self, password: str | None = None) -> str:
        password = password or f"rotated-{len(self.passwords)}-{secrets.token_hex(6)}"
        self.server.psql(f"ALTER ROLE {self.name} PASSWORD '{password}'")
        self.passwords.append(password)
        return password

    def url(self, port: int | None = None, query: str = "sslmode=require") -> str:
        return f"postgresql://{self.name}@127.0.0.1:{port or self.server.port}/{self.database}" + (
            f"?{query}" if query else "")

    def authorized(self) -> list[str]:
        """The connections the server authenticated as this role (log_connections)."""
        log = (self.server.directory / "server.log").read_text(errors="replace")
        return re.findall(rf"connection authorized: user={self.name} database={self.database}.*", log)

    def server_authorized_anywhere(self) -> list[str]:
        """The connections the server authenticated as this role, to any database."""
        log = (self.server.directory / "server.log").read_text(errors="replace")
        return re.findall(rf"connection authorized: user={self.name} .*", log)

    def query(self, sql: str) -> str:
        return self.server.psql(sql, database=self.database)


def _env(role: Role, tmp_path: Path, **extra: str) -> dict[str, str]:
    backups = tmp_path / "backups"
    backups.mkdir(exist_ok=True)
    return base_env(**{"DATABASE_URL": role.url(), "ALEMBIC_CONFIG": str(ROOT / "alembic.ini"),
                       "MIGRATE_BACKUP_DIR": str(backups), "MIGRATE_TERMINATION_LOG": str(tmp_path / "termination-log"),
                       "MIGRATE_WAIT_TIMEOUT": "10", "HOME": str(tmp_path), **extra})


def _shown(result, tmp_path: Path) -> str:
    """Everything the job wrote: stdout, stderr, the termination message."""
    termination = tmp_path / "termination-log"
    return result.stdout + result.stderr + (termination.read_text() if termination.exists() else "")


def _rotating_command(role: Role, tmp_path: Path) -> tuple[str, Path]:
    """A password command that, like a secret store issuing a new credential each time it is asked,
    makes a new password the role's before printing it: only the newest one works. Each call is
    counted in the file returned."""
    calls = tmp_path / "calls"
    script = tmp_path / "password-command"
    script.write_text(f"""#!/bin/sh
set -e
password="rotated-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \\n')"
PGPASSWORD=password {BIN}/psql -h 127.0.0.1 -p {role.server.port} -U postgres -d postgres -XAtqc \\
    "ALTER ROLE {role.name} PASSWORD '$password'" >/dev/null
echo "$password" >> {shlex.quote(str(calls))}
printf '%s\\n' "$password"
""")
    script.chmod(0o700)
    return str(script), calls


def test_every_connection_authenticates_with_the_password_of_that_moment(server: Cluster, tmp_path: Path) -> None:
    """The job's own session and pg_dump's (env.py runs on the job's session here; its own engines
    are the next test's): each asks the command again, and the command rotates the role's password
    every time it is asked. The backup and every revision succeed, each connection the server
    authenticated came from one ask, and no password is printed."""
    role = Role(server)
    command, calls = _rotating_command(role, tmp_path)
    env = _env(role, tmp_path, MIGRATE_PASSWORD_COMMAND=command, MIGRATE_PASSWORD_CACHE="0", MIGRATE_BACKUP="always")
    result = run_job("run", env=env)
    asked = len(calls.read_text().split())

    assert 0 == result.code, result.stdout + result.stderr
    assert result.event("backup.done")["bytes"] > 0  # pg_dump connected with its own fresh password
    assert role.query("SELECT count(*) FROM posts") == "0"  # migrated to head
    authorized = role.authorized()
    assert asked >= 2 and len(authorized) == asked, (asked, authorized)
    shown = _shown(result, tmp_path)
    assert not [p for p in role.passwords if p in shown]


@pytest.mark.parametrize("source", ["file", "command"])
def test_a_rotation_during_a_long_revision_reaches_the_connections_made_after_it(server: Cluster, tmp_path: Path,
                                                                                 source: str) -> None:
    """As a Secret is rotated while a revision runs (Kubernetes swaps the mounted file; a command
    then prints the new one): the revision's own new engines (sync, and async on asyncpg) and the job's watchdog, which connect
    after the old password stopped working, use the new one."""
    role = Role(server)
    secret_dir = tmp_path / "secret"
    secret_dir.mkdir()
    (secret_dir / "..data-1").mkdir()
    (secret_dir / "..data-1" / "password").write_text(role.passwords[0] + "\n")
    (secret_dir / "..data").symlink_to("..data-1")
    (secret_dir / "password").symlink_to("..data/password")
    rotate = tmp_path / "rotate"
    rotate.write_text(f"""#!/bin/sh
set -e
PGPASSWORD=password {BIN}/psql -h 127.0.0.1 -p {server.port} -U postgres -d postgres -XAtqc \\
    "ALTER ROLE {role.name} PASSWORD 'after-the-rotation'" >/dev/null
cd {shlex.quote(str(secret_dir))} && mkdir ..data-2 && echo after-the-rotation > ..data-2/password
ln -s ..data-2 ..data-new && mv -T ..data-new ..data
""")
    rotate.chmod(0o700)
    password_file = str(secret_dir / "password")
    how = ({"DATABASE_PASSWORD_FILE": password_file} if source == "file" else
           {"MIGRATE_PASSWORD_COMMAND": f"cat {shlex.quote(password_file)}", "MIGRATE_PASSWORD_CACHE": "60"})
    env = _env(role, tmp_path, **how, ALEMBIC_CONFIG=scenario("rotating"), ROTATE_COMMAND=str(rotate),
               MIGRATE_PROGRESS_INTERVAL="1")
    result = run_job("run", env=env)

    assert 0 == result.code, result.stdout + result.stderr
    assert role.query("SELECT role, how FROM connected_as ORDER BY how") == (
        f"{role.name}|a new engine after the rotation\n{role.name}|an async engine after the rotation\n"
        f"{role.name}|the earlier engine after the rotation")
    assert result.events("migration.progress"), "the watchdog connected after the rotation"
    shown = _shown(result, tmp_path)
    assert role.passwords[0] not in shown and "after-the-rotation" not in shown


def test_a_rehearsal_authenticates_the_copy_and_its_dump_with_fresh_passwords(server: Cluster,
                                                                              tmp_path: Path) -> None:
    """The rehearsal's connections (the live database, the copy it creates, pg_dump and pg_restore
    between them, env.py on the copy) each ask the command: as many asks as connections. (The
    command does not rotate here: pg_dump and pg_restore start together, and a rotation for one
    would refuse the other.)"""
    role = Role(server)
    server.psql(f"ALTER ROLE {role.name} CREATEDB")
    calls = tmp_path / "calls"
    command = f"echo asked >> {shlex.quote(str(calls))}; echo {role.passwords[0]}"
    env = _env(role, tmp_path, MIGRATE_PASSWORD_COMMAND=command, MIGRATE_PASSWORD_CACHE="0")
    result = run_job("rehearse", env=env)
    asked = len(calls.read_text().split())

    assert 0 == result.code, result.stdout + result.stderr
    assert result.event("rehearsal.done")["revisions"] == 6
    assert role.query("SELECT count(*) FROM pg_tables WHERE tablename = 'posts'") == "0"  # the live one untouched
    assert asked >= 3 and len(role.server_authorized_anywhere()) == asked
    shown = _shown(result, tmp_path)
    assert not [p for p in role.passwords if p in shown]


def test_a_kept_password_rotated_before_pg_dump_starts_is_asked_for_again(server: Cluster, tmp_path: Path) -> None:
    """The command's answer is kept for 60 s; the job connects with it, waits for the migration lock,
    and meanwhile the Secret rotates. pg_dump, spawned with the kept password, is refused: the job
    forgets it, asks the command again (once), and the backup and the run succeed."""
    import psycopg2

    from job.config import lock_key_for
    from job.plan import VersionTable

    role = Role(server)
    secret = tmp_path / "password"
    secret.write_text(role.passwords[0] + "\n")
    asked = tmp_path / "asked"
    command = f"echo >> {shlex.quote(str(asked))}; cat {shlex.quote(str(secret))}"
    env = _env(role, tmp_path, MIGRATE_PASSWORD_COMMAND=command, MIGRATE_PASSWORD_CACHE="60", MIGRATE_BACKUP="always",
               MIGRATE_LOCK_TIMEOUT="60")
    holder = psycopg2.connect(host="127.0.0.1", port=server.port, user="postgres", password="password",
                              dbname=role.database)
    holder.autocommit = True
    out = tmp_path / "out"
    try:
        with holder.cursor() as cur:
            cur.execute("SELECT pg_advisory_lock(%s)", (lock_key_for(role.database, VersionTable()),))
        proc = start_logged(env, out)
        wait_for_event(out, "lock.waiting")
        rotated = role.rotate()
        secret.write_text(rotated + "\n")
    finally:
        holder.close()  # (the lock goes with the session)
    result = finish_logged(proc, out)

    assert 0 == result.code, result.stdout + result.stderr
    assert result.event("backup.done")["bytes"] > 0
    assert role.query("SELECT count(*) FROM posts") == "0"
    assert len(asked.read_text().splitlines()) == 2  # once at the start, once after pg_dump was refused
    shown = _shown(result, tmp_path)
    assert not [p for p in role.passwords if p in shown]


def test_a_password_command_that_fails_or_hangs_is_exit_3_naming_what_failed(server: Cluster,
                                                                              tmp_path: Path) -> None:
    role = Role(server)
    failing = "echo the-secret-it-printed; echo 'vault: permission denied for the-secret-it-printed' >&2; exit 7"
    failed = run_job("run", env=_env(role, tmp_path, MIGRATE_PASSWORD_COMMAND=failing))
    started = time.monotonic()
    hung = run_job("run", env=_env(role, tmp_path, MIGRATE_PASSWORD_COMMAND="sleep 60", MIGRATE_WAIT_TIMEOUT="2"))
    took = time.monotonic() - started
    silent = run_job("run", env=_env(role, tmp_path, MIGRATE_PASSWORD_COMMAND="true"))

    assert 3 == failed.code
    error = failed.event("run.failed")["error"]
    assert "MIGRATE_PASSWORD_COMMAND failed with exit 7: vault: permission denied for ***" in error
    assert "the-secret-it-printed" not in _shown(failed, tmp_path)
    assert 3 == hung.code and took < 15, (hung.stdout, took)
    assert "MIGRATE_PASSWORD_COMMAND gave no password within 2 s" in hung.event("run.failed")["error"]
    assert 3 == silent.code and "printed no password" in silent.event("run.failed")["error"]


def test_a_missing_password_file_is_exit_3_and_two_sources_are_exit_2(server: Cluster, tmp_path: Path) -> None:
    role = Role(server)
    missing = run_job("run", env=_env(role, tmp_path, DATABASE_PASSWORD_FILE=str(tmp_path / "absent")))
    (tmp_path / "pw").write_text("x\n")
    both = run_job("run", env=_env(role, tmp_path, DATABASE_PASSWORD_FILE=str(tmp_path / "pw"),
                                   MIGRATE_PASSWORD_COMMAND="echo x"))
    with_url = run_job("run", env={**_env(role, tmp_path, DATABASE_PASSWORD_FILE=str(tmp_path / "pw")),
                                   "DATABASE_URL": role.url().replace("@", ":inline@")})

    assert 3 == missing.code and "cannot read DATABASE_PASSWORD_FILE" in missing.event("run.failed")["error"]
    assert 2 == both.code and "both give the password" in both.event("run.failed")["error"]
    assert 2 == with_url.code and "a password in DATABASE_URL" in with_url.event("run.failed")["error"]


# --- cloud providers ------------------------------------------------------------------------

@pytest.fixture
def ca(server: Cluster) -> str:
    """The CA the server's certificate verifies against (it is self-signed: itself)."""
    return str(server.data / "server.crt")


@pytest.mark.parametrize("provider", ["azure-entra", "gcp-cloudsql"])
def test_an_oauth_token_is_the_password_of_every_connection_over_verified_tls(server: Cluster, tmp_path: Path,
                                                                               ca: str, provider: str) -> None:
    """azure-identity and google-auth ask their token endpoints (loopback stand-ins, as App Service's
    managed identity and GKE's metadata server are reached); each token is made the role's password
    when issued, so the server accepts a connection only with the newest. Tokens last 5 minutes,
    so none is kept: every connection asks again. sslmode defaults to verify-full."""
    role = Role(server)
    endpoint = TokenEndpoint(role.rotate, lifetime=300)
    where = ({"IDENTITY_ENDPOINT": f"http://{endpoint.address}/msi/token", "IDENTITY_HEADER": "identity-header"}
             if provider == "azure-entra" else
             {"GCE_METADATA_HOST": endpoint.address, "GCE_METADATA_IP": endpoint.address})
    env = {**_env(role, tmp_path, MIGRATE_AUTH=provider, MIGRATE_BACKUP="always", PGSSLROOTCERT=ca, **where),
           "DATABASE_URL": role.url(query="")}
    try:
        result = run_job("run", env=env)
    finally:
        endpoint.close()

    assert 0 == result.code, result.stdout + result.stderr
    assert result.event("backup.done")["bytes"] > 0
    assert role.query("SELECT count(*) FROM posts") == "0"
    # (the own session and pg_dump's: env.py runs on the own session here)
    assert len(endpoint.issued) >= 2 and len(role.authorized()) == len(endpoint.issued)
    shown = _shown(result, tmp_path)
    assert not [t for t in endpoint.issued if t in shown]


def test_a_cloud_provider_verifies_the_server_unless_told_otherwise(server: Cluster, tmp_path: Path,
                                                                   ca: str) -> None:
    """verify-full by default: no CA is exit 2 naming PGSSLROOTCERT; a CA the server's certificate
    does not verify against is refused by libpq (exit 3); the URL's sslmode wins."""
    role = Role(server)
    endpoint = TokenEndpoint(role.rotate, lifetime=300)
    other_ca = tmp_path / "other-ca.crt"
    import subprocess

    subprocess.run(["openssl", "req", "-new", "-x509", "-days", "1", "-nodes", "-subj", "/CN=someone-else",
                    "-newkey", "rsa:2048", "-keyout", str(tmp_path / "other.key"), "-out", str(other_ca)],
                   check=True, capture_output=True)
    where = {"GCE_METADATA_HOST": endpoint.address, "GCE_METADATA_IP": endpoint.address,
             "MIGRATE_AUTH": "gcp-cloudsql"}
    plain = {**_env(role, tmp_path, **where), "DATABASE_URL": role.url(query="")}
    try:
        no_ca = run_job("status", env=plain)
        wrong_ca = run_job("status", env={**plain, "PGSSLROOTCERT": str(other_ca)})
        told = run_job("status", env={**plain, "DATABASE_URL": role.url(query="sslmode=require")})
    finally:
        endpoint.close()

    assert 2 == no_ca.code and "PGSSLROOTCERT" in no_ca.failure
    assert 3 == wrong_ca.code and "certificate verify failed" in wrong_ca.failure
    assert 0 == told.code, told.stdout + told.stderr


@pytest.mark.parametrize("secret_key", ["the-right-secret", "a-wrong-secret"])
def test_an_aws_rds_iam_token_is_signed_for_every_connection(server: Cluster, tmp_path: Path, secret_key: str) -> None:
    """boto3 signs a token for the URL's host, port and user; a gateway that does what RDS does
    (checks the SigV4 signature, scope and expiry, then lets the session in) stands in front of the
    real server. Signed with the right secret, the job's sessions, pg_dump's and env.py's are
    admitted; with a wrong one, none is (exit 3)."""
    role = Role(server)
    hba = server.data / "pg_hba.conf"
    hba.write_text(f"host all {role.name} 127.0.0.1/32 password\n" + hba.read_text())
    server.psql("SELECT pg_reload_conf()")
    gateway = RdsIamGateway(server.port, role.name, role.passwords[0], "AKIDTEST", "the-right-secret")
    env = {**_env(role, tmp_path, MIGRATE_AUTH="aws-rds-iam", MIGRATE_BACKUP="always", AWS_ACCESS_KEY_ID="AKIDTEST",
                  AWS_SECRET_ACCESS_KEY=secret_key, AWS_REGION="eu-west-1", AWS_EC2_METADATA_DISABLED="true"),
           "DATABASE_URL": role.url(port=gateway.port, query="sslmode=disable")}
    try:
        result = run_job("run", env=env)
    finally:
        gateway.close()

    shown = _shown(result, tmp_path)
    assert not [t for t in gateway.accepted if t in shown] and secret_key not in shown
    if secret_key == "a-wrong-secret":
        # (signed once more after the first refusal, as a token expired since it was kept would be; then it stops)
        assert 3 == result.code and gateway.refused == ["bad signature"] * 2 and not gateway.accepted
        assert "password authentication failed" in result.event("run.failed")["error"]
        return
    assert 0 == result.code, result.stdout + result.stderr
    assert result.event("backup.done")["bytes"] > 0
    assert len(gateway.accepted) >= 2 and not gateway.refused
    assert len(set(gateway.accepted)) >= 1 and all(t.startswith(f"127.0.0.1:{gateway.port}/?Action=connect")
                                                   for t in gateway.accepted)


def test_a_provider_whose_library_is_missing_is_exit_2_naming_the_extra(server: Cluster, tmp_path: Path) -> None:
    role = Role(server)
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    # (a `google` package that is not google-auth: as if the extra were not installed)
    (blocked / "google").mkdir()
    (blocked / "google" / "__init__.py").write_text("")
    env = {**_env(role, tmp_path, MIGRATE_AUTH="gcp-cloudsql", PYTHONPATH=str(blocked)),
           "DATABASE_URL": role.url(query="sslmode=require")}
    result = run_job("status", env=env)

    assert 2 == result.code
    assert "pip install 'migrate-job[gcp]'" in result.failure
