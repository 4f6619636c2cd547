"""What every command shares: exit codes, ``--json``, errors, sizes and times shown."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from enum import IntEnum
from typing import Any, TypeVar

import click
from rich.console import Console

F = TypeVar("F", bound=Callable[..., Any])


class Exit(IntEnum):
    OK = 0
    PROBLEMS = 1  # fsck found damage, a purge matched nothing or was refused, a fetch failed
    USAGE = 2  # bad arguments or configuration
    UNREACHABLE = 3  # the mirror (its HTTP listener or its admin socket) did not answer


class Failed(Exception):
    """A command's one-line error and its exit code (``detail`` goes into the JSON)."""

    def __init__(self, code: Exit, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.detail = detail


def json_option(f: F) -> F:
    return click.option(
        "--json", "as_json", is_flag=True, help="Print one JSON document instead of text."
    )(f)


def stdout() -> Console:
    """Tables for people; piped, wide enough that a row stays one line for grep."""
    console = Console(highlight=False)
    return console if console.is_terminal else Console(highlight=False, width=200)


def stderr() -> Console:
    return Console(stderr=True, highlight=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")


def run(as_json: bool, work: Callable[[], tuple[Exit, Any]], text: Callable[[Any], None]) -> None:
    """Run a command's ``work`` (the exit code and the JSON result), print the result
    (``text`` renders it for people) or its ``Failed``, and exit."""
    try:
        code, result = work()
    except Failed as e:
        if as_json:
            print_json({"ok": False, "error": e.message, "detail": e.detail})
        else:
            say(f"regmirror: {e.message}", err=True)
        sys.exit(int(e.code))
    if as_json:
        print_json({"ok": code == Exit.OK, **result})
    else:
        text(result)
    sys.exit(int(code))


def say(line: str, *, err: bool = False) -> None:
    """One plain line (never wrapped: it may be read by a script)."""
    (sys.stderr if err else sys.stdout).write(line + "\n")


def size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def when(timestamp: float | None) -> str | None:
    """An ISO 8601 UTC time, or None."""
    if timestamp is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))
