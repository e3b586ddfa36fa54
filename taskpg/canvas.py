"""Celery's canvas on Postgres: signatures, ``chain``, ``group``, ``chord``, ``link=``/``link_error=``.

A canvas is planned here, in the caller, into *job templates*: JSON rows with their ids chosen up front (so
every handle exists at once) and the options of their tasks resolved. The first jobs are written at once, in
one transaction (the caller's, with ``session=``/``connection=``); the rest wait in the ``links`` column of the
job that comes before them, and chords in the ``chords`` table. Postgres carries the canvas on: a trigger on the
jobs table inserts the next jobs in the very transaction that writes an outcome (migration 0010), so no
callback is lost if a worker dies after its task returned, and a chord's body starts exactly once.

Celery's rules, kept: arguments given at call time and a parent's result are *prepended* to a signature's own
(``add.s(2).delay(8)`` is ``add(8, 2)``); an immutable signature (``si``) takes neither; options travel with the
signature; ``group | sig`` and a group followed by more steps in a chain become a chord. Canvas jobs are written
straight to Postgres: not through the Redis buffer, and without the throttles and unique keys of their tasks.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from . import codec
from .connections import caller_connection
from .exceptions import ConfigurationError
from .job import new_job_id
from .options import TaskOptions, validate_priority, validate_queue_name
from .result import AsyncResult, GroupResult

if TYPE_CHECKING:
    from .store import Store

#: Options a signature may carry (the rest of ``apply_async``'s keywords are refused, not ignored).
SIGNATURE_OPTIONS = frozenset(
    {
        "countdown",
        "eta",
        "expires",
        "queue",
        "priority",
        "task_id",
        "link",
        "link_error",
        "session",
        "connection",
        "via",
    }
)
#: The built-in tasks of map/starmap/chunks.
MAP_TASK = "taskpg.map"
STARMAP_TASK = "taskpg.starmap"
#: Options that only the first jobs of a canvas take (the others start when their parents end).
START_OPTIONS = frozenset({"countdown", "eta"})


class CanvasHost(Protocol):
    """What planning a canvas needs from its app (``TaskPG`` is one)."""

    default_queue: str
    max_payload_bytes: int

    @property
    def tasks(self) -> Mapping[str, Any]: ...

    @property
    def store(self) -> Store: ...

    def send_task(
        self, name: str, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> AsyncResult: ...


class Signature(dict[str, Any]):
    """A task call that can be passed around (Celery's ``signature``): the task's name, arguments and
    options, as a dict that JSON keeps. ``add.s(2, 2)``, ``add.si(2, 2)`` (immutable), ``add.signature(...)``."""

    def __init__(
        self,
        task: Any,
        args: Sequence[Any] | None = None,
        kwargs: Mapping[str, Any] | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        immutable: bool = False,
        subtask_type: str | None = None,
        app: CanvasHost | None = None,
    ) -> None:
        name = task if isinstance(task, str) else getattr(task, "name", None)
        if not isinstance(name, str):
            raise ConfigurationError(f"signature of {task!r}: expected a task or a task name")
        unknown = sorted(set(options or {}) - SIGNATURE_OPTIONS)
        if unknown:
            raise ConfigurationError(f"signature of {name}: unknown option(s) {', '.join(unknown)}")
        super().__init__(
            task=name,
            args=list(args or ()),
            kwargs=dict(kwargs or {}),
            options=dict(options or {}),
            subtask_type=subtask_type,
            immutable=bool(immutable),
        )
        self._app = app if app is not None else getattr(task, "app", None)

    # -- fields ----------------------------------------------------------------------------------

    @property
    def task(self) -> str:
        return str(self["task"])

    @property
    def args(self) -> list[Any]:
        return list(self["args"])

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self["kwargs"])

    @property
    def options(self) -> dict[str, Any]:
        return dict(self["options"])

    @property
    def immutable(self) -> bool:
        return bool(self["immutable"])

    @property
    def subtask_type(self) -> str | None:
        return self.get("subtask_type")

    @property
    def app(self) -> CanvasHost:
        if self._app is None:
            raise ConfigurationError(f"signature of {self.task} has no app: make it with a task (task.s(...))")
        return self._app

    @property
    def id(self) -> str | None:
        """The job id this signature will have (set by ``freeze()`` or ``set(task_id=...)``)."""
        value = self["options"].get("task_id")
        return None if value is None else str(value)

    # -- building --------------------------------------------------------------------------------

    def clone(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        """A copy with ``args`` prepended (unless immutable), ``kwargs`` and ``options`` merged in."""
        twin = copy.deepcopy(self)
        twin._app = self._app
        if not self.immutable:
            twin["args"] = list(args or ()) + twin["args"]
            twin["kwargs"] = {**twin["kwargs"], **(kwargs or {})}
        twin.set(**options)
        return twin

    def set(self, **options: Any) -> Any:
        """Add or change options (queue, priority, countdown...); returns the signature itself."""
        unknown = sorted(set(options) - SIGNATURE_OPTIONS)
        if unknown:
            raise ConfigurationError(f"signature of {self.task}: unknown option(s) {', '.join(unknown)}")
        self["options"].update(options)
        return self

    def set_immutable(self, immutable: bool) -> None:
        self["immutable"] = bool(immutable)

    def link(self, callback: Signature) -> Signature:
        """Run ``callback`` with this task's result once it succeeds; returns ``callback``. (On a chain, group
        or chord it is refused when enqueued: link the last task instead.)"""
        self["options"]["link"] = [*_as_list(self["options"].get("link")), callback]
        return callback

    def link_error(self, errback: Signature) -> Signature:
        """Run ``errback`` with this task's job id if it ends dead or revoked; returns ``errback``."""
        self["options"]["link_error"] = [*_as_list(self["options"].get("link_error")), errback]
        return errback

    on_error = link_error

    def freeze(self, id: str | None = None) -> AsyncResult:
        """Choose the job id now (kept by every later call) and return its handle."""
        if self.subtask_type is not None:
            raise ConfigurationError(f"{self!r}: freeze() takes a task signature (the handle comes from apply_async)")
        self["options"].setdefault("task_id", id or new_job_id())
        return AsyncResult(self.app, str(self["options"]["task_id"]), self.task)

    # -- calling ---------------------------------------------------------------------------------

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """``apply_async(args, kwargs)``: call-time arguments prepended to the signature's."""
        return self.apply_async(args, kwargs)

    def apply_async(
        self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any
    ) -> Any:
        """Enqueue: ``AsyncResult`` for a task or a chain, ``GroupResult`` for a group."""
        return apply(self.clone(args, kwargs), options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the task here, now (Celery: calling a signature calls the function)."""
        merged = self.clone(args, kwargs)
        task = self.app.tasks.get(self.task)
        if task is None:
            raise ConfigurationError(f"task {self.task!r} is not registered in this process")
        return task(*merged.args, **merged.kwargs)

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature):
            return chain(self, other)
        return NotImplemented

    def __repr__(self) -> str:
        args = ", ".join([*(repr(a) for a in self.args), *(f"{k}={v!r}" for k, v in self.kwargs.items())])
        return f"{self.task}({args}){'!' if self.immutable else ''}"

    def __deepcopy__(self, memo: dict[int, Any]) -> Signature:
        twin = type(self).__new__(type(self))
        dict.__init__(twin, {k: _copy_value(v, memo) for k, v in self.items()})
        twin._app = self._app
        return twin


class chain(Signature):
    """Run tasks one after the other, each receiving its parent's result (``a.s() | b.s() | c.s()``). A
    step that fails stops the chain: the steps after it never run, and ``get()`` raises its error."""

    def __init__(self, *tasks: Any, app: CanvasHost | None = None, **options: Any) -> None:
        steps = list(tasks[0]) if len(tasks) == 1 and not isinstance(tasks[0], Signature) else list(tasks)
        if not steps:
            raise ConfigurationError("chain() needs at least one task")
        host = app or _first_app(steps)
        super().__init__("taskpg.chain", (), {"tasks": steps}, options, subtask_type="chain", app=host)

    @property
    def tasks(self) -> list[Signature]:
        return list(self["kwargs"]["tasks"])

    def clone(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        twin: chain = copy.deepcopy(self)
        if args or kwargs:
            first, *rest = twin.tasks
            twin["kwargs"]["tasks"] = [first.clone(args, kwargs), *rest]
        twin.set(**options)
        return twin

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``chain(...)()``: enqueue, the arguments going to the first step."""
        return self.apply_async(args, kwargs)

    def __or__(self, other: Any) -> Any:
        if isinstance(other, chain):
            return chain(*self.tasks, *other.tasks, app=self._app)
        if isinstance(other, Signature):
            return chain(*self.tasks, other, app=self._app)
        return NotImplemented

    def __repr__(self) -> str:
        return " | ".join(repr(t) for t in self.tasks)


class group(Signature):
    """Run tasks in parallel; ``apply_async`` returns a ``GroupResult`` whose ``get()`` lists their results in
    order. ``group(...)(10)`` gives 10 as the first argument of every member; ``group | sig`` is a chord."""

    def __init__(self, *tasks: Any, app: CanvasHost | None = None, **options: Any) -> None:
        members = list(tasks[0]) if len(tasks) == 1 and not isinstance(tasks[0], Signature) else list(tasks)
        super().__init__(
            "taskpg.group", (), {"tasks": members}, options, subtask_type="group", app=app or _first_app(members)
        )

    @property
    def tasks(self) -> list[Signature]:
        return list(self["kwargs"]["tasks"])

    def clone(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        twin: group = copy.deepcopy(self)
        if args or kwargs:
            twin["kwargs"]["tasks"] = [m.clone(args, kwargs) for m in twin.tasks]
        twin.set(**options)
        return twin

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Celery's ``group(...)(10)``: enqueue with 10 prepended to every member's arguments."""
        return self.apply_async(args, kwargs)

    def __or__(self, other: Any) -> Any:
        if isinstance(other, Signature):
            return chord(self.tasks, other, app=self._app)
        return NotImplemented

    def __repr__(self) -> str:
        return f"group({', '.join(repr(t) for t in self.tasks)})"


class chord(Signature):
    """A group (the header) whose results, in order, are the first argument of the body, which runs once every
    member succeeded: exactly once, even when members end at the same moment on different workers. A member
    that ends dead or revoked fails the chord at once: the body never runs, and ``get()`` raises ChordError."""

    def __init__(
        self, header: Any, body: Signature | None = None, app: CanvasHost | None = None, **options: Any
    ) -> None:
        members = list(header.tasks if isinstance(header, group) else header)
        super().__init__(
            "taskpg.chord",
            (),
            {"header": members, "body": body},
            options,
            subtask_type="chord",
            app=app or _first_app([*members, *([body] if body is not None else [])]),
        )

    @property
    def header(self) -> list[Signature]:
        return list(self["kwargs"]["header"])

    @property
    def body(self) -> Signature | None:
        body = self["kwargs"]["body"]
        return None if body is None else body

    def clone(self, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, **options: Any) -> Any:
        twin: chord = copy.deepcopy(self)
        if args or kwargs:
            twin["kwargs"]["header"] = [m.clone(args, kwargs) for m in twin.header]
        twin.set(**options)
        return twin

    def __call__(self, body: Signature | None = None, **options: Any) -> Any:
        """Enqueue: ``chord(header, body)()``, or ``chord(header)(body)`` with the body given here."""
        if body is None:
            return self.apply_async(**options)
        return chord(self.header, body, app=self._app).apply_async(**options)

    def __repr__(self) -> str:
        return f"chord([{', '.join(repr(t) for t in self.header)}], {self.body!r})"


class chunks(group):
    """``task.chunks(items, n)``: the items (argument tuples) cut into parts of ``n``, each part one job that
    calls the task for each of its items in order; a group of those jobs, whose ``get()`` is a list of lists."""

    def __init__(self, task: Any, items: Iterable[Sequence[Any]], n: int, app: CanvasHost | None = None) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigurationError(f"chunks(..., {n!r}): the size of a part is a whole number >= 1")
        listed = [list(item) for item in items]
        host = app or getattr(task, "app", None)
        parts = [listed[i : i + n] for i in range(0, len(listed), n)]
        super().__init__(*[starmap(task, part, host) for part in parts], app=host)

    def group(self) -> group:
        """The same jobs as a plain group."""
        return group(*self.tasks, app=self._app)


def map(task: Any, items: Iterable[Any], app: CanvasHost | None = None) -> Signature:
    """``task.map(items)``: one job calling the task with each item as its argument; its result is the list."""
    return _mapped(MAP_TASK, task, list(items), app)


def starmap(task: Any, items: Iterable[Sequence[Any]], app: CanvasHost | None = None) -> Signature:
    """``task.starmap(items)``: one job calling ``task(*item)`` for each item; its result is the list."""
    return _mapped(STARMAP_TASK, task, [list(item) for item in items], app)


def _mapped(builtin: str, task: Any, items: list[Any], app: CanvasHost | None) -> Signature:
    name = task if isinstance(task, str) else task.name
    queue = getattr(getattr(task, "options", None), "queue", None)
    return Signature(builtin, [name, items], options={"queue": queue} if queue else {}, app=app or task.app)


def register_builtins(app: Any) -> None:
    """The tasks behind ``map``, ``starmap`` and ``chunks``, registered in every app (so every worker has
    them): one job that calls a task of the app for each item, in order, in the worker."""

    def map_items(task: str, items: list[Any]) -> list[Any]:
        call = app.tasks[task]
        return [call(item) for item in items]

    def starmap_items(task: str, items: list[list[Any]]) -> list[Any]:
        call = app.tasks[task]
        return [call(*item) for item in items]

    app.task(name=MAP_TASK)(map_items)
    app.task(name=STARMAP_TASK)(starmap_items)


def signature(value: Any, args: Sequence[Any] | None = None, kwargs: Mapping[str, Any] | None = None, *,
              app: CanvasHost | None = None, **options: Any) -> Signature:  # fmt: skip
    """A signature from a task name (with ``app``), or back from its dict (as stored or sent as JSON)."""
    if isinstance(value, Signature):
        return value.clone(args, kwargs, **options) if (args or kwargs or options) else value
    if isinstance(value, Mapping):
        return _from_dict(value, app)
    return Signature(value, args, kwargs, options, app=app)


# -- planning --------------------------------------------------------------------------------------


class _Plan:
    """Templates and chords of one canvas, before they are written."""

    def __init__(self, app: CanvasHost, defaults: Mapping[str, Any]) -> None:
        self.app = app
        self.defaults = defaults  # queue/priority given to the canvas's apply_async: every task's default
        self.chords: list[tuple[str, int, dict[str, Any]]] = []

    def template(self, sig: Signature, chord_ref: tuple[str, int] | None) -> tuple[dict[str, Any], AsyncResult]:
        """A plain signature as a job template, with its links planned."""
        if sig.subtask_type is not None:
            raise ConfigurationError(f"{sig!r}: expected a task signature here")
        options = {**self.defaults, **sig.options}
        if options.get("expires") is not None:
            raise ConfigurationError(f"{sig!r}: expires= applies to a task enqueued alone, not inside a canvas yet")
        task = self.app.tasks.get(sig.task)
        task_options = task.options if task is not None else TaskOptions.build(self.app.default_queue)
        args_json, kwargs_json = codec.encode_arguments(sig.task, sig.args, sig.kwargs, self.app.max_payload_bytes)
        job_id = str(options.get("task_id") or new_job_id())
        _check_id(job_id)
        template: dict[str, Any] = {
            "id": job_id,
            "task": sig.task,
            "queue": validate_queue_name(options["queue"]) if options.get("queue") else task_options.queue,
            "args": json.loads(args_json),
            "kwargs": json.loads(kwargs_json),
            "priority": validate_priority(options["priority"]) if options.get("priority") is not None
            else task_options.priority,
            "max_attempts": task_options.max_attempts,
        }  # fmt: skip
        if sig.immutable:
            template["immutable"] = True
        timing(template, options)
        if chord_ref is not None:
            template["chord_id"], template["chord_index"] = chord_ref
        links = self.links(options.get("link"), options.get("link_error"))
        if links:
            template["links"] = links
        return template, AsyncResult(self.app, job_id, sig.task)

    def links(self, link: Any, link_error: Any) -> dict[str, Any]:
        """The ``links`` of a job: what its success and its failure start."""
        found: dict[str, Any] = {}
        success = [t for callback in _as_list(link) for t in self.start(_signature(callback, self.app), None, None)[0]]
        error = [
            t for errback in _as_list(link_error) for t in self.start(_signature(errback, self.app), None, None)[0]
        ]
        if success:
            found["success"] = success
        if error:
            found["error"] = error
        return found

    def _started(self, value: Any) -> list[dict[str, Any]]:
        """The templates that start a linked signature (it has no parent handle: it is not enqueued yet)."""
        return self.start(_signature(value, self.app), None, None)[0]

    def start(
        self, node: Signature, chord_ref: tuple[str, int] | None, parent: Any
    ) -> tuple[list[dict[str, Any]], Any]:
        """The templates that start ``node`` and its result handle (chained to ``parent``)."""
        if node.subtask_type is not None:
            _refuse_canvas_options(node)
        if chord_ref is not None and isinstance(node, chord):
            raise ConfigurationError(f"{node!r}: a chord as a member of another chord's header is not supported yet")
        if chord_ref is not None and isinstance(node, chain) and len(_normalise(node.tasks, self.app)) > 1:
            raise ConfigurationError(
                f"{node!r}: a chain of several steps as a chord's header member is not supported yet"
            )
        if isinstance(node, chain):
            return self._chain(node, chord_ref, parent)
        if isinstance(node, group):
            if chord_ref is not None:
                raise ConfigurationError(f"{node!r}: a group cannot be the last step of a chord's member")
            started = [self.start(m, None, parent) for m in node.tasks]
            group_id = str(node.options.get("task_id") or uuid.uuid4())
            return [t for ts, _ in started for t in ts], GroupResult(self.app, group_id, [r for _, r in started])
        if isinstance(node, chord):
            return self._chord(node, chord_ref, parent)
        template, result = self.template(node, chord_ref)
        result.parent = parent
        return [template], result

    def _chain(self, node: chain, chord_ref: tuple[str, int] | None, parent: Any) -> tuple[list[dict[str, Any]], Any]:
        steps = _normalise(node.tasks, self.app)
        first, rest = steps[0], steps[1:]
        if not rest:
            return self.start(first, chord_ref, parent)
        if first.subtask_type is not None:  # a group or chord comes first only when it is the whole chain
            raise ConfigurationError(f"{node!r}: cannot start a chain with {first!r}")
        head, result = self.template(first, None)
        result.parent = parent
        elements = []
        for index, step in enumerate(rest):
            templates, result = self.start(step, chord_ref if index == len(rest) - 1 else None, result)
            elements.append(templates)
        head.setdefault("links", {})["chain"] = elements
        return [head], result

    def _chord(self, node: chord, chord_ref: tuple[str, int] | None, parent: Any) -> tuple[list[dict[str, Any]], Any]:
        if node.body is None:
            raise ConfigurationError("chord() needs a body: chord(header, body) or chord(header)(body)")
        chord_id = str(uuid.uuid4())
        header = [self.start(member, (chord_id, index), parent) for index, member in enumerate(node.header)]
        header_result = GroupResult(self.app, chord_id, [r for _, r in header])
        body_templates, body_result = self.start(_signature(node.body, self.app), chord_ref, header_result)
        if len(body_templates) != 1:
            raise ConfigurationError(f"{node!r}: a chord's body must be a task or a chain, not a group")
        if not header:
            if parent is not None:
                raise ConfigurationError(f"{node!r}: a chord inside a chain needs at least one header task")
            body = body_templates[0]
            if not body.get("immutable"):
                body["args"] = [[], *body["args"]]  # no member: the body gets the empty list of results
            return body_templates, body_result
        self.chords.append((chord_id, len(header), body_templates[0]))
        return [t for ts, _ in header for t in ts], body_result


#: Options of a task's signature that a chain, group or chord does not take (yet): refused, not dropped.
TASK_ONLY_OPTIONS = ("link", "link_error", "expires")


def _refuse_canvas_options(node: Signature) -> None:
    given = [name for name in TASK_ONLY_OPTIONS if node.options.get(name)]
    if node.subtask_type != "group" and node.options.get("task_id"):
        given.append("task_id")
    if given:
        raise ConfigurationError(
            f"{node!r}: {', '.join(given)} on a whole {node.subtask_type} is not supported yet: "
            "set it on the task signatures inside"
        )


def apply(node: Signature, options: Mapping[str, Any]) -> Any:
    """Write the first jobs of a canvas (and its chords) in one transaction; returns its result handle."""
    app = node.app
    options = dict(options)
    session, connection = options.pop("session", None), options.pop("connection", None)
    if options.pop("via", None) == "buffer":
        raise ConfigurationError("a canvas is written straight to Postgres: via='buffer' does not apply")
    node = node.clone(**options) if options else node
    if node.subtask_type is None:  # one task: its own path (throttles, unique keys, hooks, events)
        return app.send_task(node.task, node.args, node.kwargs, session=session, connection=connection, **node.options)
    defaults = {k: v for k, v in node.options.items() if k in ("queue", "priority")}
    plan = _Plan(app, defaults)
    templates, result = plan.start(node, None, None)
    start = {k: v for k, v in node.options.items() if k in START_OPTIONS}
    if node.subtask_type is not None:
        for template in templates:  # the canvas's own countdown/eta delays its first jobs
            timing(template, start)
    target = caller_connection(session, connection)
    store = app.store if target is None else app.store.on(target)
    with store.transaction() as tx:
        for chord_id, size, body in plan.chords:
            tx.insert_chord(chord_id, size, json.dumps(body))
        tx.spawn(json.dumps(templates))
    return result


def plan_links(app: CanvasHost, link: Any, link_error: Any) -> str | None:
    """The ``links`` JSON of a plain job enqueued with ``link=``/``link_error=`` (None without)."""
    plan = _Plan(app, {})
    links = plan.links(link, link_error)
    if plan.chords:
        raise ConfigurationError("link= takes tasks, chains and groups; enqueue a chord with chord(...)")
    return json.dumps(links) if links else None


def timing(template: dict[str, Any], options: Mapping[str, Any]) -> None:
    """Put a countdown or eta of ``options`` on a template (a countdown counts from the job's spawn)."""
    countdown, eta = options.get("countdown"), options.get("eta")
    if countdown is not None and eta is not None:
        raise ConfigurationError("give countdown= or eta=, not both")
    if countdown is not None:
        if isinstance(countdown, bool) or not isinstance(countdown, (int, float)) or not countdown >= 0:
            raise ConfigurationError(f"countdown={countdown!r}: expected a number of seconds >= 0")
        template["countdown"] = float(countdown)
    if eta is not None:
        if not isinstance(eta, dt.datetime) or eta.tzinfo is None:
            raise ConfigurationError("eta= must be a timezone-aware datetime")
        template["eta"] = eta.isoformat()


def _normalise(steps: Iterable[Any], app: CanvasHost) -> list[Signature]:
    """A chain's steps with nested chains flattened and every group or chord that has steps after it turned
    into a chord whose body carries those steps (Celery's ``group | sig``)."""
    flat: list[Signature] = []
    for step in steps:
        sig = _signature(step, app)
        flat.extend(_normalise(sig.tasks, app) if isinstance(sig, chain) else [sig])
    for index, step in enumerate(flat[:-1]):
        rest = flat[index + 1 :]
        tail = rest[0] if len(rest) == 1 else chain(*rest, app=app)
        if isinstance(step, group):
            return [*flat[:index], chord(step.tasks, tail, app=app)]
        if isinstance(step, chord) and step.body is not None:
            return [*flat[:index], chord(step.header, chain(step.body, tail, app=app), app=app)]
    return flat


def _signature(value: Any, app: CanvasHost) -> Signature:
    sig = signature(value, app=app)
    if sig._app is None:
        sig._app = app
    return sig


def _from_dict(data: Mapping[str, Any], app: CanvasHost | None) -> Signature:
    kind = data.get("subtask_type")
    kwargs = dict(data.get("kwargs") or {})
    options = dict(data.get("options") or {})
    if kind == "chain":
        return chain(*[_from_dict(t, app) for t in kwargs["tasks"]], app=app, **options)
    if kind == "group":
        return group(*[_from_dict(t, app) for t in kwargs["tasks"]], app=app, **options)
    if kind == "chord":
        body = kwargs.get("body")
        return chord([_from_dict(t, app) for t in kwargs["header"]], None if body is None else _from_dict(body, app),
                     app=app, **options)  # fmt: skip
    for key in ("link", "link_error"):
        if key in options:
            options[key] = [_from_dict(s, app) for s in _as_list(options[key])]
    return Signature(data["task"], data.get("args"), kwargs, options, immutable=bool(data.get("immutable")), app=app)


def _first_app(signatures: Iterable[Any]) -> CanvasHost | None:
    return next((s._app for s in signatures if isinstance(s, Signature) and s._app is not None), None)


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    if isinstance(value, Signature):
        return copy.deepcopy(value, memo)
    if isinstance(value, list):
        return [_copy_value(v, memo) for v in value]
    if isinstance(value, dict):
        return {k: (v if k in ("session", "connection") else _copy_value(v, memo)) for k, v in value.items()}
    return value


def _check_id(job_id: str) -> None:
    try:
        uuid.UUID(job_id)
    except ValueError:
        raise ConfigurationError(f"task_id={job_id!r}: job ids are UUIDs") from None
