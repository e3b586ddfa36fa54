"""taskpg workers under test: one in a thread of this process, or ``taskpg worker`` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from taskpg.worker import Worker, WorkerSettings

from .pg import BenchmarkError, connect, render

if TYPE_CHECKING:
    from types import TracebackType

    from taskpg import TaskPG

ROOT = Path(__file__).resolve().parent.parent  # the checkout: `benchmarks.tasks` imports from here
START_TIMEOUT = 60.0


class PollOnlyWorker(Worker):
    """A worker whose LISTEN is useless: it hears NOTIFY but ignores it, so it finds new jobs only
    by polling every ``poll_interval`` (what a deployment without working NOTIFY gets)."""

    def _wake_for_work(self) -> None:
        return None


#: PollOnlyWorker overrides a private hook; if the worker loses it, the poll-only variant is skipped.
POLL_ONLY_SUPPORTED = callable(getattr(Worker, "_wake_for_work", None))


class InProcessWorker:
    """``with InProcessWorker(app, concurrency=8) as worker:`` a Worker in a thread, listening."""

    def __init__(self, app: TaskPG, worker_class: type[Worker] = Worker, **settings: Any) -> None:
        settings.setdefault("flush_buffer", False)
        settings.setdefault("grace", 10.0)
        self.worker = worker_class(app, WorkerSettings(**settings))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        except BaseException as exc:
            self.error = exc

    def __enter__(self) -> Worker:
        self.thread.start()
        deadline = time.monotonic() + START_TIMEOUT
        while not self.worker.started.wait(0.05):
            if self.error is not None or time.monotonic() > deadline:
                raise BenchmarkError(f"the worker did not start: {self.error!r}")
        if not self.worker.listening.wait(START_TIMEOUT):
            raise BenchmarkError("the worker's LISTEN connection did not come up")
        return self.worker

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.worker.stop()
        self.thread.join(60)
        if self.thread.is_alive():
            raise BenchmarkError("the worker did not stop within 60 s")
        if self.error is not None and kind is None:
            raise self.error


class WorkerProcesses:
    """``with WorkerProcesses(dsn, schema, 2, concurrency=8):`` ``taskpg worker`` processes on the
    schema, registered (heartbeat row written) before the block starts; SIGTERM at the end."""

    def __init__(
        self,
        dsn: str,
        schema: str,
        processes: int,
        concurrency: int,
        pool: str = "threads",
        redis_url: str | None = None,
    ) -> None:
        self.dsn, self.schema, self.count, self.redis_url = dsn, schema, processes, redis_url
        self.command = [
            *(sys.executable, "-m", "taskpg", "worker", "-A", "benchmarks.tasks"),
            *("--dsn", dsn, "--schema", schema, "-c", str(concurrency), "--pool", pool),
            *("--no-flush", "-l", "warning"),
        ]
        self.procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []

    def __enter__(self) -> WorkerProcesses:
        env = {**os.environ, "TASKPG_DSN": self.dsn, "TASKPG_SCHEMA": self.schema}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.pop("TASKPG_REDIS_URL", None)
        if self.redis_url is not None:  # the app's Redis: here its rate limiter's state (no flusher runs)
            env["TASKPG_REDIS_URL"] = self.redis_url
        try:
            for _ in range(self.count):
                log = tempfile.TemporaryFile()
                proc = subprocess.Popen(self.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
                self.procs.append((proc, log))
            self._wait_registered()
        except BaseException:
            self._stop()
            raise
        return self

    def _wait_registered(self) -> None:
        count = render("SELECT count(*) FROM {workers}", self.schema)
        deadline = time.monotonic() + START_TIMEOUT
        with connect(self.dsn) as conn:
            while True:
                row = conn.execute(count).fetchone()
                if row is not None and row[0] >= self.count:
                    return
                for proc, log in self.procs:
                    if proc.poll() is not None:
                        raise BenchmarkError(f"a worker process exited with {proc.returncode}:\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise BenchmarkError(f"worker processes did not register within {START_TIMEOUT:.0f} s")
                time.sleep(0.05)

    def _stop(self) -> list[str]:
        """SIGTERM every process, wait for it; returns the logs of those that did not exit with 0."""
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        failures = []
        for proc, log in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.returncode != 0:
                failures.append(f"exit code {proc.returncode}:\n{_tail(log)}")
            log.close()
        self.procs = []
        return failures

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        failures = self._stop()
        if failures and kind is None:
            raise BenchmarkError("a worker process failed: " + "\n".join(failures))


def _tail(log: IO[bytes], limit: int = 4000) -> str:
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]
