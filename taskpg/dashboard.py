"""The dashboard and HTTP status API: one WSGI application, served by ``taskpg dashboard`` or mounted
into your own WSGI or ASGI app.

Pages (server-rendered by pages.py): queues, jobs by state, one job, dead letters, workers, schedules.
Actions (POST): pause, resume, purge a queue; retry, cancel or delete a job; retry dead jobs. API (JSON):
``/api/queue/status``, ``/api/jobs``, ``/api/jobs/{id}``; Prometheus text at ``/metrics``.

Security: without ``token``/``basic_auth`` the dashboard answers only requests whose Host is a loopback
name (so a DNS-rebinding page cannot drive it), and ``serve`` refuses other addresses. Every action
needs the CSRF token of a double-submit cookie and, when the browser sends one, a same-origin Origin.
Pages carry a Content-Security-Policy whose script nonce is fresh per response.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import hmac
import http.cookies
import ipaddress
import json
import logging
import re
import secrets
import socketserver
import urllib.parse
import wsgiref.simple_server
from typing import TYPE_CHECKING, Any

from . import control, deadletter, metrics, ops, pages
from .beat import describe_schedules
from .exceptions import ConfigurationError, TaskpgError
from .job import JobState, validate_job_id

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from .app import TaskPG

logger = logging.getLogger("taskpg.dashboard")

JSON = "application/json"
HTML = "text/html; charset=utf-8"
MAX_BODY = 64 * 1024
PAGE_SIZE = 50
CSRF_COOKIE = "taskpg_csrf"
TOKEN_COOKIE = "taskpg_token"
FLASH_COOKIE = "taskpg_flash"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_JOB_PATH = re.compile(r"/(api/)?jobs/([^/]+)")

StartResponse = Any  # wsgiref's type lives in _typeshed only
Environ = dict[str, Any]


@dataclasses.dataclass
class Response:
    status: str
    body: bytes
    content_type: str = HTML
    headers: list[tuple[str, str]] = dataclasses.field(default_factory=list)


class Refused(Exception):
    """A request answered with an error status (bad input, no such job, forbidden)."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address, no port) is this machine's loopback."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Dashboard:
    """The WSGI application. ``token``: a secret sent as ``Authorization: Bearer``, or once as
    ``?token=`` (then kept in a cookie); ``basic_auth``: ``"user:password"`` for the browser's prompt."""

    def __init__(self, app: TaskPG, *, token: str | None = None, basic_auth: str | None = None) -> None:
        if basic_auth is not None and ":" not in basic_auth:
            raise ConfigurationError("basic_auth takes 'user:password'")
        if token is not None and len(token) < 16:
            raise ConfigurationError("the dashboard token must be at least 16 characters")
        self.app = app
        self.token = token
        self.basic_auth = basic_auth

    @property
    def has_auth(self) -> bool:
        return self.token is not None or self.basic_auth is not None

    # -- WSGI ----------------------------------------------------------------------------------

    def __call__(self, environ: Environ, start_response: StartResponse) -> Iterable[bytes]:
        request = Request(environ)
        try:
            response = self.handle(request)
        except Refused as refused:
            response = self._error(request, refused.status, str(refused))
        except TaskpgError as exc:
            response = self._error(request, "503 Service Unavailable", f"taskpg: {exc}")
        except Exception as exc:  # the database is away, say: an error page, not a dead server
            logger.warning("dashboard: %s %s failed: %s", request.method, request.path, exc)
            response = self._error(request, "503 Service Unavailable", f"{type(exc).__name__}: {exc}")
        headers = [("Content-Type", response.content_type), ("Content-Length", str(len(response.body)))]
        headers += [("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "same-origin")]
        headers += [("Cache-Control", "no-store"), ("X-Frame-Options", "DENY"), *response.headers]
        start_response(response.status, headers)
        return [response.body]

    def handle(self, request: Request) -> Response:
        if not self.has_auth:
            refusal = _open_refusal(request)
            if refusal is not None:
                raise Refused("403 Forbidden", f"this dashboard has no authentication: {refusal}")
        if not self._authorized(request):
            return Response(
                "401 Unauthorized",
                b"authentication required",
                "text/plain",
                [("WWW-Authenticate", 'Basic realm="taskpg"')] if self.basic_auth else [],
            )
        if request.method == "GET" and self.token and request.query.get("token") == self.token:
            kept = _cookie(TOKEN_COOKIE, _token_cookie(self.token), request.cookie_path)
            return self._redirect(request, request.base + request.path, [kept])
        if request.method == "POST" and request.path.startswith("/actions/"):
            return self._act(request, request.path.removeprefix("/actions/"))
        if request.method not in ("GET", "HEAD"):
            raise Refused("405 Method Not Allowed", f"{request.method} is not served here")
        return self._get(request)

    def _authorized(self, request: Request) -> bool:
        if not self.has_auth:
            return True
        given = request.header("AUTHORIZATION")
        if self.token and (
            _same(given, f"Bearer {self.token}")
            or _same(request.cookies.get(TOKEN_COOKIE), _token_cookie(self.token))
            or _same(request.query.get("token"), self.token)
        ):
            return True
        if self.basic_auth and given.startswith("Basic "):
            try:
                sent = base64.b64decode(given[6:], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                return False
            return _same(sent, self.basic_auth)
        return False

    # -- pages and API ---------------------------------------------------------------------------

    def _get(self, request: Request) -> Response:
        path, store = request.path, self.app.store
        if path == "/api/queue/status":
            return _json(self.app.queue_status())
        if path == "/api/jobs":
            state, filters, offset = self._listing(request)
            jobs = ops.list_jobs(store, state, _queues(filters), filters.get("task") or None, filters.get("q"),
                                 PAGE_SIZE, offset)  # fmt: skip
            return _json([dataclasses.asdict(j) for j in jobs])
        if path == "/favicon.ico":
            return Response("204 No Content", b"", "text/plain")
        if path == "/metrics":
            return Response("200 OK", metrics.queue_metrics(store.queue_depths()).encode(), metrics.CONTENT_TYPE)
        match = _JOB_PATH.fullmatch(path)
        if match:
            job = ops.inspect_job(store, _job_id(match.group(2)))
            if job is None:
                raise Refused("404 Not Found", f"no job {match.group(2)}")
            if match.group(1):
                return _json(dataclasses.asdict(job))
            body = pages.job_page(job, store.children(job.id), request.base, request.csrf)
            return self._page(request, f"Job {job.id}", "jobs", body)
        if path in ("/", ""):
            body = pages.queues_page(self.app.queue_status(), request.base, request.csrf)
            return self._page(request, "Queues", "", body)
        if path == "/jobs":
            state, filters, offset = self._listing(request)
            jobs = ops.list_jobs(store, state, _queues(filters), filters.get("task") or None, filters.get("q"),
                                 PAGE_SIZE, offset)  # fmt: skip
            body = pages.jobs_page(jobs, state.value, filters, offset, PAGE_SIZE, request.base, request.csrf)
            title = "Dead letters" if state is JobState.DEAD else f"Jobs: {state.value}"
            return self._page(request, title, "jobs", body)
        if path == "/workers":
            return self._page(request, "Workers", "workers", pages.workers_page(ops.workers(store)))
        if path == "/schedules":
            schedules = self.app.schedules()
            listed = describe_schedules(store, schedules) if self.app.tasks or schedules else None
            return self._page(request, "Schedules", "schedules", pages.schedules_page(listed))
        raise Refused("404 Not Found", f"nothing at {path}")

    @staticmethod
    def _listing(request: Request) -> tuple[JobState, dict[str, str], int]:
        try:
            state = JobState(request.query.get("state") or JobState.RUNNING.value)
            offset = int(request.query.get("offset") or 0)
        except ValueError:
            raise Refused("400 Bad Request", "state must be a job state and offset a number") from None
        filters = {k: request.query[k].strip() for k in ("queue", "task", "q") if request.query.get(k, "").strip()}
        return state, filters, max(0, offset)

    def _page(self, request: Request, title: str, current: str, body: str) -> Response:
        flash = request.cookies.get(FLASH_COOKIE)
        message, error = (urllib.parse.unquote(flash[1:]), flash.startswith("!")) if flash else (None, False)
        cookies = [_cookie(CSRF_COOKIE, request.csrf, request.cookie_path)] if request.new_csrf else []
        if flash:
            cookies.append(_cookie(FLASH_COOKIE, "", request.cookie_path, max_age=0))
        if request.header("X_TASKPG_PART") == "main":
            text = pages.main(title, body, message, error)
            return Response("200 OK", text.encode(), HTML, cookies)
        nonce = secrets.token_urlsafe(16)
        text = pages.layout(title, body, request.base, current, self.app.schema, message, error, nonce)
        policy = (
            f"default-src 'none'; style-src 'unsafe-inline'; script-src 'nonce-{nonce}'; connect-src 'self'; "
            "img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        )
        return Response("200 OK", text.encode(), HTML, [("Content-Security-Policy", policy), *cookies])

    def _error(self, request: Request, status: str, message: str) -> Response:
        if request.path.startswith("/api/") or request.path == "/metrics":
            return _json({"error": message}, status)
        return Response(status, pages.layout("Error", pages.error_page(message), request.base, "", self.app.schema,
                                             None, True, secrets.token_urlsafe(16)).encode())  # fmt: skip

    # -- actions ---------------------------------------------------------------------------------

    def _act(self, request: Request, name: str) -> Response:
        form = request.form()
        sent, kept = form.get("csrf", ""), request.cookies.get(CSRF_COOKIE, "")
        if not kept or not _same(sent, kept):
            raise Refused("403 Forbidden", "the action lacks a valid CSRF token: reload the page and try again")
        origin = request.header("ORIGIN")
        if origin and urllib.parse.urlsplit(origin).netloc != request.host:
            raise Refused("403 Forbidden", f"an action from another origin ({origin}) is refused")
        store, base = self.app.store, request.base
        queue, job = form.get("queue", ""), form.get("id", "")
        if name == "pause":
            done = control.pause_queue(store, queue)
            return self._done(request, base + "/", f"queue {queue} {'paused' if done else 'was paused already'}")
        if name == "resume":
            done = control.resume_queue(store, queue)
            return self._done(request, base + "/", f"queue {queue} {'resumed' if done else 'was not paused'}")
        if name == "purge":
            count = control.purge(store, [queue])
            return self._done(request, base + "/", f"{count} waiting job(s) of queue {queue} cancelled")
        if name == "retry":
            count = deadletter.retry_dead(store, [_job_id(job)])
            return self._done(request, f"{base}/jobs/{_job_id(job)}", "retried" if count else "not dead: nothing done")
        if name == "cancel":
            cancelled = self.app.AsyncResult(_job_id(job)).revoke()
            return self._done(request, f"{base}/jobs/{_job_id(job)}", "cancelled" if cancelled else "already started")
        if name == "delete":
            count = deadletter.purge_dead(store, 0.0, ids=[_job_id(job)])
            target = f"{base}/jobs?state=dead"
            return self._done(request, target, f"dead job {job} deleted" if count else f"{job} is not a dead job")
        if name == "retry-dead":
            count = deadletter.retry_dead(store, None, queue or None, form.get("task") or None)
            return self._done(request, f"{base}/jobs?state=dead", f"{count} dead job(s) made available again")
        raise Refused("404 Not Found", f"no action {name!r}")

    def _done(self, request: Request, target: str, message: str) -> Response:
        """Back to ``target``, which shows ``message`` once (a cookie, so no URL can forge one)."""
        flash = _cookie(FLASH_COOKIE, "+" + urllib.parse.quote(message), request.cookie_path)
        return self._redirect(request, target, [flash])

    @staticmethod
    def _redirect(request: Request, target: str, cookies: list[tuple[str, str]]) -> Response:
        return Response("303 See Other", b"", "text/plain", [("Location", target), *cookies])


class Request:
    """What the dashboard reads of a WSGI request."""

    def __init__(self, environ: Environ) -> None:
        self.environ = environ
        self.method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        self.base = str(environ.get("SCRIPT_NAME", "")).rstrip("/")
        self.path = str(environ.get("PATH_INFO", "")) or "/"
        self.query = {k: v[-1] for k, v in urllib.parse.parse_qs(str(environ.get("QUERY_STRING", ""))).items()}
        jar = http.cookies.SimpleCookie()
        with contextlib.suppress(http.cookies.CookieError):  # a malformed cookie header reads as no cookies
            jar.load(str(environ.get("HTTP_COOKIE", "")))
        self.cookies = {name: morsel.value for name, morsel in jar.items()}
        self.host = self.header("HOST") or str(environ.get("SERVER_NAME", ""))
        self.new_csrf = not re.fullmatch(r"[0-9a-f]{64}", self.cookies.get(CSRF_COOKIE, ""))
        self.csrf = secrets.token_hex(32) if self.new_csrf else self.cookies[CSRF_COOKIE]

    def header(self, name: str) -> str:
        return str(self.environ.get(f"HTTP_{name}", "") or "")

    @property
    def cookie_path(self) -> str:
        """The path the dashboard's cookies are for: its mount point."""
        return self.base or "/"

    @property
    def host_name(self) -> str:
        """The Host header without its port (and without the brackets of an IPv6 address)."""
        host = self.host
        if host.startswith("["):
            return host[1:].split("]", 1)[0]
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host

    def form(self) -> dict[str, str]:
        try:
            length = int(self.environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > MAX_BODY:
            raise Refused("413 Content Too Large", "the form is too large")
        body = self.environ["wsgi.input"].read(length) if length > 0 else b""
        parsed = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        return {k: v[-1] for k, v in parsed.items()}


def _same(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _cookie(name: str, value: str, path: str = "/", max_age: int | None = None) -> tuple[str, str]:
    """A cookie for the dashboard's own path only (a mounted dashboard's cookies stay out of the host app)."""
    text = f"{name}={value}; Path={path}; HttpOnly; SameSite=Strict"
    return "Set-Cookie", text + (f"; Max-Age={max_age}" if max_age is not None else "")


def _token_cookie(token: str) -> str:
    """What the token cookie holds: a digest of the token (hex, so any token fits a cookie), never the token."""
    return hashlib.sha256(b"taskpg-dashboard:" + token.encode()).hexdigest()


#: Headers a proxy adds: a dashboard without authentication refuses requests that carry one.
FORWARDING_HEADERS = ("FORWARDED", "X_FORWARDED_FOR", "X_FORWARDED_HOST", "X_REAL_IP")


def _open_refusal(request: Request) -> str | None:
    """Why a dashboard without authentication must not answer this request (None when it may): the
    connection must come from this machine, the Host must name it (no DNS rebinding), and no proxy may be
    in between (a proxy on this machine would make the first two true for the whole network)."""
    if not is_loopback(request.host_name):
        return "it answers loopback hosts only"
    remote = str(request.environ.get("REMOTE_ADDR", ""))
    if remote and not is_loopback(remote):
        return f"it answers connections from this machine only, not from {remote}"
    forwarded = [name for name in FORWARDING_HEADERS if request.header(name)]
    if forwarded:
        return "it does not answer through a proxy (configure --token or --basic-auth behind one)"
    return None


def _json(value: Any, status: str = "200 OK") -> Response:
    return Response(status, json.dumps(value, default=str, indent=1).encode(), JSON)


def _job_id(text: str) -> str:
    try:
        return validate_job_id(text)
    except ConfigurationError as exc:
        raise Refused("400 Bad Request", str(exc)) from None


def _queues(filters: dict[str, str]) -> list[str] | None:
    return [filters["queue"]] if filters.get("queue") else None


# -- serving ---------------------------------------------------------------------------------------


class _Server(socketserver.ThreadingMixIn, wsgiref.simple_server.WSGIServer):
    daemon_threads = True


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    timeout = 30  # an idle connection does not pin a thread for ever

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("dashboard: " + format, *args)


def serve(dashboard: Dashboard, host: str = "127.0.0.1", port: int = 8008) -> wsgiref.simple_server.WSGIServer:
    """A threaded HTTP server for the dashboard (call ``serve_forever()`` on it). Binding to an address
    other than loopback needs a token or basic auth."""
    if not dashboard.has_auth and not is_loopback(host):
        raise ConfigurationError(
            f"the dashboard binds to {host} without authentication: pass --token or --basic-auth "
            "(or TASKPG_DASHBOARD_TOKEN / TASKPG_DASHBOARD_AUTH), or bind to 127.0.0.1"
        )
    return wsgiref.simple_server.make_server(host, port, dashboard, _Server, _QuietHandler)


def asgi(dashboard: Dashboard) -> Callable[..., Any]:
    """The dashboard as an ASGI application (mount it in Starlette or FastAPI: ``app.mount("/taskpg",
    asgi(Dashboard(taskpg_app)))``). Each request runs in a worker thread, off the event loop."""

    async def application(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].removeprefix("lifespan.")
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                break
        status, headers, chunks = await asyncio.to_thread(_call_wsgi, dashboard, _environ(scope, body))
        await send({"type": "http.response.start", "status": int(status.split()[0]),
                    "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers]})  # fmt: skip
        await send({"type": "http.response.body", "body": b"".join(chunks)})

    return application


def _environ(scope: dict[str, Any], body: bytes) -> Environ:
    import io

    server = scope.get("server") or ("127.0.0.1", 80)
    environ: Environ = {
        "REQUEST_METHOD": scope["method"],
        "SCRIPT_NAME": scope.get("root_path", ""),
        "PATH_INFO": scope["path"].removeprefix(scope.get("root_path", "")) or "/",
        "QUERY_STRING": scope.get("query_string", b"").decode("latin-1"),
        "SERVER_NAME": str(server[0]),
        "SERVER_PORT": str(server[1]),
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": scope.get("scheme", "http"),
    }
    client = scope.get("client")
    if client:
        environ["REMOTE_ADDR"] = str(client[0])
    for name, value in scope.get("headers", []):
        key = name.decode("latin-1").upper().replace("-", "_")
        if key in ("CONTENT_LENGTH", "CONTENT_TYPE"):
            continue
        text = value.decode("latin-1")
        if f"HTTP_{key}" in environ:  # a repeated header (HTTP/2 sends cookies one per header): joined
            text = environ[f"HTTP_{key}"] + ("; " if key == "COOKIE" else ", ") + text
        environ[f"HTTP_{key}"] = text
    return environ


def _call_wsgi(dashboard: Dashboard, environ: Environ) -> tuple[str, list[tuple[str, str]], Iterable[bytes]]:
    started: list[Any] = []
    chunks = dashboard(environ, lambda status, headers, exc_info=None: started.extend([status, headers]))
    return started[0], started[1], chunks
