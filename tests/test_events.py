"""docs/events.md: job events across processes over LISTEN/NOTIFY, opt-in as Celery's ``worker -E``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import threading
from typing import TYPE_CHECKING, Any

import pytest
from support.processes import stop_cleanly, taskpg_command, taskpg_env, wait_watching_workers

from taskpg import Retry, TaskPG
from taskpg.events import PAYLOAD_BYTES, JobEvent, decode, payloads

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg


class Collector:
    """``app.events()`` in a thread of its own, as a dashboard would run it."""

    def __init__(self, app: TaskPG, **filters: Any) -> None:
        self.events: list[JobEvent] = []
        self.listening = threading.Event()
        self._stop = threading.Event()
        self._app, self._filters = app, filters
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.listening.wait(10)

    def _run(self) -> None:
        stream = self._app.events(timeout=0.2, on_listening=self.listening.set, **self._filters)
        while not self._stop.is_set():
            for event in stream:
                self.events.append(event)
            stream = self._app.events(timeout=0.2, **self._filters)

    def of(self, job_id: str) -> list[str]:
        return [e.type for e in self.events if e.job_id == job_id]

    def close(self) -> None:
        self._stop.set()
        self.thread.join(10)


@pytest.fixture
def evented(pg_dsn: str, migrated_schema: str) -> Iterator[TaskPG]:
    app = TaskPG(pg_dsn, schema=migrated_schema, events=True)
    yield app
    app.close()


def test_a_jobs_life_is_told_as_events(evented: TaskPG, run_worker: Any) -> None:
    @evented.task(name="ev.ok", bind=True)
    def ok(self: Any) -> str:
        self.update_state(meta={"step": 1})
        return "ok"

    @evented.task(name="ev.flaky", bind=True)
    def flaky(self: Any) -> None:
        if self.request.attempt == 1:
            raise Retry(countdown=0, exc=ConnectionError("once"))
        raise ValueError("then for good")

    watcher = Collector(evented)
    try:
        good, bad = ok.delay(), flaky.delay()
        with run_worker(evented):
            good.get(timeout=10)
            bad.get(timeout=10, propagate=False)
            wait_watching_workers("the dead event", lambda: "dead" in watcher.of(bad.id), 10)
    finally:
        watcher.close()
    # progress is sent by the task itself, at once; started by the worker's publisher within 10 ms: either first
    assert [t for t in watcher.of(good.id) if t != "progress"] == ["enqueued", "started", "succeeded"]
    assert watcher.of(good.id).index("progress") < watcher.of(good.id).index("succeeded")
    (progress,) = [e for e in watcher.events if e.type == "progress"]
    assert progress.data == {"state": "PROGRESS", "meta": {"step": 1}}
    assert watcher.of(bad.id) == ["enqueued", "started", "failed", "retried", "started", "failed", "dead"]
    started = [e for e in watcher.events if e.job_id == bad.id and e.type == "started"]
    assert [(e.task, e.queue, e.attempt) for e in started] == [("ev.flaky", "default", 1), ("ev.flaky", "default", 2)]


def test_events_can_be_filtered_by_queue_and_type(evented: TaskPG) -> None:
    @evented.task(name="ev.mail", queue="mail")
    def mail() -> None:
        return None

    @evented.task(name="ev.other")
    def other() -> None:
        return None

    watcher = Collector(evented, queues=["mail"], types=["enqueued"])
    try:
        wanted = mail.delay()
        other.delay()
        mail.delay_many([()] * 3)
        wait_watching_workers("the enqueued events", lambda: len(watcher.events) >= 4, 10)
    finally:
        watcher.close()
    assert {e.queue for e in watcher.events} == {"mail"} and {e.type for e in watcher.events} == {"enqueued"}
    assert wanted.id in {e.job_id for e in watcher.events} and len(watcher.events) == 4
    with pytest.raises(ValueError, match="unknown event type"):
        next(evented.events(types=["exploded"], timeout=0.1))


def test_no_events_unless_asked_for(pg_dsn: str, migrated_schema: str, run_worker: Any) -> None:
    quiet = TaskPG(pg_dsn, schema=migrated_schema)  # events off (the default)
    listener = TaskPG(pg_dsn, schema=migrated_schema, events=True)

    @quiet.task(name="ev.quiet")
    def hush() -> None:
        return None

    watcher = Collector(listener)
    try:
        with run_worker(quiet):
            hush.delay().get(timeout=10)
    finally:
        watcher.close()
    assert watcher.events == []
    quiet.close()
    listener.close()


def test_many_events_are_split_into_payloads_postgres_takes() -> None:
    events = [JobEvent("started", f"{n:08d}-0000-7000-8000-000000000000", "t" * 200, "q", 1, 1.5) for n in range(200)]
    texts = payloads(events)
    assert len(texts) > 1 and all(len(t.encode()) <= PAYLOAD_BYTES for t in texts)
    assert [e for t in texts for e in decode(t)] == events
    assert decode("not json") == [] and decode('[["x"]]') == []


def test_taskpg_events_prints_json_lines(
    pg_dsn: str, migrated_schema: str, evented: TaskPG, db: psycopg.Connection
) -> None:
    @evented.task(name="ev.cli")
    def cli_task() -> None:
        return None

    argv = ("events", "--dsn", pg_dsn, "--schema", migrated_schema)
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    with taskpg_command(*argv, env=taskpg_env(), text=True, **pipes) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("listening")
        handle = cli_task.delay()
        line = proc.stdout.readline()
        stop_cleanly(proc, 10)
    event = json.loads(line)
    assert (event["type"], event["job_id"], event["task"], event["queue"]) == (
        "enqueued",
        handle.id,
        "ev.cli",
        "default",
    )


def test_an_outcome_that_lost_its_lease_tells_no_event(evented: TaskPG) -> None:
    from taskpg.completer import Completer
    from taskpg.job import JobState, Outcome

    @evented.task(name="ev.lost")
    def lost() -> None:
        return None

    mine, taken = lost.delay(), lost.delay()
    claimed = {job.id: job for job in evented.store.claim(["default"], 10, "w-lease")}
    stale = dataclasses.replace(claimed[taken.id], lease="00000000-0000-4000-8000-000000000000")  # rescued meanwhile
    applied: list[Outcome] = []
    completer = Completer(evented.store, evented.tasks, on_applied=applied.extend)
    try:
        completer.add(Outcome(claimed[mine.id], JobState.SUCCEEDED, result="null"))
        completer.add(Outcome(stale, JobState.SUCCEEDED, result="null"))
        assert completer.signals.wait_for("written", 1, timeout=10)
    finally:
        completer.close(timeout=10)
    assert [o.job.id for o in applied] == [mine.id]  # the publisher is told only this one


def test_the_async_variant_yields_the_same_events_without_blocking_the_loop(evented: TaskPG) -> None:
    import asyncio

    @evented.task(name="ev.async")
    def noop() -> None:
        return None

    async def main() -> tuple[list[JobEvent], int]:
        listening = asyncio.Event()
        loop = asyncio.get_running_loop()
        ticks = 0

        async def tick() -> None:  # runs while the listener waits: the loop is free
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        got: list[JobEvent] = []
        stream = evented.aevents(types=["enqueued"], on_listening=lambda: loop.call_soon_threadsafe(listening.set))
        reader = asyncio.create_task(anext(stream))
        await listening.wait()
        handle = await asyncio.to_thread(noop.delay)
        got.append(await asyncio.wait_for(reader, 10))
        await stream.aclose()
        ticker.cancel()
        assert got[0].job_id == handle.id
        return got, ticks

    got, ticks = asyncio.run(main())
    assert [e.type for e in got] == ["enqueued"] and ticks > 0


def test_the_async_listener_thread_ends_quietly_when_its_loop_closed_first(
    evented: TaskPG, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    raised: list[BaseException | None] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: raised.append(args.exc_value))

    async def main() -> None:
        listening = asyncio.Event()
        loop = asyncio.get_running_loop()
        stream = evented.aevents(on_listening=lambda: loop.call_soon_threadsafe(listening.set))
        reader = asyncio.ensure_future(anext(stream))
        await listening.wait()
        reader.cancel()  # the generator's finally tells the pump thread to stop; the loop closes before it has
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await stream.aclose()

    asyncio.run(main())
    pumps = [t for t in threading.enumerate() if t.name == "taskpg-events"]
    for pump in pumps:
        pump.join(10)
    assert not any(p.is_alive() for p in pumps) and raised == []
