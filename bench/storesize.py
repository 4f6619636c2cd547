"""Cost as the cache grows: start-up time and memory of regmirror against the number of
entries in its store (issue 12, "Cost as the cache grows").

For each size (10k, 100k, 1M entries by default) a synthetic store is built directly on
disk (``tests.support.synthstore``), in the layout ``regmirror.storage.store`` uses:
``blobs/sha256/ab/<hex>`` files whose 32-byte content hashes to their name, and one
manifest in ten (``<hex>`` + ``.type``, an image manifest referencing a config and two
layers among the blobs). Then twistd
regmirror (``tests.support.mirror.Mirror``) is started on it twice, first with no
reaper state (a scan rebuilds it), then again with the state it saved, and each time:

- time to the first ``GET /v2/`` 200 and to the first cached blob 200 (from spawning);
- time until settled: the reaper's ``reaper: settled`` log line (scan / state load /
  reconciliation done), or the older ``reaper: N entries`` line of earlier versions;
- the mirror's CPU seconds (utime + stime, every thread) at both moments: wall times
  are noisy on a shared machine, CPU time much less;
- the longest ``GET /v2/`` round trip seen by a client polling every 20 ms while it
  settles (what a reactor stall costs a client);
- RSS (VmRSS) once settled, and VmHWM; bytes of RSS per entry: RSS minus the RSS of
  the same mirror on an empty store, divided by the entries.

``python -m bench.storesize [--entries 10000,100000,1000000] [--dir DIR]
[--repo-root PATH --python PATH]`` prints a table (``--repo-root`` / ``--python`` run
another checkout, e.g. the main branch, for an A/B). ``store_size(ctx)`` is the same as
a scenario of ``bench.scenarios``: it appends ``Row``s to the context.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.mirror import REPO_ROOT, Mirror
from tests.support.ports import free_port
from tests.support.rawhttp import connect, request
from tests.support.synthstore import build_store
from tests.support.wait import poll_until

if TYPE_CHECKING:
    from bench.scenarios import Context

SIZES = (10_000, 100_000, 1_000_000)
MANIFEST_EVERY = 10  # one entry in ten is a manifest
SETTLED = re.compile(r"reaper: (settled|\d+ entries)")


@dataclass
class Start:
    """One start of the mirror on a store."""

    first_v2: float | None = None  # s from spawning to the first GET /v2/ 200
    first_blob: float | None = None  # ... to the first cached blob 200
    settled: float | None = None  # ... to the reaper's settled log line
    max_stall: float | None = None  # the longest GET /v2/ round trip while settling, s
    cpu_v2: float | None = None  # CPU seconds of the mirror at its first GET /v2/ 200
    cpu_settled: float | None = None  # ... once settled (every thread: the walk too)
    rss_mb: float | None = None  # VmRSS once settled, MB (10^6 bytes)
    hwm_mb: float | None = None  # VmHWM once settled, MB


def _status_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of ``pid`` (all its threads), seconds: less noisy than wall time
    on a shared machine."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Prober:
    """GET /v2/ every ``interval`` s on one keep-alive connection; the longest round
    trip is how long the reactor (or the GIL) kept a client waiting."""

    def __init__(self, url: str, interval: float = 0.02) -> None:
        self.url = url
        self.interval = interval
        self.longest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="stall-probe")

    def _run(self) -> None:
        conn = connect(self.url, timeout=60)
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                conn.request("GET", "/v2/")
                conn.getresponse().read()
            except OSError:
                conn.close()
                conn = connect(self.url, timeout=60)
                continue
            self.longest = max(self.longest, time.monotonic() - t)
            self._stop.wait(self.interval)
        conn.close()

    def __enter__(self) -> _Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def _settled_count(mirror: Mirror) -> int:
    """Settled lines in the whole log (twistd rotates it at 1 MB: the probe's requests
    fill it)."""
    return len(SETTLED.findall(mirror.log_text()))


def measure_start(mirror: Mirror, blob: str | None, timeout: float = 600.0) -> Start:
    """Start ``mirror`` and measure one start (it is left running)."""
    before = _settled_count(mirror)
    result = Start()
    t0 = time.monotonic()
    mirror.start()  # returns at the first GET /v2/ 200 (polled every 50 ms)
    result.first_v2 = time.monotonic() - t0
    assert mirror.pid is not None
    result.cpu_v2 = _cpu_seconds(mirror.pid)
    if blob is not None:

        def blob_served() -> bool:
            return request(mirror.url, "GET", f"/v2/bench/blobs/{blob}", timeout=30).status == 200

        poll_until(blob_served, 60, interval=0.01, what="the cached blob served")
        result.first_blob = time.monotonic() - t0
    with _Prober(mirror.url) as prober:
        poll_until(
            lambda: _settled_count(mirror) > before,
            timeout,
            interval=0.2,
            what="the reaper settled",
        )
        result.settled = time.monotonic() - t0
    result.cpu_settled = _cpu_seconds(mirror.pid)
    result.max_stall = prober.longest
    time.sleep(1.0)  # the measurement's settling time, not a wait for an event
    rss, hwm = _status_kib(mirror.pid, "VmRSS"), _status_kib(mirror.pid, "VmHWM")
    result.rss_mb = rss * 1024 / 1e6 if rss is not None else None
    result.hwm_mb = hwm * 1024 / 1e6 if hwm is not None else None
    return result


@dataclass
class SizeResult:
    entries: int
    build: float
    first: Start
    restart: Start
    db_bytes: int


def _mirror(base: Path, repo_root: Path, python: str) -> Mirror:
    return Mirror(
        base,
        f"http://127.0.0.1:{free_port()}",  # never asked: everything GET is cached
        log_level="info",
        ready_timeout=120.0,
        repo_root=repo_root,
        python=python,
    )


def measure_empty(work: Path, repo_root: Path, python: str) -> Start:
    base = work / "empty"
    if base.exists():
        shutil.rmtree(base)
    mirror = _mirror(base, repo_root, python)
    try:
        return measure_start(mirror, None)
    finally:
        mirror.stop(60)


def measure_size(work: Path, entries: int, repo_root: Path, python: str) -> SizeResult:
    base = work / f"store-{entries}"
    t = time.monotonic()
    store = build_store(base / "store", entries, manifest_every=MANIFEST_EVERY)
    build = time.monotonic() - t
    for path in (base / "store" / "_state").glob("reaper.sqlite3*"):
        path.unlink()
    mirror = _mirror(base, repo_root, python)
    try:
        first = measure_start(mirror, store.blob)
        mirror.stop(120)  # saves the state
        restart = measure_start(mirror, store.blob)
    finally:
        mirror.stop(120)
    db = sum(p.stat().st_size for p in (base / "store" / "_state").glob("reaper.sqlite3*"))
    return SizeResult(entries, build, first, restart, db)


def per_entry(rss_mb: float | None, empty_mb: float | None, entries: int) -> float | None:
    if rss_mb is None or empty_mb is None:
        return None
    return (rss_mb - empty_mb) * 1e6 / entries


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def table(empty: Start, results: Sequence[SizeResult]) -> str:
    head = (
        "entries",
        "run",
        "first /v2/ s",
        "first blob s",
        "settled s",
        "CPU@/v2/ s",
        "CPU@settled s",
        "max stall s",
        "RSS MB",
        "HWM MB",
        "B/entry",
    )
    rows = [
        (
            "0",
            "empty",
            _fmt(empty.first_v2),
            "—",
            _fmt(empty.settled),
            _fmt(empty.cpu_v2),
            _fmt(empty.cpu_settled),
            _fmt(empty.max_stall),
            _fmt(empty.rss_mb, 1),
            _fmt(empty.hwm_mb, 1),
            "—",
        )
    ]
    for r in results:
        for label, s in (("scan", r.first), ("restart", r.restart)):
            rows.append(
                (
                    f"{r.entries:,}",
                    label,
                    _fmt(s.first_v2),
                    _fmt(s.first_blob),
                    _fmt(s.settled),
                    _fmt(s.cpu_v2),
                    _fmt(s.cpu_settled),
                    _fmt(s.max_stall),
                    _fmt(s.rss_mb, 1),
                    _fmt(s.hwm_mb, 1),
                    _fmt(per_entry(s.rss_mb, empty.rss_mb, r.entries), 0),
                )
            )
    widths = [max(len(row[i]) for row in (head, *rows)) for i in range(len(head))]
    lines = [
        "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in (head, *rows)
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass(frozen=True)
class _Work:
    path: Path
    owned: bool


@contextlib.contextmanager
def _workdir(given: Path | None) -> Iterator[_Work]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield _Work(given, False)
        return
    path = Path(tempfile.mkdtemp(prefix="regmirror-storesize-"))
    try:
        yield _Work(path, True)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def run(
    sizes: Sequence[int],
    work: Path,
    repo_root: Path = REPO_ROOT,
    python: str = sys.executable,
    log: object = None,
) -> tuple[Start, list[SizeResult]]:
    say = log if callable(log) else (lambda m: print(m, file=sys.stderr, flush=True))
    say("store size: empty store")
    empty = measure_empty(work, repo_root, python)
    results = []
    for n in sizes:
        say(f"store size: {n:,} entries (building the store, then two starts)")
        result = measure_size(work, n, repo_root, python)
        say(
            f"  built in {result.build:.1f} s; settled in {_fmt(result.first.settled)} s "
            f"(restart {_fmt(result.restart.settled)} s), RSS {_fmt(result.first.rss_mb, 1)} / "
            f"{_fmt(result.restart.rss_mb, 1)} MB"
        )
        results.append(result)
    return empty, results


def store_size(ctx: Context) -> None:
    """9: start-up time and RSS of regmirror against the entries in its store."""
    from bench.report import Check, Row, Target

    sizes = (10_000, 100_000) if ctx.params.quick else SIZES
    work = ctx.tmp / "storesize"
    work.mkdir(parents=True, exist_ok=True)
    empty, results = run(sizes, work, log=ctx.log)
    columns = ("first start (scan)", "restart (state)", "ratio restart/scan")

    def row(
        metric: str,
        first: float | None,
        again: float | None,
        unit: str,
        digits: int = 2,
        target: Target | None = None,
    ) -> Row:
        return Row(
            "9 store size", metric, first, again, unit, digits, target=target, columns=columns
        )

    def at_most(limit: float) -> Check:
        """Both starts (first, restart: the row's two values) within ``limit``."""
        return lambda v: None if v.dist is None or v.rm is None else max(v.dist, v.rm) <= limit

    empty_row = row("RSS, empty store", empty.rss_mb, None, "MB", digits=1)
    empty_row.show_ratio = False
    ctx.rows.append(empty_row)
    for r in results:
        n = f"{r.entries:,} entries"
        ctx.rows.append(
            row(
                f"{n}: first GET /v2/ 200",
                r.first.first_v2,
                r.restart.first_v2,
                "s",
                target=Target("≤ 2 s (wall: noisy)", at_most(2.0)),
            )
        )
        ctx.rows.append(
            row(
                f"{n}: first cached blob 200",
                r.first.first_blob,
                r.restart.first_blob,
                "s",
                target=Target("≤ 2 s (wall: noisy)", at_most(2.0)),
            )
        )
        ctx.rows.append(
            row(f"{n}: mirror CPU seconds at the first /v2/", r.first.cpu_v2, r.restart.cpu_v2, "s")
        )
        ctx.rows.append(row(f"{n}: settled", r.first.settled, r.restart.settled, "s"))
        ctx.rows.append(
            row(
                f"{n}: mirror CPU seconds until settled",
                r.first.cpu_settled,
                r.restart.cpu_settled,
                "s",
            )
        )
        ctx.rows.append(
            row(
                f"{n}: longest GET /v2/ while settling",
                r.first.max_stall,
                r.restart.max_stall,
                "s",
                digits=3,
            )
        )
        ctx.rows.append(row(f"{n}: RSS settled", r.first.rss_mb, r.restart.rss_mb, "MB", digits=1))
        ctx.rows.append(
            row(
                f"{n}: RSS per entry",
                per_entry(r.first.rss_mb, empty.rss_mb, r.entries),
                per_entry(r.restart.rss_mb, empty.rss_mb, r.entries),
                "B",
                digits=0,
                # below 100k entries the fixed cost (SQLite's 8 MiB page cache) dominates
                target=Target("≤ 200 B", at_most(200.0)) if r.entries >= 100_000 else None,
            )
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.storesize", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--entries", default=",".join(map(str, SIZES)), help="comma-separated sizes"
    )
    parser.add_argument("--dir", type=Path, default=None, help="where to build the stores (kept)")
    parser.add_argument("--repo-root", type=Path, default=REPO_ROOT, help="the checkout to run")
    parser.add_argument("--python", default=sys.executable, help="its Python (a venv's)")
    args = parser.parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in args.entries.split(",") if s]
    with _workdir(args.dir) as work:
        empty, results = run(sizes, work.path, args.repo_root.absolute(), args.python)
        print(table(empty, results))
        for r in results:
            built, db = f"{r.build:.1f} s", f"{r.db_bytes / 1e6:.1f} MB"
            print(f"{r.entries:,} entries: store built in {built}, state DB {db}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
