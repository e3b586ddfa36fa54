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


# key=value form: a value is single-quoted (with backslash escapes) or runs to the next space (libpq's rules).
_KEYWORD_PASSWORD = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'?|\S+)")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#]*")


def redact(dsn: str) -> str:
    """The DSN with any password replaced by ``***``, for logs and error messages: in a URL's user info (up to
    its last ``@``, so a password holding ``@`` or ``:`` does not leak) and its query, and as ``password=``
    in the key=value form, quoted or not."""
    scheme, sep, rest = dsn.partition("://")
    if not sep:
        return _KEYWORD_PASSWORD.sub(r"\1***", dsn)
    base, query_sep, query = rest.partition("?")
    userinfo, at, host = base.rpartition("@")
    if at and ":" in userinfo:
        base = f"{userinfo.split(':', 1)[0]}:***@{host}"
    redacted = f"{scheme}://{base}{query_sep}{query}"
    return _QUERY_PASSWORD.sub(r"\1***", redacted)
