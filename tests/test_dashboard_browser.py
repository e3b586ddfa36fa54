"""docs/dashboard.md, in a real browser: Debian's chromium, headless, driven by Playwright (no browser download).

The test enqueues jobs, reads the counts on the queues page, pauses a queue from its button and sees that no
job of it starts while another queue's jobs run, resumes it, retries a dead job from its page and sees it
succeed, and saves screenshots (to TASKPG_SCREENSHOT_DIR when set, else the test's temporary directory).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from taskpg.dashboard import Dashboard, serve

if TYPE_CHECKING:
    from collections.abc import Iterator

    import psycopg

    from taskpg import TaskPG

CHROMIUM = os.environ.get("TASKPG_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev dependency group")


@pytest.fixture
def browser() -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        if os.environ.get("TASKPG_NO_SKIPS"):
            pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (.ci/run does)")
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    with playwright_api.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def dashboard_url(app: TaskPG) -> Iterator[str]:
    server = serve(Dashboard(app), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def _shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("TASKPG_SCREENSHOT_DIR") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_queues_pause_and_retry_in_a_real_browser(
    app: TaskPG, run_worker: Any, db: psycopg.Connection, browser: Any, dashboard_url: str, tmp_path: Path
) -> None:
    broken = threading.Event()
    broken.set()
    started: list[str] = []

    @app.task(name="browser.charge", max_retries=0)
    def charge(order: int) -> str:
        if broken.is_set():
            raise RuntimeError(f"card declined for order {order}")
        return f"charged {order}"

    @app.task(name="browser.mail", queue="mail")
    def mail(n: int) -> int:
        started.append(f"mail{n}")
        return n

    @app.task(name="browser.report", queue="reports")
    def report(n: int) -> int:
        return n

    dead = charge.delay(42)
    with run_worker(app, queues=["default"]):
        dead.get(timeout=15, propagate=False)
    for n in range(3):
        mail.delay(n)
    report.apply_async((1,), countdown=3600)

    page = browser.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() of purge and delete buttons
    page.goto(dashboard_url + "/")
    mail_row = page.locator("tr", has=page.locator("td", has_text=re.compile(r"^mail")))
    assert mail_row.locator("td").nth(1).inner_text() == "3"  # waiting
    reports_row = page.locator("tr", has=page.locator("td", has_text=re.compile(r"^reports")))
    assert reports_row.locator("td").nth(2).inner_text() == "1"  # scheduled
    default_row = page.locator("tr", has=page.locator("td", has_text=re.compile(r"^default")))
    assert default_row.locator("td").nth(5).inner_text() == "1"  # dead
    page.screenshot(path=str(_shots(tmp_path) / "dashboard-queues.png"), full_page=True)

    # Pause mail from its button: the page says so, and no job of it starts while a worker serves both queues.
    mail_row.get_by_role("button", name="Pause").click()
    page.wait_for_selector("text=queue mail paused")
    assert "paused" in mail_row.locator("td").first.inner_text()
    assert app.paused_queues() == ["mail"]
    with run_worker(app, queues=["mail", "reports"], poll_interval=600):
        assert report.delay(2).get(timeout=15) == 2  # the worker claims; mail's jobs stay where they are
        assert started == []
        assert db.execute(
            f"SELECT count(*) FROM \"{app.schema}\".jobs WHERE queue = 'mail' AND state = 'available'"
        ).fetchone() == (3,)
        page.reload()
        mail_row.get_by_role("button", name="Resume").click()
        page.wait_for_selector("text=queue mail resumed")
        page.wait_for_function(
            "() => [...document.querySelectorAll('tr')].some(r => r.cells[0]?.innerText.startsWith('mail') "
            "&& r.cells[4].innerText === '3')",
            timeout=15_000,
        )  # the page refreshes itself: 3 succeeded
    assert sorted(started) == ["mail0", "mail1", "mail2"]

    # A dead job from the dead-letter list: its page shows the error; Retry runs it again, and it succeeds.
    page.goto(dashboard_url + "/jobs?state=dead")
    page.get_by_role("link", name=dead.id).click()
    assert "card declined for order 42" in page.inner_text("main")
    assert "Traceback (most recent call last)" in page.inner_text("main")
    broken.clear()
    with run_worker(app, queues=["default"]):
        page.get_by_role("button", name="Retry").click()
        page.wait_for_selector("text=retried")
        assert dead.get(timeout=15) == "charged 42"
        page.wait_for_function("() => document.querySelector('main').innerText.includes('charged 42')", timeout=15_000)
    page.screenshot(path=str(_shots(tmp_path) / "dashboard-job.png"), full_page=True)
    page.close()


def test_a_job_with_a_script_in_its_arguments_renders_inert_in_the_browser(
    app: TaskPG, browser: Any, dashboard_url: str
) -> None:
    @app.task(name="browser.evil")
    def evil(text: str) -> None:
        return None

    handle = evil.delay('<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script>')
    page = browser.new_page()
    page.goto(f"{dashboard_url}/jobs/{handle.id}")
    assert "window.__pwned = 2" in page.inner_text("main")  # shown as text
    assert page.evaluate("() => window.__pwned") is None  # and never run
    assert page.locator("main img").count() == 0
    page.close()
