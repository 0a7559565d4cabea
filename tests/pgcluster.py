"""A throwaway PostgreSQL cluster in a folder: for `make migrate` and for tests that stop, restart or
delay a server.

PostgreSQL refuses to run as root, so as root the server runs as an unprivileged user (`postgres`
where it exists, else `nobody`) through `runuser`; as a normal user it runs as that user.

    python -m tests.pgcluster up .local/pg      # prints the DATABASE_URL of its `blog` database
    python -m tests.pgcluster down .local/pg
"""

from __future__ import annotations

import argparse
import fcntl
import os
import pwd
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


# Ports for the servers the tests start. A port the kernel hands out for a bind to port 0 can be
# handed out again, to another worker's server or as the local end of any outgoing connection,
# before the server that asked for it binds it. So ports come from below the kernel's ephemeral
# range, each claimed by an exclusive lock on a file of its own that the claiming process holds
# until it exits: no other worker, and no other test run on this machine, is given it meanwhile.
PORTS = Path(tempfile.gettempdir()) / "migrate-job-test-ports"
_claimed: list[int] = []  # the claims' file descriptors, held for the life of the process


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port that nothing listens on, that the kernel will not hand out, and that no
    other process of the tests is given."""
    low, high = 20000, min(_ephemeral_start(), 65536)
    if high - low < 1000:  # an unusual ephemeral range: above it instead
        low, high = 61000, 65536
    if not PORTS.is_dir():
        PORTS.mkdir(exist_ok=True)
        PORTS.chmod(0o1777)  # (any user's test run claims its ports here)
    for port in random.sample(range(low, high), high - low):
        try:
            fd = os.open(PORTS / str(port), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # another user's claim
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # another process has it
            os.close(fd)
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:  # something outside the tests listens there
                os.close(fd)
                continue
        _claimed.append(fd)
        return port
    raise RuntimeError(f"no free port between {low} and {high}")


def server_user() -> str | None:
    """The user the server runs as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) to run PostgreSQL as")


class Cluster:
    """One data directory, one port, a superuser `postgres` (password `password` over TCP)."""

    def __init__(self, directory: Path, port: int | None = None, password_auth: bool = False,
                 ssl: bool = False, max_connections: int = 200) -> None:
        self.directory = Path(directory).resolve()
        self.data = self.directory / "data"
        self.port_file = self.directory / "port"
        if port is None and self.port_file.exists():
            port = int(self.port_file.read_text())
        self.port = port or free_port()
        self.password_auth = password_auth
        self.ssl = ssl
        self.max_connections = max_connections
        self.user = server_user()

    def url(self, database: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def _as_server_user(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        if self.user is not None:
            argv = ["runuser", "-u", self.user, "--", *argv]
        return subprocess.run(argv, check=True, capture_output=True, text=True, **kw)

    def init(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if (self.data / "PG_VERSION").exists():
            return
        if self.user is not None:
            # the server user needs its folder, and to reach it (every parent must be searchable)
            shutil.chown(self.directory, self.user)
        auth = ["--auth-local=trust", "--auth-host=scram-sha-256"] if self.password_auth else ["--auth=trust"]
        pwfile = self.directory / "pwfile"
        pwfile.write_text("password\n")
        if self.user is not None:
            shutil.chown(pwfile, self.user)
        self._as_server_user(
            [str(BIN / "initdb"), "-D", str(self.data), "-U", "postgres", f"--pwfile={pwfile}", "-E", "UTF8",
             "--locale=C.UTF-8", *auth]
        )
        pwfile.unlink()
        if self.ssl:
            self._self_signed_certificate()

    def _self_signed_certificate(self) -> None:
        """server.crt and server.key in the data directory, for ssl=on."""
        crt, key = self.data / "server.crt", self.data / "server.key"
        subprocess.run(
            ["openssl", "req", "-new", "-x509", "-days", "2", "-nodes", "-subj", "/CN=127.0.0.1",
             "-newkey", "rsa:2048", "-keyout", str(key), "-out", str(crt)],
            check=True, capture_output=True,
        )
        key.chmod(0o600)
        if self.user is not None:
            shutil.chown(crt, self.user)
            shutil.chown(key, self.user)

    def replicate(self, primary: "Cluster") -> None:
        """Make this (not yet made) cluster a hot standby of `primary`, streaming from it."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.user is not None:
            shutil.chown(self.directory, self.user)
        self._as_server_user([str(BIN / "pg_basebackup"), "-D", str(self.data), "-R", "-X", "stream", "--checkpoint=fast",
                              "-h", "127.0.0.1", "-p", str(primary.port), "-U", "postgres"])

    def start(self, wait: bool = True) -> None:
        self.init()
        self.port_file.write_text(str(self.port))
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.directory} "
            f"-c fsync=off -c full_page_writes=off -c max_connections={self.max_connections}"
            + (" -c ssl=on" if self.ssl else "")
        )
        argv = [str(BIN / "pg_ctl"), "-D", str(self.data), "-l", str(self.directory / "server.log"), "-o", options]
        argv += ["-w", "start"] if wait else ["-W", "start"]
        self._as_server_user(argv)

    def stop(self, mode: str = "fast") -> None:
        if (self.data / "postmaster.pid").exists():
            self._as_server_user([str(BIN / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"])

    def restart(self) -> None:
        self.stop(mode="immediate")
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if subprocess.run([str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                              capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise TimeoutError(f"cluster on port {self.port} not ready")

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(BIN / "psql"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", database,
             "-XAtqc", sql],
            check=True, capture_output=True, text=True, env={**os.environ, "PGPASSWORD": "password"},
        )
        return result.stdout.strip()

    def destroy(self) -> None:
        try:
            self.stop(mode="immediate")
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pgcluster", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("up", "down", "url"))
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    cluster = Cluster(args.directory)
    if args.action == "up":
        if not cluster.running():
            cluster.start()
        cluster.wait_ready()
        if cluster.psql("SELECT 1 FROM pg_database WHERE datname = 'blog'") != "1":
            cluster.psql("CREATE DATABASE blog")
        print(cluster.url("blog"))
    elif args.action == "down":
        cluster.stop()
    else:
        print(cluster.url("blog"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
