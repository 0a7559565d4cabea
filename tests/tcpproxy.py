"""A TCP proxy a test controls, for network faults on loopback: forward, or black-hole (connections
stay open, nothing passes either way, new ones are accepted and never answered)."""

from __future__ import annotations

import socket
import threading


class Proxy:
    """Listens on 127.0.0.1 (a free port) and forwards to `target_port` until told otherwise."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.black_holed = threading.Event()
        self.closed = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def black_hole(self) -> None:
        """From now on nothing passes; connections stay open (as behind a dead route)."""
        self.black_holed.set()

    def close(self) -> None:
        """Drop every connection and stop listening, as an endpoint that went away (shut down
        first: closing a socket another thread is reading does not end the connection)."""
        self.closed.set()
        for s in [self.listener, *self.sockets]:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                s.close()
            except OSError:
                pass

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(client)
            if self.black_holed.is_set():
                threading.Thread(target=self._swallow, args=(client,), daemon=True).start()
                continue
            upstream = socket.create_connection(self.target)
            self.sockets.append(upstream)
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _swallow(self, client: socket.socket) -> None:
        while not self.closed.is_set():
            try:
                if not client.recv(65536):
                    return
            except OSError:
                return

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        while not self.closed.is_set():
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                try:
                    sink.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            if self.black_holed.is_set():
                continue  # dropped
            try:
                sink.sendall(data)
            except OSError:
                return
