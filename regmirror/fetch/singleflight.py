"""One computation shared by many waiters (after synapse's ObservableDeferred).

Cancelling a waiter never cancels the work; a failure reaches every waiter and is not
cached: the next call starts over.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

T = TypeVar("T")


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._running: dict[Hashable, list[Deferred[T]]] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self._running

    def run(self, key: Hashable, work: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        """Join the computation for ``key`` in flight, or start it."""
        waiters = self._running.get(key)
        if waiters is None:
            waiters = self._running[key] = []
            waiter = self._waiter(waiters)
            d = Deferred.fromCoroutine(work())
            d.addBoth(self._done, key, waiters)
            return waiter
        return self._waiter(waiters)

    def _waiter(self, waiters: list[Deferred[T]]) -> Deferred[T]:
        def cancel(d: Deferred[T]) -> None:
            if d in waiters:
                waiters.remove(d)

        d: Deferred[T] = Deferred(cancel)
        waiters.append(d)
        return d

    def _done(self, result: T | Failure, key: Hashable, waiters: list[Deferred[T]]) -> None:
        if self._running.get(key) is waiters:
            del self._running[key]
        for d in list(waiters):
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)
        waiters.clear()
        return None
