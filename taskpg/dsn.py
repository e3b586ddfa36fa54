"""Where the database is: DSN resolution, libpq form, redaction for logs."""

from __future__ import annotations

import os
import re

_DRIVER_SUFFIX = re.compile(r"^(postgres(?:ql)?)\+\w+://")


def configured_dsn(explicit: str | None = None) -> str | None:
    """The DSN from the argument, then TASKPG_DSN, then DATABASE_URL; None when none is set."""
    return explicit or os.environ.get("TASKPG_DSN") or os.environ.get("DATABASE_URL") or None


def libpq_dsn(dsn: str) -> str:
    """Accept SQLAlchemy-style URLs (``postgresql+psycopg://``) as well as libpq ones."""
    return _DRIVER_SUFFIX.sub(r"\1://", dsn)


def redact(dsn: str) -> str:
    """The DSN with any password replaced, for logs and error messages."""
    dsn = re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)\S+", r"\1***", dsn)
