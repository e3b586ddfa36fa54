"""The worker-process harness: ``taskpg worker -A proc_tasks`` processes (see conftest's ``spawn``), their rows."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

import taskpg

from .paths import SUPPORT, TESTS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence

    import psycopg

# The worker processes import the same taskpg as this test process.
TASKPG_ROOT = Path(taskpg.__file__).resolve().parent.parent


class WorkerProcess:
    """One ``taskpg worker`` process; its stderr goes to a file (a pipe nobody reads could fill up)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._stderr = open(log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            argv, cwd=TESTS, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def tail(self, lines: int = 40) -> str:
        return f"--- stderr of worker pid {self.pid} (last {lines} lines) ---\n" + "\n".join(
            self.log().splitlines()[-lines:]
        )

    def wait_ready(self, timeout: float = 20) -> None:
        wait_watching_workers(
            f"worker {self.pid} to be ready", lambda: " ready: queues=" in self.log(), timeout, [self]
        )

    def wait_exit(self, timeout: float, what: str) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{what}: worker {self.pid} still running after {timeout} s\n{self.tail()}")

    def stop(self, timeout: float = 20) -> None:
        """Graceful stop that must succeed: SIGTERM, exit code 0."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.wait_exit(timeout, "stopping with SIGTERM")
        assert code == 0, f"worker {self.pid} exited with {code} after SIGTERM\n{self.tail()}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()


def wait_watching_workers(
    what: str, predicate: Callable[[], Any], timeout: float, workers: Sequence[WorkerProcess] = ()
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail clearly on timeout or a dead worker."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for worker in workers:
            if worker.proc.poll() is not None:
                pytest.fail(
                    f"worker {worker.pid} exited with code {worker.proc.returncode} while waiting for {what}\n"
                    + worker.tail()
                )
        if time.monotonic() >= deadline:
            tails = "\n".join(worker.tail() for worker in workers)
            pytest.fail(f"timed out after {timeout:.1f} s waiting for {what}\n{tails}")
        time.sleep(0.1)


def execution_pids(db: psycopg.Connection, schema: str, job_id: str) -> list[int]:
    rows = db.execute(f'SELECT pid FROM "{schema}".executions WHERE job_id = %s ORDER BY at', (job_id,)).fetchall()
    return [r[0] for r in rows]


def execution_count(db: psycopg.Connection, schema: str) -> int:
    row = db.execute(f'SELECT count(*) FROM "{schema}".executions').fetchone()
    return int(row[0]) if row else 0


def worker_id_of(db: psycopg.Connection, schema: str, pid: int) -> str:
    row = db.execute(f'SELECT id FROM "{schema}".workers WHERE pid = %s', (pid,)).fetchone()
    assert row is not None, f"worker pid {pid} is not registered"
    return str(row[0])


def taskpg_env(pg_dsn: str | None = None, schema: str | None = None) -> dict[str, str]:
    """The environment of a ``python -m taskpg`` the tests start: this taskpg and support/ importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SUPPORT), str(TASKPG_ROOT)])}
    if pg_dsn is not None:
        env["TASKPG_DSN"] = pg_dsn
    if schema is not None:
        env["TASKPG_SCHEMA"] = schema
    return env


@contextlib.contextmanager
def taskpg_command(*args: str, env: dict[str, str], stdout: Any, stderr: Any, text: bool = False) -> Iterator[Any]:
    """``python -m taskpg <args>`` for the block; killed if it still runs at the end (a failed test)."""
    proc = subprocess.Popen([sys.executable, "-m", "taskpg", *args], env=env, stdout=stdout, stderr=stderr, text=text)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def stop_cleanly(proc: subprocess.Popen[Any], timeout: float = 30) -> None:
    """SIGTERM, and the process must exit with 0."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout) == 0
