"""Polling with a deadline: the only way tests wait for something to happen."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class PollTimeoutError(AssertionError):
    """The condition did not become true before the deadline.

    An ``AssertionError`` so that pytest reports it as a failed expectation.
    """


def poll_until(
    fn: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    what: str = "condition",
    describe: Callable[[], str] | None = None,
) -> T:
    """Call ``fn`` until it returns a truthy value, and return that value.

    Raises ``PollTimeoutError`` naming ``what`` once ``timeout`` seconds have passed; the
    message includes the last falsy value, the last exception ``fn`` raised (exceptions
    are retried until the deadline), and ``describe()`` if given (e.g. a log tail).
    """
    deadline = time.monotonic() + timeout
    last_value: object = None
    last_error: BaseException | None = None
    while True:
        try:
            value = fn()
        except Exception as e:
            last_error = e
        else:
            if value:
                return value
            last_value = value
            last_error = None
        if time.monotonic() >= deadline:
            break
        time.sleep(interval)  # the polling interval, not a guess at how long things take
    message = f"timed out after {timeout:g}s waiting for {what}"
    if last_error is not None:
        message += f"; last error: {last_error!r}"
    else:
        message += f"; last value: {last_value!r}"
    if describe is not None:
        try:
            message += "\n" + describe()
        except Exception as e:  # the description must not hide the timeout
            message += f"\n(could not describe state: {e!r})"
    raise PollTimeoutError(message) from last_error
