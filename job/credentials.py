"""Where passwords come from, when they change while the job runs.

A password in DATABASE_URL (or PGPASSWORD) is read once. Clusters increasingly issue credentials
that do not last: a Secret rotated under a mounted file (Vault agent, the cloud's secret manager),
a command that prints a fresh one, or a cloud provider's IAM token (AWS RDS: a signed token valid
15 minutes; Azure Entra ID and Google Cloud SQL: OAuth access tokens valid about an hour). A run
longer than that, or one whose Secret rotates while it migrates, must authenticate every new
connection with what is valid now.

So a source is asked afresh for every connection that carries no password of its own, wherever
it is opened: the job's own sessions (`job.db`), every engine env.py builds (`job.sessions`,
through SQLAlchemy's `do_connect`), and pg_dump / pg_restore / psql at each spawn (PGPASSWORD in
their environment, never their arguments). As PGPASSWORD does for libpq: it is the password of
any connection that names none. Every password a source gives is registered with the log
redactor before it is used, so no output can show it.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import threading
import time
from typing import Any, Callable, Mapping, TypeVar

from job.errors import ConfigError, DatabaseUnavailable, first_line

T = TypeVar("T")

# MIGRATE_AUTH's values: `password` is the URL's, PGPASSWORD's, DATABASE_PASSWORD_FILE's or
# MIGRATE_PASSWORD_COMMAND's; the others are a cloud provider's IAM token
PROVIDERS = ("password", "aws-rds-iam", "azure-entra", "gcp-cloudsql")
CLOUD = PROVIDERS[1:]
# the extra that installs each provider's library (imported only when chosen)
EXTRAS = {"aws-rds-iam": ("boto3", "migrate-job[aws]"), "azure-entra": ("azure.identity", "migrate-job[azure]"),
          "gcp-cloudsql": ("google.auth", "migrate-job[gcp]")}

# OAuth scopes of the database services: Azure Database for PostgreSQL, Cloud SQL's IAM login
AZURE_SCOPE = "https://ossrdbms-aad.database.windows.net/.default"
GCP_SCOPE = "https://www.googleapis.com/auth/sqlservice.login"
# a token is renewed this long before it expires: a connection made with it must still be accepted
RENEW_BEFORE = 300.0


class Source:
    """Gives the password of one new connection; `params` are its libpq parameters (host, port,
    user), which an IAM token is signed for."""

    def password(self, params: Mapping[str, str]) -> str:
        raise NotImplementedError

    def forget(self) -> None:
        """The server refused what was given: the next connection asks again, whatever was cached."""


class PasswordFile(Source):
    """DATABASE_PASSWORD_FILE: read for every connection, so a rotated Secret (Kubernetes swaps the
    mounted file) is seen by the next one. One trailing newline is not part of the password."""

    def __init__(self, path: str) -> None:
        self.path = path

    def password(self, params: Mapping[str, str]) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise DatabaseUnavailable(f"cannot read DATABASE_PASSWORD_FILE {self.path!r}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise DatabaseUnavailable(f"DATABASE_PASSWORD_FILE {self.path!r} is not UTF-8 text") from None
        text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
        if not text:
            raise DatabaseUnavailable(f"DATABASE_PASSWORD_FILE {self.path!r} is empty")
        return text


class Cached(Source):
    """A source whose answers are kept for a while (a command's, a provider's token): thread-safe,
    as the watchdog connects beside the main thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: dict[tuple[str, ...], tuple[str, float]] = {}

    def password(self, params: Mapping[str, str]) -> str:
        key = self.key(params)
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and time.monotonic() < kept[1]:
                return kept[0]
            password, lasts = self.fetch(params)
            if lasts > 0:
                self._kept[key] = (password, time.monotonic() + lasts)
            return password

    def forget(self) -> None:
        with self._lock:
            self._kept.clear()

    def key(self, params: Mapping[str, str]) -> tuple[str, ...]:
        return ()

    def fetch(self, params: Mapping[str, str]) -> tuple[str, float]:
        """A fresh password, and for how many seconds it may be given again."""
        raise NotImplementedError


class PasswordCommand(Cached):
    """MIGRATE_PASSWORD_COMMAND: a shell command whose standard output is the password (`vault kv
    get -field=password ...`, a cloud CLI), kept for MIGRATE_PASSWORD_CACHE seconds. A command that
    fails, prints nothing or outlasts the wait timeout is exit 3, with what it said."""

    def __init__(self, command: str, keep: float, timeout: float) -> None:
        super().__init__()
        self.command, self.keep, self.timeout = command, keep, timeout

    def fetch(self, params: Mapping[str, str]) -> tuple[str, float]:
        try:
            done = subprocess.run(["/bin/sh", "-c", self.command], stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.timeout or None)
        except subprocess.TimeoutExpired:
            raise DatabaseUnavailable(f"MIGRATE_PASSWORD_COMMAND gave no password within {self.timeout:g} s "
                                      "(MIGRATE_WAIT_TIMEOUT)") from None
        except OSError as e:
            raise DatabaseUnavailable(f"MIGRATE_PASSWORD_COMMAND cannot be run: {e.strerror}") from None
        output = done.stdout.decode("utf-8", "replace")
        password = output[:-1] if output.endswith("\n") else output
        if done.returncode != 0:
            _reveal(password)  # (a failing command may still have printed a secret: masked wherever it shows)
            said = first_line(done.stderr.decode("utf-8", "replace").strip()) or "nothing on stderr"
            raise DatabaseUnavailable(f"MIGRATE_PASSWORD_COMMAND failed with exit {done.returncode}: {said}")
        if not password.strip():
            raise DatabaseUnavailable("MIGRATE_PASSWORD_COMMAND printed no password")
        return password, self.keep


class AwsRdsIam(Cached):
    """AWS RDS / Aurora IAM authentication: a token signed with the pod's AWS credentials (IRSA's
    web identity, EKS Pod Identity, instance roles: wherever boto3 finds them) for the URL's host,
    port and user, in the host's region (`*.REGION.rds.amazonaws.com`) or boto3's. Signing is
    local; a token is valid 15 minutes, and a new one is signed after 10."""

    def __init__(self) -> None:
        super().__init__()
        import boto3

        self._session = boto3.session.Session()
        self._clients: dict[str, Any] = {}

    def key(self, params: Mapping[str, str]) -> tuple[str, ...]:
        return _host_port_user(params, "aws-rds-iam")

    def fetch(self, params: Mapping[str, str]) -> tuple[str, float]:
        import botocore.exceptions

        host, port, user = self.key(params)
        # (boto3 reads AWS_DEFAULT_REGION; AWS_REGION is what EKS and the other SDKs set)
        region = _rds_region(host) or self._session.region_name or os.environ.get("AWS_REGION")
        if not region:
            raise ConfigError(f"MIGRATE_AUTH=aws-rds-iam: no AWS region for {host!r}: the host is not "
                              "*.REGION.rds.amazonaws.com; set AWS_REGION")
        if region not in self._clients:
            self._clients[region] = self._session.client("rds", region_name=region)
        try:
            token = self._clients[region].generate_db_auth_token(DBHostname=host, Port=int(port), DBUsername=user,
                                                                 Region=region)
        except botocore.exceptions.BotoCoreError as e:  # (no credentials found, among others)
            raise DatabaseUnavailable(f"MIGRATE_AUTH=aws-rds-iam: no token: {first_line(e)}") from None
        return token, 900 - RENEW_BEFORE


class AzureEntra(Cached):
    """Azure Database for PostgreSQL with Microsoft Entra ID: an access token for the database
    service from azure-identity's DefaultAzureCredential (workload identity on AKS, managed
    identity, the environment's service principal), renewed 5 minutes before it expires."""

    def __init__(self) -> None:
        super().__init__()
        from azure.identity import DefaultAzureCredential

        self._credential = DefaultAzureCredential()

    def fetch(self, params: Mapping[str, str]) -> tuple[str, float]:
        from azure.core.exceptions import AzureError

        try:
            token = self._credential.get_token(AZURE_SCOPE)
        except AzureError as e:  # (every credential of the chain failed, among others)
            raise DatabaseUnavailable(f"MIGRATE_AUTH=azure-entra: no token: {first_line(e)}") from None
        return token.token, token.expires_on - time.time() - RENEW_BEFORE


class GcpCloudSql(Cached):
    """Google Cloud SQL IAM database authentication: an OAuth access token of the application
    default credentials (GKE workload identity's metadata server, a service account key), renewed
    5 minutes before it expires. The URL's user is the IAM user (`sa@project.iam`)."""

    def __init__(self) -> None:
        super().__init__()
        self._credentials: Any = None

    def fetch(self, params: Mapping[str, str]) -> tuple[str, float]:
        import google.auth
        import google.auth.exceptions
        import google.auth.transport.requests

        try:
            if self._credentials is None:
                self._credentials, _ = google.auth.default(scopes=[GCP_SCOPE])
            self._credentials.refresh(google.auth.transport.requests.Request())
        except google.auth.exceptions.GoogleAuthError as e:  # (no credentials found, among others)
            raise DatabaseUnavailable(f"MIGRATE_AUTH=gcp-cloudsql: no token: {first_line(e)}") from None
        expiry = self._credentials.expiry  # naive UTC, as google-auth keeps it
        lasts = (expiry.replace(tzinfo=dt.timezone.utc).timestamp() - time.time() - RENEW_BEFORE) if expiry else 0.0
        return self._credentials.token, lasts


def _host_port_user(params: Mapping[str, str], provider: str) -> tuple[str, str, str]:
    host = params.get("host") or os.environ.get("PGHOST", "")
    user = params.get("user") or os.environ.get("PGUSER", "")
    if not host or host.startswith("/") or "," in host:
        raise ConfigError(f"MIGRATE_AUTH={provider} needs one TCP host in the URL, not {host or 'none'!r}")
    if not user:
        raise ConfigError(f"MIGRATE_AUTH={provider} needs the database user in the URL")
    return host, (params.get("port") or os.environ.get("PGPORT") or "5432"), user


def _rds_region(host: str) -> str | None:
    parts = host.lower().split(".")
    if len(parts) >= 5 and parts[-2:] == ["amazonaws", "com"] and parts[-3] == "rds":
        return parts[-4]
    return None


_PROVIDERS: dict[str, Callable[[], Source]] = {
    "aws-rds-iam": AwsRdsIam, "azure-entra": AzureEntra, "gcp-cloudsql": GcpCloudSql}


def chosen(auth: str, file: str | None, command: str | None, keep: float, timeout: float,
           static: bool) -> Source | None:
    """The source the settings name (None: the URL's or PGPASSWORD's password, read once). One
    source at most: two would leave which password a connection gets to chance. `static`: the URL
    or PGPASSWORD has a password."""
    named = [name for name, given in (("DATABASE_PASSWORD_FILE", file), ("MIGRATE_PASSWORD_COMMAND", command),
                                      (f"MIGRATE_AUTH={auth}", auth != "password"),
                                      ("a password in DATABASE_URL or PGPASSWORD", static)) if given]
    if len(named) > 1:
        raise ConfigError(f"{' and '.join(named)} both give the password: keep one")
    if file:
        return PasswordFile(file)
    if command:
        return PasswordCommand(command, keep, timeout)
    if auth == "password":
        return None
    module, extra = EXTRAS[auth]
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # (a dotted name whose package is missing)
        found = False
    if not found:
        raise ConfigError(f"MIGRATE_AUTH={auth} needs {module.split('.')[0]}: pip install '{extra}'")
    return _PROVIDERS[auth]()


# TLS as the cloud providers require it: their servers present a certificate of the provider's CA,
# and a token sent to anything else is a credential given away
CLOUD_SSLMODE = "verify-full"


def cloud_tls(params: Mapping[str, str], env: Mapping[str, str]) -> dict[str, str]:
    """The connection parameters for a cloud provider: sslmode verify-full unless the URL says
    otherwise, and a CA to verify with (sslrootcert, PGSSLROOTCERT, or libpq's ~/.postgresql/root.crt)."""
    params = {"sslmode": env.get("PGSSLMODE") or CLOUD_SSLMODE, **params}
    if params["sslmode"] not in ("verify-ca", "verify-full"):
        return params
    root = params.get("sslrootcert") or env.get("PGSSLROOTCERT") or os.path.expanduser("~/.postgresql/root.crt")
    if root != "system" and not os.path.isfile(root):
        raise ConfigError(
            f"sslmode={params['sslmode']} needs the server's CA certificate, and {root!r} does not exist: set "
            "PGSSLROOTCERT (or the URL's sslrootcert) to the provider's CA bundle (the chart's tls.caConfigMap "
            "mounts one)")
    return params


# the source of this process's connections, set once the settings are loaded (job.cli), and what
# each password it gives is shown to first (the log redactor)
_source: list[Source] = []
_secret_keepers: list[Callable[[list[str]], None]] = []


def _reveal(password: str) -> None:
    for keep in _secret_keepers:
        keep([password])


def install(source: Source | None, keep_secret: Callable[[list[str]], None]) -> None:
    """Use `source` for every connection of this process that names no password: the job's own,
    and, through SQLAlchemy's do_connect on every Engine (async ones' sync engines included), each
    that env.py opens, whatever URL or engine it builds."""
    _source[:] = [source] if source is not None else []
    _secret_keepers[:] = [keep_secret]
    if source is not None and not _listening:
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        event.listen(Engine, "do_connect", _engine_connects)
        _listening.append(True)


_listening: list[bool] = []


def _engine_connects(dialect: Any, _record: Any, cargs: Any, cparams: dict[str, Any]) -> Any:
    """An engine env.py built is about to connect: every driver (psycopg2, psycopg, asyncpg) takes
    `password` beside the host, port and user it is signed for."""
    if not _source or cparams.get("password") not in (None, ""):
        return None
    params = {k: str(cparams[k]) for k in ("host", "port", "user") if cparams.get(k)}
    return connected(lambda: dialect.connect(*cargs, **{**cparams, "password": password_for(params)}))


def connected(connect: Callable[[], T]) -> T:
    """`connect()`, which asks the source for its password; when the server refuses a kept one
    (rotated since it was kept: `stale`), once more with a fresh one. The one retry of every
    connection this process makes itself (job.db) or env.py's engines make."""
    try:
        return connect()
    except Exception as e:
        if not stale(e):
            raise
    return connect()


def password_for(params: Mapping[str, str]) -> str | None:
    """A fresh password for a new connection with these parameters; None when no source is set
    (the URL's or PGPASSWORD's is used). Registered with the redactor before anyone sees it."""
    if not _source:
        return None
    password = _source[0].password(params)
    _reveal(password)
    return password


def completed(kwargs: Mapping[str, str]) -> dict[str, str]:
    """psycopg2.connect() keywords with the password filled in, when they carry none."""
    if "password" in kwargs or not _source:
        return dict(kwargs)
    return {**kwargs, "password": password_for(kwargs) or ""}


def stale(error: Exception | str) -> bool:
    """Whether `error` (an exception, or what a child like pg_dump printed) is the server refusing
    a password a source kept (a command's output, a token) that has since been rotated: then it is
    forgotten, and asking again may succeed."""
    if not _source or not isinstance(_source[0], Cached):
        return False
    message = str(error).lower()
    if "password authentication failed" not in message and "pam authentication failed" not in message:
        return False
    _source[0].forget()
    return True
