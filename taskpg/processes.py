"""The processes pool: every job runs in a child process (children.py), so hard time limits are exact.

The parent prepares each job (registration, arguments, rate limits) in a runner thread and sends the
decoded call to an idle child; one child per slot is started with the worker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .pools import RunnerPool

if TYPE_CHECKING:
    from .executor import Call
    from .pools import PoolSetup


class ProcessPool(RunnerPool):
    """Runner threads prepare jobs; each call runs in an idle child process of a ChildPool."""

    kind = "processes"

    def __init__(self, setup: PoolSetup):
        if not setup.modules:
            raise ValueError("the processes pool needs the importable module(s) that define the tasks (-A)")
        super().__init__(setup)
        assert self._children is not None
        self._children.warm()  # start the children now: their imports take a while

    def isolated(self, call: Call) -> bool:
        return True  # every call runs in a child
