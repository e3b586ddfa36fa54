"""Where the repository, the tests and this folder are (child processes find the task modules here)."""

from __future__ import annotations

from pathlib import Path

SUPPORT = Path(__file__).resolve().parent
TESTS = SUPPORT.parent
REPO = TESTS.parent
EXAMPLES = REPO / "examples"
