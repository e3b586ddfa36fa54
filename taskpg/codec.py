"""JSON encoding of job arguments and results. JSON only: taskpg never unpickles anything."""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any

from .exceptions import PayloadDecodeError, SerializationError

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

DEFAULT_MAX_PAYLOAD_BYTES = 1_000_000
#: The highest ``max_payload_bytes`` can be: the most a jsonb value holds (larger values Postgres
#: refuses, and a statement over 1 GB closes the connection).
MAX_PAYLOAD_BYTES = 268_435_455
#: The most JSON text a job's headers may take (metadata, such as a traceparent, not data).
MAX_HEADERS_BYTES = 8192

_encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def dumps(value: Any) -> str:
    """Encode one JSON value; raises TypeError/ValueError for values JSON cannot hold."""
    return _encoder.encode(value)


def loads(text: str | bytes) -> Any:
    """Decode one JSON value; raises PayloadDecodeError on malformed input."""
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PayloadDecodeError(f"payload is not valid JSON: {exc}") from exc


def _describe_bad_argument(task: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str:
    for index, value in enumerate(args):
        try:
            dumps(value)
        except (TypeError, ValueError) as exc:
            return f"task {task!r}: positional argument {index} ({type(value).__name__}) is not JSON: {exc}"
    for key, value in kwargs.items():
        if not isinstance(key, str):
            return f"task {task!r}: keyword names must be strings, got {key!r}"
        try:
            dumps(value)
        except (TypeError, ValueError) as exc:
            return f"task {task!r}: keyword argument {key!r} ({type(value).__name__}) is not JSON: {exc}"
    return f"task {task!r}: arguments are not JSON-serialisable"


_NUL_ESCAPE = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")


def _has_nul(json_text: str) -> bool:
    """Whether JSON text encodes a NUL character (jsonb and text columns cannot hold one)."""
    return "\\u0000" in json_text and _NUL_ESCAPE.search(json_text) is not None


def storable_text(text: str) -> str:
    """Text Postgres can hold: NUL characters written as \\x00, lone surrogates as \\udXXX escapes."""
    text = text.replace("\x00", "\\x00")
    if not text.isascii() and _has_lone_surrogate(text):
        text = text.encode("utf-8", "backslashreplace").decode()
    return text


def _has_lone_surrogate(text: str) -> bool:
    """Whether text holds a code point UTF-8 cannot encode (only checked for non-ASCII text)."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return True
    return False


def encode_arguments(
    task: str,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    max_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> tuple[str, str]:
    """Encode args and kwargs as two JSON texts, naming the task and argument on failure.

    On every enqueue's path: no kwargs cost no encode, and the UTF-8 size is measured only when the
    text could be over the limit (a character takes at most 4 bytes).
    """
    try:
        args_json = dumps(args if isinstance(args, (list, tuple)) else list(args))
        kwargs_json = dumps(kwargs if isinstance(kwargs, dict) else dict(kwargs)) if kwargs else "{}"
    except (TypeError, ValueError) as exc:
        raise SerializationError(_describe_bad_argument(task, args, kwargs)) from exc
    if kwargs and any(not isinstance(key, str) for key in kwargs):
        raise SerializationError(_describe_bad_argument(task, args, kwargs))
    if _has_nul(args_json) or _has_nul(kwargs_json):
        raise SerializationError(
            f"task {task!r}: arguments contain a NUL character (\\u0000), which Postgres cannot store"
        )
    if not (args_json.isascii() and kwargs_json.isascii()) and _has_lone_surrogate(args_json + kwargs_json):
        raise SerializationError(
            f"task {task!r}: arguments contain a lone surrogate (U+D800-U+DFFF, e.g. from bytes decoded with"
            " 'surrogateescape'), which is not UTF-8: Postgres cannot store it"
        )
    size = len(args_json) + len(kwargs_json)
    if size * 4 > max_bytes:
        size = len(args_json.encode()) + len(kwargs_json.encode())
    if size > max_bytes:
        raise SerializationError(
            f"task {task!r}: arguments take {size} bytes as JSON, over the limit of {max_bytes} bytes"
        )
    return args_json, kwargs_json


def encode_result(value: Any) -> str:
    """Encode a task's return value; non-JSON values become their repr, tagged so."""
    try:
        return dumps(value)
    except (TypeError, ValueError):
        return dumps({"__taskpg_unserialisable__": repr(value)})
