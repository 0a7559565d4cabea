"""Stand-ins, on loopback, for what the cloud providers' IAM authentication talks to (no cloud is
reachable here), each checked by the real server:

- `TokenEndpoint`: Azure's managed identity endpoint (App Service's IDENTITY_ENDPOINT, which
  azure-identity's DefaultAzureCredential asks) and Google's metadata server (GCE_METADATA_HOST,
  which google-auth's application default credentials ask, as on GKE). Each token it issues is
  made the role's password on the real server first, and the previous one stops working: a
  connection authenticates only with the newest token, as issued.
- `RdsIamGateway`: what RDS does with an IAM token: a proxy in front of the real server that reads
  the client's cleartext password (RDS asks for it in clear, over TLS), checks it is an AWS SigV4
  presigned `connect` request for this host, port and user, signed with the test's AWS secret and
  not expired, and only then passes the role's real password on.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import http.server
import json
import secrets
import socket
import struct
import threading
import urllib.parse
from typing import Callable


class TokenEndpoint:
    """Issues OAuth access tokens, Azure's and Google's way; `on_issue(token)` runs before each is
    given out (the test makes it the role's password). `lifetime`: the seconds each is valid."""

    def __init__(self, on_issue: Callable[[str], None], lifetime: int = 3600) -> None:
        self.on_issue, self.lifetime = on_issue, lifetime
        self.issued: list[str] = []
        self.requests: list[str] = []
        endpoint = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                endpoint.requests.append(self.path)
                path = urllib.parse.urlparse(self.path).path
                if path.startswith("/msi/token"):  # Azure App Service managed identity (2019-08-01)
                    if self.headers.get("X-IDENTITY-HEADER") != "identity-header":
                        return self._send(401, {"error": "bad identity header"})
                    token = endpoint._issue()
                    return self._send(200, {"access_token": token, "token_type": "Bearer",
                                            "expires_on": str(int(dt.datetime.now().timestamp()) + endpoint.lifetime),
                                            "resource": "https://ossrdbms-aad.database.windows.net"})
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403, {"error": "no Metadata-Flavor"})
                if path.endswith("/token"):
                    token = endpoint._issue()
                    return self._send(200, {"access_token": token, "expires_in": endpoint.lifetime,
                                            "token_type": "Bearer"})
                if "/service-accounts/" in path:  # (by "default", then by the email it answers with)
                    return self._send(200, {"email": "migrator@project.iam.gserviceaccount.com",
                                            "scopes": ["https://www.googleapis.com/auth/sqlservice.login"],
                                            "aliases": ["default"]})
                if path.endswith("/project-id"):
                    return self._send(200, "project", text=True)
                return self._send(200, "", text=True)  # the metadata server's ping

            def _send(self, status: int, body: object, text: bool = False) -> None:
                data = (body if text else json.dumps(body)).encode()  # type: ignore[union-attr]
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", "text/plain" if text else "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def _issue(self) -> str:
        token = "tok-" + secrets.token_urlsafe(24)
        self.on_issue(token)
        self.issued.append(token)
        return token

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def rds_token_valid(token: str, host: str, port: int, user: str, access_key: str, secret_key: str) -> str | None:
    """Why an RDS IAM token is not valid for host:port and user (None: it is): AWS SigV4 presigned
    URL verification, written from the specification (not botocore's code)."""
    where, _, query = token.partition("/?")
    if where != f"{host}:{port}":
        return f"signed for {where!r}"
    params = urllib.parse.parse_qs(query, keep_blank_values=True)
    one = {k: v[0] for k, v in params.items()}
    if one.get("Action") != "connect" or one.get("DBUser") != user:
        return f"not a connect request for {user!r}"
    credential = one.get("X-Amz-Credential", "").split("/")
    if len(credential) != 5 or credential[0] != access_key or credential[3:] != ["rds-db", "aws4_request"]:
        return f"credential scope {one.get('X-Amz-Credential')!r}"
    signed_at = dt.datetime.strptime(one["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.timezone.utc)
    if dt.datetime.now(dt.timezone.utc) > signed_at + dt.timedelta(seconds=int(one.get("X-Amz-Expires", "0"))):
        return "expired"
    quote = lambda s: urllib.parse.quote(s, safe="-_.~")  # noqa: E731
    canonical_query = "&".join(f"{quote(k)}={quote(v)}" for k, v in sorted(one.items()) if k != "X-Amz-Signature")
    canonical = "\n".join(["GET", "/", canonical_query, f"host:{host}:{port}", "", "host",
                           hashlib.sha256(b"").hexdigest()])
    scope = "/".join(credential[1:])
    to_sign = "\n".join(["AWS4-HMAC-SHA256", one["X-Amz-Date"], scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in credential[1:]:
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest(),
                               one.get("X-Amz-Signature", "")):
        return "bad signature"
    return None


class RdsIamGateway:
    """Listens on loopback; forwards to the real server (`password` auth: cleartext) and, in the
    client's PasswordMessage, replaces a valid IAM token by `real_password` (an invalid one by
    nothing that could work). `accepted` and `refused` hold what it saw."""

    def __init__(self, target_port: int, user: str, real_password: str, access_key: str, secret_key: str) -> None:
        self.target_port, self.user, self.real_password = target_port, user, real_password
        self.access_key, self.secret_key = access_key, secret_key
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[str] = []
        self.refused: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._client_to_server, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()

    def _client_to_server(self, client: socket.socket, upstream: socket.socket) -> None:
        try:
            startup = _read_exactly(client, 4)
            startup += _read_exactly(client, struct.unpack("!I", startup)[0] - 4)
            upstream.sendall(startup)  # (sslmode=disable: no SSLRequest comes first)
            while True:
                kind = _read_exactly(client, 1)
                length = struct.unpack("!I", _read_exactly(client, 4))[0]
                body = _read_exactly(client, length - 4)
                if kind == b"p":
                    token = body.rstrip(b"\0").decode()
                    why = rds_token_valid(token, "127.0.0.1", self.port, self.user, self.access_key, self.secret_key)
                    (self.refused if why else self.accepted).append(why or token)
                    password = b"not-a-valid-token" if why else self.real_password.encode()
                    body = password + b"\0"
                    upstream.sendall(b"p" + struct.pack("!I", len(body) + 4) + body)
                    break
                upstream.sendall(kind + struct.pack("!I", length) + body)
        except (OSError, ConnectionError):
            upstream.close()
            return
        _pump(client, upstream)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
