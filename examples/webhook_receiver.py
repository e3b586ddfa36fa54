"""A webhook receiver that absorbs a burst through the Redis buffer, then works it off.

Run it with a Postgres and a Redis you can write to:

    python examples/webhook_receiver.py               # 2,000 webhooks
    python examples/webhook_receiver.py --burst 10000

Configuration comes from the environment:

- ``TASKPG_DSN``: the database (default ``postgresql://postgres@127.0.0.1:5432/test``);
- ``TASKPG_SCHEMA``: the Postgres schema for taskpg's tables (default ``taskpg_webhooks``);
- ``TASKPG_REDIS_URL``: the Redis of the buffer (default ``redis://127.0.0.1:6379/0``).

The program migrates the schema, then starts an HTTP server (the standard library's ``ThreadingHTTPServer``) on
127.0.0.1 and a free port. ``POST /webhook`` with a JSON object as its body pushes one
``handle_event(**body)`` job onto the Redis buffer and answers ``202 Accepted`` with the job id: the request
never waits for Postgres. A few client threads fire the burst at it, then a taskpg ``Worker`` starts in a thread;
its flusher moves the envelopes into Postgres in bulk and its pool runs the jobs. The program prints how many
webhooks were received, how many envelopes waited in Redis, and how many jobs were processed, with the rates.
At the end it stops the worker and the server, and deletes its Redis keys (``taskpg:<schema>:*``). The
finished jobs stay in the schema: ``taskpg status --dsn <TASKPG_DSN> --schema <TASKPG_SCHEMA>`` shows them.

If Redis cannot be reached, every webhook is written straight to Postgres instead, and the ``buffered:`` line
says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psycopg
import redis
from psycopg import sql

from taskpg import TaskPG, Worker
from taskpg.exceptions import SerializationError

DSN = os.environ.get("TASKPG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
SCHEMA = os.environ.get("TASKPG_SCHEMA", "taskpg_webhooks")
REDIS_URL = os.environ.get("TASKPG_REDIS_URL", "redis://127.0.0.1:6379/0")
CLIENT_THREADS = 8

app = TaskPG(DSN, schema=SCHEMA, redis_url=REDIS_URL)


@app.task(name="webhooks.handle_event", queue="webhooks")
def handle_event(**event: Any) -> Any:
    """A stand-in for real work (update an order, call an API): return the event's id."""
    return event.get("id")


class WebhookHandler(BaseHTTPRequestHandler):
    """``POST /webhook``: one JSON object in, one buffered job out (202 with its id)."""

    def do_POST(self) -> None:
        if self.path != "/webhook":
            self._reply(HTTPStatus.NOT_FOUND, {"error": "not found"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "bad Content-Length"})
            return
        if length > app.max_payload_bytes:  # refuse before reading it into memory
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "body too large"})
            return
        try:
            event = json.loads(self.rfile.read(length))
        except ValueError:
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "body is not JSON"})
            return
        if not isinstance(event, dict):
            self._reply(HTTPStatus.BAD_REQUEST, {"error": "body must be a JSON object"})
            return
        try:
            handle = handle_event.apply_async(kwargs=event, via="buffer")
        except SerializationError as exc:  # over max_payload_bytes once encoded
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": str(exc)})
            return
        except redis.RedisError:  # Redis answered with an error (full, read-only): the sender retries on 503
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, {"error": "try again later"})
            return
        self._reply(HTTPStatus.ACCEPTED, {"job_id": handle.id})

    def _reply(self, status: HTTPStatus, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a burst would print one line per request


def post_webhook(url: str, event: dict[str, Any]) -> str:
    """What a webhook sender does: POST the event, expect 202; returns the job id."""
    request = urllib.request.Request(
        url, data=json.dumps(event).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        if response.status != HTTPStatus.ACCEPTED:
            raise RuntimeError(f"POST {url} answered {response.status}")
        job_id: str = json.loads(response.read())["job_id"]
    return job_id


def succeeded(job_ids: list[str]) -> int:
    """How many of these jobs have succeeded (plain SQL on taskpg's jobs table)."""
    query = sql.SQL("SELECT count(*) FROM {}.jobs WHERE id = ANY(%s::uuid[]) AND state = 'succeeded'").format(
        sql.Identifier(app.schema)
    )
    with psycopg.connect(app.dsn) as conn:
        row = conn.execute(query, (job_ids,)).fetchone()
    return int(row[0]) if row else 0


def buffered_line() -> str:
    """How many envelopes wait in the buffer list (what `taskpg status` shows) and how many bypassed it."""
    direct = app.buffer.fallbacks
    try:
        depth, _ = app.buffer.depth()
    except redis.RedisError:
        return f"buffered: none (Redis is unreachable), {direct} written straight to Postgres"
    return f"buffered: {depth} envelope(s) waiting in Redis, {direct} written straight to Postgres"


def delete_redis_keys() -> None:
    """Remove this example's buffer, processing lists and flusher lock: taskpg:<schema>:*."""
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1.0)
    try:
        keys = list(client.scan_iter(f"taskpg:{app.schema}:*"))
        if keys:
            client.delete(*keys)
    except redis.ConnectionError:
        pass  # Redis is down: it holds nothing of ours we could delete
    finally:
        client.close()


def rate(count: int, seconds: float) -> str:
    return f"{seconds:.2f} s ({count / max(seconds, 1e-9):,.0f}/s)"


def run(burst: int, timeout: float) -> int:
    app.migrate()  # creates the schema and taskpg's tables (what `taskpg migrate` does)
    server = ThreadingHTTPServer(("127.0.0.1", 0), WebhookHandler)
    server.daemon_threads = True
    server_thread = threading.Thread(target=server.serve_forever, name="webhook-server")
    server_thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/webhook"
    try:
        started = time.monotonic()
        events = ({"id": n, "type": "charge.succeeded", "amount": 100 + n} for n in range(burst))
        with ThreadPoolExecutor(CLIENT_THREADS) as clients:
            job_ids = list(clients.map(lambda event: post_webhook(url, event), events))
        print(f"received {len(job_ids)} webhooks in {rate(len(job_ids), time.monotonic() - started)}")
        print(buffered_line())

        started = time.monotonic()
        done = 0
        # The worker runs the flusher too: it moves the envelopes into Postgres.
        with Worker(app, queues=["webhooks"], concurrency=8, grace=10).in_background():
            while done < len(job_ids) and time.monotonic() - started < timeout:
                time.sleep(0.2)
                done = succeeded(job_ids)
        if done < len(job_ids):
            print(f"only {done} of {len(job_ids)} jobs succeeded within {timeout:.0f} s", file=sys.stderr)
            return 1
        print(f"processed {done} jobs in {rate(done, time.monotonic() - started)}")
        return 0
    finally:
        for thread in threading.enumerate():  # the worker's flusher thread sees the same stop and ends
            if thread.name == "taskpg-flusher":
                thread.join(10)
        server.shutdown()
        server_thread.join(10)
        server.server_close()
        delete_redis_keys()
        app.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="Absorb a burst of webhooks through taskpg's Redis buffer.")
    parser.add_argument("--burst", type=int, default=2000, help="how many webhooks to send (default: 2000)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the jobs (default: 120)")
    args = parser.parse_args()
    if args.burst < 1:
        parser.error("--burst must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(run(args.burst, args.timeout))


if __name__ == "__main__":
    main()
