"""What regmirror needs of a reactor, as one type (typing only, usable by every layer).

Twisted describes a reactor with several zope interfaces (``IReactorTime``,
``IReactorThreads``, ...), and a type cannot say "provides both"; this Protocol names
the members we call, so the real reactor, ``twisted.internet.task.Clock`` and test
reactors are checked structurally. Code that only needs time takes ``ReactorTime``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.python.threadpool import ThreadPool


class ReactorTime(Protocol):
    """What we use of ``IReactorTime``."""

    def seconds(self) -> float: ...

    def callLater(
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall: ...


class Reactor(ReactorTime, Protocol):
    """``ReactorTime``, and what we use of ``IReactorThreads``."""

    def getThreadPool(self) -> ThreadPool: ...

    def callFromThread(self, f: Callable[..., Any], *args: object, **kwargs: object) -> None: ...
