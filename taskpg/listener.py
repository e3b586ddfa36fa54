"""LISTEN for new work on a dedicated connection and wake the fetch loop.

After any connection loss it reconnects with backoff, LISTENs again and wakes the fetch loop
once (anything announced while it was away is picked up by that claim). An idle connection is
pinged every few seconds, so a half-open socket is noticed instead of silently hearing nothing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from .broker import connect
from .reconnect import reconnecting

logger = logging.getLogger("taskpg.worker")

PING_EVERY = 5.0


class Listener:
    def __init__(
        self, dsn: str, listen_sql: str, queues: set[str], on_work: Callable[[], None], stop: threading.Event
    ) -> None:
        self.dsn = dsn
        self.listen_sql = listen_sql
        self.queues = queues
        self.on_work = on_work
        self.stop = stop
        self.connected = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="taskpg-listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _reset(self) -> None:
        self.connected.clear()
        if self._conn is not None:
            self._conn.close()
        self._conn = None

    def _connect(self) -> psycopg.Connection[Any]:
        conn = connect(self.dsn)
        conn.execute(self.listen_sql)
        self._conn = conn
        self.connected.set()
        self.on_work()  # catch up on anything announced while we were not listening
        return conn

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                reconnecting(self._listen, "listening for new jobs", self._reset, self.stop)
            except Exception:
                if not self.stop.is_set():
                    logger.exception("listener failed; restarting it")
                    self._reset()
                    time.sleep(1)
        self._reset()

    def _listen(self) -> None:
        conn = self._conn or self._connect()
        last_ping = time.monotonic()
        while not self.stop.is_set():
            for note in conn.notifies(timeout=0.25):
                if note.payload in self.queues:
                    self.on_work()
            if time.monotonic() - last_ping > PING_EVERY:
                conn.execute("SELECT 1")
                last_ping = time.monotonic()
