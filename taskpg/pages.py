"""The dashboard's HTML: plain functions from data to escaped text (no template engine, no JS build).

Every value that comes from a job (arguments, results, error messages, tracebacks, task and queue
names) goes through ``html.escape`` by way of ``_e``/``_cell``: a job whose arguments hold ``<script>``
renders inert text. Actions are POST forms carrying the CSRF token; the only script (no inline event
handlers: the Content-Security-Policy allows none) asks the confirmations of destructive buttons and
re-fetches the page's ``<main>`` every few seconds while nobody is typing into a form.
"""

from __future__ import annotations

import datetime as dt
import html
import json
import urllib.parse
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from .job import JobRecord
    from .store import JobSummary, WorkerRow

#: The job states the jobs page can show, in the order of its tabs.
TABS = ("available", "scheduled", "running", "succeeded", "dead", "cancelled")
#: Seconds between the page's refreshes of its content.
REFRESH_SECONDS = 3

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0;color:#1d2330;background:#f6f7f9}
header{background:#1d2330;color:#fff;padding:.6em 1.2em;display:flex;gap:1.4em;align-items:center}
header a{color:#cfd6e4;text-decoration:none}header a.on,header a:hover{color:#fff}
header b{font-size:1.1em;margin-right:1em}main{padding:1em 1.2em}
table{border-collapse:collapse;background:#fff;width:100%;margin:.6em 0}
th,td{border-bottom:1px solid #e3e6eb;padding:.35em .6em;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#fff;border:1px solid #e3e6eb;padding:.6em;overflow:auto;max-height:30em;white-space:pre-wrap}
form{display:inline}button{cursor:pointer;margin:0 .2em}.paused{color:#b0470c;font-weight:600}
.flash{background:#e7f4e8;border:1px solid #9ccf9f;padding:.5em .8em}.error{background:#fbe9e7;border-color:#e6a39a}
.tabs a{margin-right:1em}.tabs a.on{font-weight:600}.muted{color:#6b7385}
"""

SCRIPT = f"""
document.addEventListener("submit", (event) => {{
  const question = event.target.dataset.confirm;
  if (question && !confirm(question)) event.preventDefault();
}});
setInterval(async () => {{
  const active = document.activeElement;
  if (document.hidden || (active && active.form)) return;
  const response = await fetch(location.href, {{headers: {{"X-Taskpg-Part": "main"}}}});
  if (response.ok) document.querySelector("main").innerHTML = await response.text();
}}, {REFRESH_SECONDS * 1000});
"""

NAV = (("", "Queues"), ("jobs", "Jobs"), ("jobs?state=dead", "Dead letters"), ("workers", "Workers"),
       ("schedules", "Schedules"))  # fmt: skip


def _e(value: Any) -> str:
    """A value as escaped text (None as empty)."""
    return "" if value is None else html.escape(str(value), quote=True)


def _when(value: dt.datetime | None) -> str:
    return "" if value is None else _e(value.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))


def _age(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _json(value: Any) -> str:
    return _e(json.dumps(value, indent=2, default=str))


def _link(base: str, path: str, text: str, **query: Any) -> str:
    shown = {k: v for k, v in query.items() if v not in (None, "")}
    target = f"{base}/{path}" + (f"?{urllib.parse.urlencode(shown)}" if shown else "")
    return f'<a href="{_e(target)}">{_e(text)}</a>'


def action(base: str, csrf: str, name: str, label: str, confirm: str | None = None, **fields: str) -> str:
    """A one-button POST form for an action (with the CSRF token, and a confirm() when asked)."""
    hidden = "".join(f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">' for k, v in fields.items())
    ask = f' data-confirm="{_e(confirm)}"' if confirm else ""
    return (
        f'<form method="post" action="{_e(base)}/actions/{_e(name)}"{ask}>'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">{hidden}<button>{_e(label)}</button></form>'
    )


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = ()) -> str:
    """A table of already escaped cells; columns in ``numeric`` are right-aligned."""
    right = set(numeric)
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if i in right else ''}>{cell}</td>" for i, cell in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def layout(
    title: str, content: str, base: str, current: str, schema: str, flash: str | None, error: bool, nonce: str
) -> str:
    """A whole page: header with the navigation, the flash message, ``content`` inside <main>, and the
    refresh script (allowed by its ``nonce`` in the page's Content-Security-Policy)."""
    links = "".join(
        f'<a href="{_e(base)}/{_e(path)}"{" class=on" if path.split("?")[0] == current else ""}>{_e(text)}</a>'
        for path, text in NAV
    )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)} · taskpg</title><style>{STYLE}</style></head><body>"
        f"<header><b>taskpg</b>{links}<span class=muted>schema {_e(schema)}</span></header>"
        f'<main>{main(title, content, flash, error)}</main><script nonce="{_e(nonce)}">{SCRIPT}</script></body></html>'
    )


def main(title: str, content: str, flash: str | None, error: bool) -> str:
    """The part of a page that the refresh replaces."""
    note = f'<p class="flash{" error" if error else ""}" role="status">{_e(flash)}</p>' if flash else ""
    return f"<h1>{_e(title)}</h1>{note}{content}"


def queues_page(status: Mapping[str, Mapping[str, Any]], base: str, csrf: str) -> str:
    """Per queue: the counts, the oldest waiting job, the last minute's throughput, limits, pause state."""
    rows = []
    for queue, s in status.items():

        def count(name: str, state: str, queue: str = queue, s: Mapping[str, Any] = s) -> str:
            shown = ("~" if name in s.get("estimated", ()) else "") + f"{s[name]:,}"
            return _link(base, "jobs", shown, state=state, queue=queue)

        pause = (
            action(base, csrf, "resume", "Resume", queue=queue)
            if s["paused"]
            else action(base, csrf, "pause", "Pause", queue=queue)
        )
        purge = action(base, csrf, "purge", "Purge waiting", f"Cancel every waiting job of queue {queue}?", queue=queue)
        rows.append(
            [
                _e(queue) + (' <span class="paused">paused</span>' if s["paused"] else ""),
                count("waiting", "available"),
                count("delayed", "scheduled"),
                count("active", "running"),
                count("completed", "succeeded"),
                count("failed", "dead"),
                count("cancelled", "cancelled"),
                _age(s["oldest_waiting_seconds"]),
                f"{s['finished_last_minute']:,}/min",
                _e(s["rate_limit"] or "—"),
                _e(s["concurrency"] or "—"),
                pause + purge,
            ]
        )
    header = ["queue", "waiting", "scheduled", "running", "succeeded", "dead", "cancelled", "oldest waiting",
              "throughput", "rate limit", "concurrency cap", ""]  # fmt: skip
    note = '<p class="muted">~ marks counts estimated from a sample (over 50,000 jobs in that state).</p>'
    return (_table(header, rows, numeric=range(1, 9)) if rows else "<p>No queue has jobs yet.</p>") + note


def jobs_page(
    jobs: Sequence[JobSummary],
    state: str,
    filters: Mapping[str, str],
    offset: int,
    limit: int,
    base: str,
    csrf: str,
) -> str:
    """Jobs of one state with the filter form, pages and (for dead and waiting jobs) bulk actions."""
    tabs = " ".join(
        f'<a class="{"on" if t == state else ""}" href="{_e(base)}/jobs?'
        f'{_e(urllib.parse.urlencode({"state": t, **{k: v for k, v in filters.items() if v}}))}">{_e(t)}</a>'
        for t in TABS
    )
    form = (
        f'<form method="get" action="{_e(base)}/jobs"><input type="hidden" name="state" value="{_e(state)}">'
        f'<input name="queue" placeholder="queue" value="{_e(filters.get("queue", ""))}"> '
        f'<input name="task" placeholder="task" value="{_e(filters.get("task", ""))}"> '
        f'<input name="q" placeholder="id starts with" value="{_e(filters.get("q", ""))}"> '
        "<button>Filter</button></form>"
    )
    rows = [
        [
            _link(base, f"jobs/{j.id}", j.id),
            _e(j.task),
            _e(j.queue),
            f"{j.attempt}/{j.max_attempts}",
            _when(j.finished_at or j.started_at or j.run_at),
            _e(f"{j.error_type}: {j.error_message}" if j.error_type else ""),
        ]
        for j in jobs
    ]
    table = _table(["id", "task", "queue", "attempt", "when", "last error"], rows) if rows else "<p>No jobs.</p>"
    pages = []
    if offset > 0:
        pages.append(_link(base, "jobs", "← newer" if state in ("succeeded", "dead", "cancelled") else "← previous",
                           state=state, offset=max(0, offset - limit), **filters))  # fmt: skip
    if len(jobs) == limit:
        pages.append(_link(base, "jobs", "more →", state=state, offset=offset + limit, **filters))
    bulk = ""
    queue = filters.get("queue") or ""
    if state == "dead" and rows:
        bulk = action(base, csrf, "retry-dead", "Retry all of these", "Retry every dead job of these filters?",
                      queue=queue, task=filters.get("task", ""))  # fmt: skip
    return f'<p class="tabs">{tabs}</p>{form}{bulk}{table}<p>{" ".join(pages)}</p>'


def job_page(job: JobRecord, children: Sequence[str], base: str, csrf: str) -> str:
    """One job: its fields, its place in a canvas (the job whose end started it, the jobs its end started),
    arguments, result or progress, and every attempt's error with its traceback."""
    actions = []
    if job.state == "dead":
        actions.append(action(base, csrf, "retry", "Retry", id=job.id))
        actions.append(action(base, csrf, "delete", "Purge", f"Delete dead job {job.id}?", id=job.id))
    if job.state in ("available", "scheduled"):
        actions.append(action(base, csrf, "cancel", "Cancel", f"Cancel job {job.id}?", id=job.id))
    fields = [
        ("task", _e(job.task)),
        ("queue", _link(base, "jobs", job.queue, state=job.state, queue=job.queue)),
        ("state", _e(job.state)),
        ("attempt", f"{job.attempt} of {job.max_attempts}" + (f", {job.snoozes} snooze(s)" if job.snoozes else "")),
        ("priority", _e(job.priority)),
        ("created", _when(job.created_at)),
        ("run at", _when(job.run_at)),
        ("started", _when(job.started_at)),
        ("finished", _when(job.finished_at)),
        ("worker", _e(job.worker_id)),
        ("after job", _link(base, f"jobs/{job.parent_id}", job.parent_id) if job.parent_id else ""),
        ("then jobs", " ".join(_link(base, f"jobs/{child}", child) for child in children)),
    ]
    info = _table(["", ""], [[f"<b>{_e(k)}</b>", v] for k, v in fields])
    parts = [
        " ".join(actions),
        info,
        "<h2>Arguments</h2>",
        f"<pre>{_json({'args': job.args, 'kwargs': job.kwargs})}</pre>",
    ]
    if job.progress is not None:
        parts += ["<h2>Progress</h2>", f"<pre>{_json(job.progress)}</pre>"]
    if job.result is not None or job.state == "succeeded":
        parts += ["<h2>Result</h2>", f"<pre>{_json(job.result)}</pre>"]
    parts.append(f"<h2>Attempts with an error ({len(job.errors)})</h2>")
    for error in job.errors:
        head = f"attempt {_e(error.get('attempt'))} · {_e(error.get('at'))} · {_e(error.get('type'))}"
        parts.append(
            f"<details open><summary>{head}: {_e(error.get('message'))}</summary>"
            f"<pre>{_e(error.get('traceback') or '(no traceback)')}</pre></details>"
        )
    return "".join(parts)


def workers_page(workers: Sequence[WorkerRow]) -> str:
    rows = [
        [
            _e(w.id),
            _e(w.hostname),
            _e(w.pid),
            _e(", ".join(w.queues)),
            _e(w.concurrency),
            _e(w.in_flight),
            _when(w.started_at),
            _when(w.heartbeat_at),
            "alive" if w.alive else '<span class="paused">silent</span>',
        ]
        for w in workers
    ]
    header = ["id", "host", "pid", "queues", "concurrency", "in flight", "started", "last heartbeat", "state"]
    return _table(header, rows, numeric=(2, 4, 5)) if rows else "<p>No worker is registered.</p>"


def schedules_page(schedules: Sequence[Mapping[str, Any]] | None) -> str:
    if schedules is None:
        return "<p>Start the dashboard with <code>-A MODULE</code> to see your app's periodic schedules.</p>"
    rows = [
        [_e(s["name"]), _e(s["task"]), _e(s["when"]), _e(s["catch_up"]), _when(s["last"]) or "never", _when(s["next"])]
        for s in schedules
    ]
    header = ["schedule", "task", "when", "catch-up", "last tick", "next tick"]
    return _table(header, rows) if rows else "<p>The app has no periodic schedule.</p>"


def error_page(message: str) -> str:
    return f"<p>{_e(message)}</p>"
