"""docs/dashboard.md: the dashboard's HTTP API, its actions and its security, over real HTTP."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import re
import subprocess
import sys
import threading
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pytest
from support.processes import stop_cleanly, taskpg_command, taskpg_env
from support.rows import job_row

from taskpg.dashboard import Dashboard, asgi, serve
from taskpg.exceptions import ConfigurationError

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    import psycopg

    from taskpg import TaskPG

TOKEN = "s3cret-token-for-tests"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    text: str
    cookies: dict[str, str] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.text)


class Client:
    """HTTP to a dashboard served on a free loopback port, keeping cookies like a browser."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.cookies: dict[str, str] = {}

    def request(self, method: str, path: str, form: dict[str, str] | None = None, **headers: str) -> Reply:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        if self.cookies:
            sent.setdefault("Cookie", "; ".join(f"{k}={v}" for k, v in self.cookies.items()))
        body = urllib.parse.urlencode(form).encode() if form is not None else None
        if body is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=sent)
        response = conn.getresponse()
        text = response.read().decode()
        got: dict[str, str] = {}
        for name, value in response.getheaders():
            if name.lower() == "set-cookie":
                key, _, rest = value.partition("=")
                got[key] = rest.split(";", 1)[0]
        for key, value in got.items():
            if value:
                self.cookies[key] = value
            else:
                self.cookies.pop(key, None)
        conn.close()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, text, got)

    def get(self, path: str, **headers: str) -> Reply:
        return self.request("GET", path, **headers)

    def csrf(self) -> str:
        """The token a page's forms carry (loading the queues page first, as a browser would)."""
        page = self.get("/")
        assert page.status == 200, page.text
        found = re.search(r'name="csrf" value="([0-9a-f]{64})"', page.text) or re.search(
            r"([0-9a-f]{64})", self.cookies.get("taskpg_csrf", "")
        )
        assert found, "no CSRF token on the page"
        return found.group(1)


@pytest.fixture
def served(app: TaskPG) -> Iterator[Callable[..., Client]]:
    """``served(token=..., basic_auth=...)`` -> a client of a dashboard of ``app`` on a free port."""
    servers = []

    def start(**auth: Any) -> Client:
        server = serve(Dashboard(app, **auth), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return Client(server.server_port)

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def jobs(app: TaskPG, run_worker: Any) -> dict[str, Any]:
    """A succeeded and a dead job in 'default', two waiting in 'mail', one scheduled in 'mail'."""

    @app.task(name="web.ok")
    def ok(n: int) -> int:
        return n

    @app.task(name="web.fails", max_retries=0)
    def fails(text: str) -> None:
        raise ValueError(f"bad <b>{text}</b>")

    done, dead = ok.delay(1), fails.delay("<script>alert(1)</script>")
    with run_worker(app, queues=["default"]):
        done.get(timeout=15)
        dead.get(timeout=15, propagate=False)
    waiting = [ok.apply_async((n,), queue="mail") for n in range(2)]
    later = ok.apply_async((9,), queue="mail", countdown=3600)
    return {"ok": done.id, "dead": dead.id, "waiting": [h.id for h in waiting], "later": later.id}


def test_status_api_counts_every_queue_with_bullmqs_names(served: Callable[..., Client], jobs: dict[str, Any]) -> None:
    reply = served().get("/api/queue/status")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    status = reply.json()
    assert set(status) == {"default", "mail"}
    shape = ("waiting", "active", "completed", "failed", "delayed")
    assert {k: status["default"][k] for k in shape} == dict(zip(shape, (0, 0, 1, 1, 0), strict=True))
    assert {k: status["mail"][k] for k in shape} == dict(zip(shape, (2, 0, 0, 0, 1), strict=True))
    assert status["mail"]["paused"] is False and status["mail"]["oldest_waiting_seconds"] >= 0


def test_job_api_returns_one_job_as_json_and_clear_errors(served: Callable[..., Client], jobs: dict[str, Any]) -> None:
    client = served()
    job = client.get(f"/api/jobs/{jobs['dead']}").json()
    assert (job["id"], job["state"], job["task"], job["args"]) == (
        jobs["dead"],
        "dead",
        "web.fails",
        ["<script>alert(1)</script>"],
    )
    assert job["errors"][0]["type"] == "ValueError" and "Traceback" in job["errors"][0]["traceback"]
    missing = client.get(f"/api/jobs/{uuid.uuid4()}")
    assert missing.status == 404 and "no job" in missing.json()["error"]
    bad = client.get("/api/jobs/not-an-id")
    assert bad.status == 400 and "is not a taskpg job id" in bad.json()["error"]
    listed = client.get("/api/jobs?state=available&queue=mail").json()
    assert sorted(j["id"] for j in listed) == sorted(jobs["waiting"])
    assert client.get("/api/jobs?state=nonsense").status == 400


def test_metrics_serve_the_queue_depths_in_prometheus_text(served: Callable[..., Client], jobs: dict[str, Any]) -> None:
    reply = served().get("/metrics")
    assert reply.status == 200 and reply.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert 'taskpg_queue_jobs{queue="mail",state="available"} 2' in reply.text
    assert 'taskpg_queue_jobs{queue="mail",state="scheduled"} 1' in reply.text
    assert 'taskpg_queue_jobs{queue="default",state="dead"} 1' in reply.text


def test_pages_render_and_escape_what_jobs_carry(served: Callable[..., Client], jobs: dict[str, Any]) -> None:
    client = served()
    for path in ("/", "/jobs?state=dead", "/jobs?state=available&queue=mail", "/workers", "/schedules"):
        page = client.get(path)
        assert page.status == 200, (path, page.text)
    queues = client.get("/")
    assert re.search(r"<td>mail</td><td class=n><a [^>]*>2</a>", queues.text), queues.text
    detail = client.get(f"/jobs/{jobs['dead']}")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in detail.text
    assert "bad &lt;b&gt;" in detail.text and "<b>&lt;script" not in detail.text
    assert "<script>alert" not in detail.text and "Traceback (most recent call last)" in detail.text
    # The page's only script is the refresh, allowed by a nonce that is fresh per response.
    nonce = re.search(r"script-src 'nonce-([^']+)'", detail.headers["content-security-policy"])
    assert nonce and detail.text.count("<script") == 1 and f'<script nonce="{nonce.group(1)}">' in detail.text
    assert nonce.group(1) not in client.get(f"/jobs/{jobs['dead']}").text
    part = client.get("/", X_Taskpg_Part="main")
    assert part.text.startswith("<h1>Queues</h1>") and "<html" not in part.text
    assert client.get("/nothing").status == 404


def test_actions_need_the_csrf_token_and_a_same_origin(
    served: Callable[..., Client], app: TaskPG, jobs: dict[str, Any]
) -> None:
    client = served()
    assert client.request("POST", "/actions/pause", {"queue": "mail"}).status == 403  # no cookie, no token
    token = client.csrf()
    refused = client.request("POST", "/actions/pause", {"queue": "mail", "csrf": "0" * 64})
    assert refused.status == 403 and "CSRF" in refused.text
    elsewhere = client.request("POST", "/actions/pause", {"queue": "mail", "csrf": token}, Origin="http://evil.test")
    assert elsewhere.status == 403
    assert app.paused_queues() == []
    done = client.request("POST", "/actions/pause", {"queue": "mail", "csrf": token})
    assert (done.status, done.headers["location"]) == (303, "/")
    assert app.paused_queues() == ["mail"]
    assert "queue mail paused" in client.get("/").text  # the message, once
    assert "queue mail paused" not in client.get("/").text
    assert client.request("POST", "/actions/resume", {"queue": "mail", "csrf": token}).status == 303
    assert app.paused_queues() == []
    assert client.get("/actions/pause").status == 404  # actions are POST only


def test_actions_retry_cancel_delete_and_purge(
    served: Callable[..., Client], app: TaskPG, db: psycopg.Connection, jobs: dict[str, Any]
) -> None:
    client = served()
    token = client.csrf()
    retried = client.request("POST", "/actions/retry", {"id": jobs["dead"], "csrf": token})
    assert (retried.status, retried.headers["location"]) == (303, f"/jobs/{jobs['dead']}")
    assert job_row(db, app, jobs["dead"])["state"] == "available"
    assert client.request("POST", "/actions/cancel", {"id": jobs["later"], "csrf": token}).status == 303
    assert job_row(db, app, jobs["later"])["state"] == "cancelled"
    assert client.request("POST", "/actions/purge", {"queue": "mail", "csrf": token}).status == 303
    assert {job_row(db, app, i)["state"] for i in jobs["waiting"]} == {"cancelled"}
    assert "2 waiting job(s) of queue mail cancelled" in client.get("/").text
    # delete takes dead jobs only
    db.execute(f"UPDATE \"{app.schema}\".jobs SET state = 'dead', finished_at = now() WHERE id = %s", [jobs["dead"]])
    assert client.request("POST", "/actions/delete", {"id": jobs["ok"], "csrf": token}).status == 303
    assert job_row(db, app, jobs["ok"])["state"] == "succeeded"
    assert client.request("POST", "/actions/delete", {"id": jobs["dead"], "csrf": token}).status == 303
    assert db.execute(f'SELECT count(*) FROM "{app.schema}".jobs WHERE id = %s', [jobs["dead"]]).fetchone() == (0,)
    bad = client.request("POST", "/actions/retry", {"id": "x; DROP TABLE", "csrf": token})
    assert bad.status == 400


def test_without_auth_only_loopback_hosts_are_answered_and_bound(app: TaskPG, served: Callable[..., Client]) -> None:
    with pytest.raises(ConfigurationError, match="without authentication: pass --token or --basic-auth"):
        serve(Dashboard(app), "0.0.0.0", 0)
    client = served()
    assert client.get("/", Host="localhost:8008").status == 200
    assert client.get("/", Host="[::1]:8008").status == 200
    rebound = client.get("/api/queue/status", Host="attacker.example:8008")
    assert rebound.status == 403 and "loopback hosts only" in rebound.json()["error"]
    assert client.get("/", X_Forwarded_For="203.0.113.9").status == 403  # through a proxy: refused
    assert "through a proxy" in client.get("/api/queue/status", Forwarded="for=203.0.113.9").json()["error"]
    with pytest.raises(ConfigurationError, match="at least 16 characters"):
        Dashboard(app, token="short")


def test_without_auth_a_connection_from_another_machine_is_refused_even_with_a_loopback_host(app: TaskPG) -> None:
    started: list[str] = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "HTTP_HOST": "127.0.0.1:8008", "REMOTE_ADDR": "10.1.2.3"}
    body = b"".join(Dashboard(app)(environ, lambda status, headers: started.append(status)))
    assert started == ["403 Forbidden"] and b"from this machine only, not from 10.1.2.3" in body
    with_auth: list[str] = []
    environ["HTTP_AUTHORIZATION"] = f"Bearer {TOKEN}"
    b"".join(Dashboard(app, token=TOKEN)(environ, lambda status, headers: with_auth.append(status)))
    assert with_auth == ["200 OK"]  # with a token, any address may come in


def test_token_and_basic_auth(served: Callable[..., Client]) -> None:
    client = served(token=TOKEN)
    assert client.get("/api/queue/status").status == 401
    assert client.get("/api/queue/status", Authorization="Bearer wrong-token-wrong-token").status == 401
    assert client.get("/api/queue/status", Authorization=f"Bearer {TOKEN}").status == 200
    first = client.get(f"/jobs?token={TOKEN}")
    kept = first.cookies["taskpg_token"]
    assert first.status == 303 and re.fullmatch("[0-9a-f]{64}", kept) and TOKEN not in kept  # a digest, not the token
    assert client.get("/").status == 200  # the cookie now

    basic = served(basic_auth="ops:pa55word")
    refused = basic.get("/")
    assert refused.status == 401 and refused.headers["www-authenticate"] == 'Basic realm="taskpg"'
    wrong = base64.b64encode(b"ops:guess").decode()
    assert basic.get("/", Authorization=f"Basic {wrong}").status == 401
    right = base64.b64encode(b"ops:pa55word").decode()
    assert basic.get("/", Authorization=f"Basic {right}").status == 200
    assert basic.get("/", Authorization="Basic !!notbase64").status == 401


def test_mounted_under_a_prefix_in_wsgi_and_asgi(app: TaskPG, jobs: dict[str, Any]) -> None:
    dashboard = Dashboard(app)
    started: list[Any] = []
    environ = {"REQUEST_METHOD": "GET", "SCRIPT_NAME": "/ops", "PATH_INFO": "/", "HTTP_HOST": "localhost"}
    body = b"".join(dashboard(environ, lambda status, headers: started.extend([status, headers])))
    assert started[0] == "200 OK" and b'href="/ops/jobs?state=available&amp;queue=mail"' in body
    cookies = [value for name, value in started[1] if name == "Set-Cookie"]
    assert cookies and all("Path=/ops;" in c for c in cookies)  # the host app's pages never get them

    sent: list[dict[str, Any]] = []

    async def call() -> None:
        incoming = [{"type": "http.request", "body": b"", "more_body": False}]

        async def receive() -> dict[str, Any]:
            return incoming.pop(0)

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/taskpg/api/queue/status",
            "root_path": "/taskpg",
            "query_string": b"",
            "headers": [(b"host", b"127.0.0.1:8000")],
            "client": ("127.0.0.1", 51000),
        }
        await asgi(dashboard)(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["status"] == 200 and (b"content-type", b"application/json") in sent[0]["headers"]
    assert json.loads(sent[1]["body"])["mail"]["waiting"] == 2


def test_the_dashboard_command_serves_until_sigterm_and_refuses_an_open_bind_without_auth(
    pg_dsn: str, app: TaskPG, jobs: dict[str, Any]
) -> None:
    env = taskpg_env(pg_dsn, app.schema)
    with taskpg_command("dashboard", "--port", "0", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True) as proc:  # fmt: skip
        line = proc.stdout.readline()
        found = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
        assert found, line + proc.stderr.read()
        status = Client(int(found.group(1))).get("/api/queue/status").json()
        assert status["mail"]["waiting"] == 2
        stop_cleanly(proc)
    refused = subprocess.run(
        [sys.executable, "-m", "taskpg", "dashboard", "--host", "0.0.0.0", "--port", "0"],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 2 and "without authentication: pass --token or --basic-auth" in refused.stderr


def test_a_jobs_page_links_the_jobs_before_and_after_it_in_a_canvas(
    served: Callable[..., Client], app: TaskPG, run_worker: Any
) -> None:
    @app.task(name="web.double")
    def double(n: int) -> int:
        return 2 * n

    first = double.apply_async((1,), link=double.s())
    with run_worker(app, queues=["default"]):
        first.get(timeout=15)
        (child,) = first.children
        child.get(timeout=15)
    client = served()
    page = client.get(f"/jobs/{first.id}").text
    assert f'<a href="/jobs/{child.id}">{child.id}</a>' in page
    assert f'<a href="/jobs/{first.id}">{first.id}</a>' in client.get(f"/jobs/{child.id}").text
