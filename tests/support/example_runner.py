"""Running an example program as its own process, as a user would (shared by the example tests)."""

from __future__ import annotations

import os
import subprocess
import sys

from .paths import EXAMPLES


def run_example(name: str, *args: str, timeout: float = 180, **env: str) -> str:
    """Run ``examples/<name>`` with extra environment variables; returns its stdout (fails on exit != 0)."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout
