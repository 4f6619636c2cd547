"""Figures of the fault suite: one record per fault run, collected into
docs/reliability.md by ``python -m tests.faults.report``.

Every fault test ends with ``record(...)``. When ``REGMIRROR_FIGURES`` names a file,
the record is appended to it as one JSON line (``make faults`` sets it); otherwise
nothing is written, and the test's own assertions are what CI checks. The numbers that
must be zero (unverified bytes served, verified bytes lost, crashes) are asserted by
the tests themselves, not only reported.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time

import attrs

ENV = "REGMIRROR_FIGURES"
LONG_ENV = "REGMIRROR_FAULTS_LONG"


def long_run() -> bool:
    """True under ``make faults``: the long versions (more rounds, longer soaks)."""
    return os.environ.get(LONG_ENV, "") not in ("", "0")


def scale(short: int, long: int) -> int:
    """A count (rounds, clients, seconds): ``short`` in CI, ``long`` under ``make faults``."""
    return long if long_run() else short


@attrs.define
class Figures:
    """What one fault run did. ``group`` is the table it belongs to ("single node" or
    "cluster"); ``fault`` names the fault in a few words."""

    group: str
    fault: str
    requests: int = 0
    bodies_verified: int = 0
    unverified_bytes_served: int = 0
    verified_bytes_lost: int = 0
    crashes: int = 0
    fd_drift: int | None = None
    rss_drift_mb: float | None = None
    duplicate_upstream_fetches: int | None = None
    notes: str = ""
    seconds: float = 0.0
    command: str = ""


def record(figures: Figures) -> None:
    """Append ``figures`` to the file named by ``REGMIRROR_FIGURES``, if any."""
    path = os.environ.get(ENV)
    if not path:
        return
    if not figures.command:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" ", 1)[0]
        figures.command = "make faults FAULTS=" + shlex.quote(test) if test else ""
    row = attrs.asdict(figures)
    row["recorded"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    row["long"] = long_run()
    row["python"] = sys.version.split()[0]
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
