"""A TCP proxy in front of Redis that can lose one reply: the fault a client retry turns into a repeated command.

``with LossyProxy(6379) as proxy:`` listens on ``proxy.port``; ``proxy.drop_reply_to(b"EVALSHA")``
arms it: the server's reply to the next command containing those bytes (and anything after it on that
connection) is read and thrown away, so the client waits, times out, reconnects and sends the command
again (``retry_on_timeout``).
"""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import TracebackType


class LossyProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._armed: bytes | None = None
        self.dropped = 0  # replies thrown away
        self._closing = False

    def drop_reply_to(self, marker: bytes) -> None:
        with self._lock:
            self._armed = marker

    def __enter__(self) -> LossyProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._closing = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.target)
            drop = threading.Event()  # set: swallow the server's next reply on this connection
            threading.Thread(target=self._upstream, args=(client, server, drop), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, drop), daemon=True).start()

    def _upstream(self, client: socket.socket, server: socket.socket, drop: threading.Event) -> None:
        try:
            while data := client.recv(65536):
                with self._lock:
                    if self._armed is not None and self._armed in data:
                        self._armed = None
                        drop.set()
                server.sendall(data)
        except OSError:
            pass
        finally:
            server.close()

    def _downstream(self, server: socket.socket, client: socket.socket, drop: threading.Event) -> None:
        deaf = False
        try:
            while data := server.recv(1 << 20):
                if drop.is_set():  # from that reply on, this connection is deaf: the client times out
                    if not deaf:
                        deaf = True
                        self.dropped += 1
                    continue
                client.sendall(data)
        except OSError:
            pass
        finally:
            client.close()
