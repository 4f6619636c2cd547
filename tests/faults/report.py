"""docs/reliability.md from the fault suite's figures.

    python -m tests.faults.report FIGURES.jsonl > docs/reliability.md

``FIGURES.jsonl`` holds one JSON record per fault run (``tests.faults.figures.record``);
``make faults`` writes it (docs/reliability.jsonl) and then this page. When a fault was
recorded more than once (a second run of one test appends), the last record counts.
One table per group ("single node" first, then "cluster", then any other), a row per
fault; notes and commands below each table.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping
from typing import Any

GROUP_ORDER = ("single node", "cluster")

INTRO = """\
# Reliability: regmirror under faults

regmirror promises three things whatever happens around it:

1. **It never serves unverified bytes.** A client gets a complete `200` (or `206`) only
   with the blob's own bytes; when bad bytes are discovered after streaming began, the
   client sees a broken transfer, never a short or wrong body that looks complete.
2. **It never loses verified content.** What was committed under its digest stays
   there, hashing to its name, through upstream failures, crashes and full disks
   (until expiry, a purge or the quota removes it, which is policy, not loss).
3. **It keeps serving.** Cached content is served while the upstream is broken; the
   mirror does not crash, leak descriptors or memory, or leave fetches stuck, and it
   recovers by itself when the upstream heals.

The fault suite (`tests/faults/`) tries to break these promises with real processes on
loopback: `twistd regmirror` (`tests/support/mirror.py`), Debian's `docker-registry` as
the upstream (`tests/support/upstream.py`), and the tests' own HTTP clients.

## How faults are injected

* **The upstream**: `tests/support/faultproxy.py` sits between the mirror and the
  registry and breaks blob responses on demand: the body cut after N bytes with a FIN
  (an upstream killed mid-blob) or an RST, a `Content-Length` rewritten shorter (a
  truncated body that looks complete), bytes inverted from an offset (wrong bytes,
  same length), a drip of a few KB/s, `500`/`502`/`503`, `429` with `Retry-After`, a
  black hole (the request read, never answered) and a closed listener (connection
  refused); `heal()` brings the registry back.
* **The mirror**: `kill -9` at random moments while cold fetches are in flight,
  restarted on the same store; graceful restarts; purges through its admin socket.
* **The disk**: the store on a small tmpfs the test mounts itself, with a quota below
  its size, then filled by another tenant during a fetch and before one
  (`tests/support/faultfs.py`).
* **Clients**: hang-ups at random points (before sending, mid request head, after the
  request, after N body bytes; FIN or RST), on cached blobs and on fetches in flight; a
  soak of 120 connections mixing hits, misses, `HEAD`s, `Range`s and bad requests.
* **The cluster** (`tests/faults/cluster/`: three `twistd` replicas on one shared
  store, a real `redis-server`): a replica in a network namespace of its own, made by
  the test (`tests/support/netns.py`), with one veth link for its clients and the
  upstream and another for Redis only; the partition sets the root end of the Redis
  link down, so packets vanish without an error, as on a failing network. A fetch
  lease holder and the reaper leader stopped with `SIGSTOP` past their leases, then
  resumed while another replica has taken over. Redis killed and restarted empty on
  its port, mid-fetch and mid-expiry. The shared store (ext4 on a loop device,
  `tests/support/loopfs.py`) frozen with `fsfreeze` mid-fetch: this machine has cgroup
  v1, whose blkio throttle does not see buffered writes, and `SIGSTOP` would pause the
  whole process, not its I/O. The fencing of the reaper is proven by the test itself:
  `REGMIRROR_FAULTS_UNFENCED=1` loads `tests/faults/cluster/unfenced.py` into one
  replica, which removes the fencing check from its claim script, and the test then
  fails (65,536 verified bytes lost: the hot blobs deleted).
* **Everything at once, at random**: a hypothesis state machine
  (`tests/faults/test_stateful.py`) drives sequences of requests, upstream faults,
  purges and restarts against a model of what the cache must hold and may serve.

## The checker

Every client in the suite knows the bytes of every blob it asks for
(`tests/support/faultclient.py`). Each answer is classified: *verified* (a complete
body that hashes to the digest, a `206` equal to that slice, a `HEAD` announcing the
right size and digest), *error* (a `4xx`/`5xx` with the spec's JSON error body),
*broken* (cut before complete), *hang-up* (the client left on purpose), or *wrong*
(anything else). A complete body with wrong bytes adds its size to **unverified bytes
served**. After each fault the store is checked: every file under `blobs/` hashes to
its name, what was committed before is still there (else **verified bytes lost**),
nothing is left in `_tmp`, no fetch is in flight (`/metrics`). **Crashes** count mirror
processes that died without being killed by the test. **fd drift** and **RSS drift**
compare the mirror's `/proc/PID` before and after, once quiet (for the upstream
faults, idle keep-alive connections to the upstream are not counted; the tests poll
until the count is back at the baseline, so a negative drift is a descriptor that was
open at the baseline and closed since). **Duplicate upstream fetches** count upstream
GETs of a blob beyond the first once it was fetchable (after an upstream fault:
once healed). Each test asserts the zeros itself: these tables are what the
assertions saw. `seconds` is wall time on a 2-core machine shared with other work.

The short version of every test runs in CI (`make test`); the figures below are from
the long run, `make faults` (`REGMIRROR_FAULTS_LONG=1`: more rounds, clients, seconds).
One row's test alone: the command under its table.

## What the suite found (and what was fixed)

* **A `Range` answered from a fetch in flight completed before the digest was known.**
  Only the blob's own last byte was held back; a range ending earlier was sent from
  the growing temporary file and finished at once, so when the upstream's bytes turned
  out wrong the client had a complete `206` of wrong bytes. Now the range's last byte
  waits for the digest and a failed fetch cuts the answer (`regmirror/api/senders.py`;
  found by the state machine).
* **A fetch that started on a disk full of other things could never succeed.** Every
  cold blob was answered `200` and cut at its first write. Now the free space is
  checked against the announced size: without room the blob is passed through to the
  client (its last byte held until the digest matched), not stored, and the log says
  why (`regmirror/mirror/blobs.py`, `regmirror/storage/store.py`; found by the tmpfs
  test).
* **A replica cut off from Redis could cut the cluster's followers.** It fetched alone
  and committed its own copy while the cluster's holder was still writing; the other
  replicas' followers took that copy for the holder's commit and read past the end of
  the partial file they had open. Now the store's file counts as the commit only if it
  is the file followed (same inode) or the holder said the digest matched
  (`regmirror/fetch/remote.py`; found by the partition test).
* **After Redis lost its data, old hot blobs were expired at once.** The new reaper
  leader adopted each file with its mtime (when it was fetched) as its last use, so a
  blob older than the TTL went at the first tick however often it was used. Adopted
  files now get a full TTL; the cost is expiry delayed by up to one TTL and no LRU
  order among adopted files (`regmirror/expiry/clusterreaper.py`; found by the Redis
  loss test).

Found and left (docs/scaling.md, failure modes): a fetch *started* while the shared
store is frozen blocks that replica's reactor until the thaw (the temporary file is
created, and the commit renamed, on the reactor thread); fetches in flight and cached
GETs are not affected. Followers of a holder that dies or stops past its lease are cut,
not continued (clients retry and are served): continuing them safely needs the new
fetch to check the old file's prefix. A disk that fills during a fetch gives its
client a cut `200`: once the headers are sent that is the only honest answer.
"""

COLUMNS = (
    ("requests", "requests"),
    ("bodies_verified", "bodies verified"),
    ("unverified_bytes_served", "unverified bytes served"),
    ("verified_bytes_lost", "verified bytes lost"),
    ("crashes", "crashes"),
    ("fd_drift", "fd drift"),
    ("rss_drift_mb", "RSS drift (MB)"),
    ("duplicate_upstream_fetches", "duplicate upstream fetches"),
    ("seconds", "seconds"),
)


def load(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The records, the last one per (group, fault), in first-seen order."""
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for line in lines:
        line = line.strip()
        if not line:
            continue
        row = json.loads(line)
        key = (str(row.get("group", "")), str(row.get("fault", "")))
        latest.pop(key, None)  # re-inserted: keeps the order of the last runs
        latest[key] = row
    return list(latest.values())


def _cell(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("|", "\\|")


def _groups(rows: list[dict[str, Any]]) -> list[str]:
    seen = list(dict.fromkeys(str(r.get("group", "")) for r in rows))
    return [g for g in GROUP_ORDER if g in seen] + [g for g in seen if g not in GROUP_ORDER]


def table(group: str, rows: list[Mapping[str, Any]]) -> str:
    out = [f"## {group[:1].upper()}{group[1:]}", ""]
    long_runs = {bool(r.get("long")) for r in rows}
    when = sorted(str(r.get("recorded", "")) for r in rows)
    if long_runs == {True}:
        kind = "long run"
    elif long_runs == {False}:
        kind = "short (CI) run"
    else:
        kind = "long and short runs"
    out.append(f"{len(rows)} faults, {kind}, recorded {when[0]} to {when[-1]}.")
    out.append("")
    out.append("| fault | " + " | ".join(title for _, title in COLUMNS) + " |")
    out.append("|---|" + "---:|" * len(COLUMNS))
    for r in rows:
        cells = [_cell(r.get("fault"))] + [_cell(r.get(key)) for key, _ in COLUMNS]
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("Notes and commands:")
    out.append("")
    for r in rows:
        note = str(r.get("notes", "")).strip()
        command = str(r.get("command", "")).strip()
        line = f"* **{r.get('fault')}**"
        if note:
            line += f": {note}"
        if command:
            line += f"  \n  `{command}`"
        out.append(line)
    out.append("")
    return "\n".join(out)


def render(rows: list[dict[str, Any]]) -> str:
    parts = [INTRO]
    if not rows:
        parts.append("(No figures recorded yet: run `make faults`.)\n")
    for group in _groups(rows):
        parts.append(table(group, [r for r in rows if str(r.get("group", "")) == group]))
    return "\n".join(parts)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.faults.report FIGURES.jsonl", file=sys.stderr)
        return 2
    with open(argv[0], encoding="utf-8") as f:
        rows = load(f)
    sys.stdout.write(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
