"""A hypothesis state machine against the real thing: random sequences of requests,
upstream faults, purges (expiry on demand) and restarts (graceful and kill -9), checked
against a model of what the cache must hold and may serve.

The model is the set of blobs that are surely cached (served verified while the
upstream was healthy, and not purged since). What must hold after every step:

* no answer is ever a complete body with wrong bytes (the checker), and every error
  has the spec's JSON body;
* a blob the model says is cached is served verified whatever the upstream does, and
  survives restarts, kill -9 included;
* with a healthy upstream every request is served verified; under a fault a blob that
  is not cached is an error or a broken transfer, and is not stored;
* on disk: every blob hashes to its name, the model's blobs are there, ``_tmp`` is
  empty once no fetch is in flight.

Each example starts a mirror on a fresh store; examples are few in CI (each step is a
real request to a real process), more under ``make faults``.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.faults.conftest import FAST, Blobs, check_store
from tests.faults.figures import Figures, record, scale
from tests.support.faultclient import Checker, Outcome
from tests.support.faultprocess import admin_purge, metric
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.images import Blob
from tests.support.merge import deep_merge
from tests.support.mirror import Mirror
from tests.support.wait import poll_until

KiB = 1024

FAULTS: list[tuple[Fault, dict[str, Any]]] = [
    (Fault.KILL, {"after": 100 * KiB}),
    (Fault.RESET, {"after": 10 * KiB}),
    (Fault.TRUNCATE, {"after": 100 * KiB}),
    (Fault.WRONG, {"after": 50 * KiB}),
    (Fault.STATUS, {"status": 503}),
    (Fault.STATUS, {"status": 500}),
    (Fault.RATE_LIMIT, {"retry_after": 3}),
    (Fault.REFUSE, {}),
]


def test_random_requests_faults_purges_and_restarts_keep_the_cache_true_to_its_model(
    fault_proxy: FaultProxy,
    blobs: Blobs,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    started = time.monotonic()
    name, pool = blobs(5, 256 * KiB)
    totals = {"examples": 0, "steps": 0, "restarts": 0, "kills": 0, "purges": 0, "faults": 0}
    checkers: list[Checker] = []

    class Cache(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            fault_proxy.heal()
            self.mirror = Mirror(
                tmp_path_factory.mktemp("stateful"),
                fault_proxy.url,
                log_level="info",
                extra=deep_merge({}, FAST),
            )
            self.mirror.start()
            self.checker = Checker(self.mirror.url, timeout=30)
            checkers.append(self.checker)
            self.cached: set[str] = set()
            self.fault = Fault.PASS
            self.since_restart = 0
            totals["examples"] += 1

        def teardown(self) -> None:
            self.mirror.stop()
            fault_proxy.heal()

        # -- helpers ---------------------------------------------------------------

        def ask(self, blob: Blob, **options: Any) -> Outcome:
            totals["steps"] += 1
            target = f"/v2/{name}/blobs/{blob.digest}"
            return asyncio.run(self.checker.get(target, blob.data, **options))

        def wait_quiet(self) -> None:
            poll_until(
                lambda: (
                    metric(self.mirror.url, "regmirror_fetches_in_flight") == 0
                    and not self.mirror.tmp_files()
                ),
                15,
                what="no fetch in flight and an empty _tmp",
                describe=lambda: self.mirror.log_tail(20),
            )

        def judge(self, blob: Blob, outcome: Outcome, method: str) -> None:
            assert outcome.kind != "wrong", outcome
            if blob.digest in self.cached or self.fault is Fault.PASS:
                assert outcome.kind == "verified", (blob.digest, self.fault, outcome)
            elif method == "HEAD":
                assert outcome.kind in ("verified", "error"), outcome
            else:
                assert outcome.kind in ("error", "broken"), (self.fault, outcome)
            self.wait_quiet()
            if method != "HEAD" and self.fault is Fault.PASS:
                poll_until(lambda: self.mirror.has_blob(blob.digest), 10, what="blob stored")
                self.cached.add(blob.digest)
            elif blob.digest not in self.cached:
                assert not self.mirror.has_blob(blob.digest), f"stored under {self.fault}"

        # -- rules -----------------------------------------------------------------

        @rule(
            i=st.integers(0, len(pool) - 1),
            method=st.sampled_from(["GET", "HEAD", "RANGE"]),
            upstream=st.sampled_from([None, None, *range(len(FAULTS))]),
            first=st.integers(0, 256 * KiB - 1),
        )
        def request(self, i: int, method: str, upstream: int | None, first: int) -> None:
            """One request, with the upstream healthy (None) or broken in one way."""
            if upstream is None:
                fault_proxy.heal()
                self.fault = Fault.PASS
            else:
                fault, options = FAULTS[upstream]
                fault_proxy.set_fault(fault, **options)
                self.fault = fault
                totals["faults"] += 1
            blob = pool[i]
            if method == "HEAD":
                outcome = self.ask(blob, method="HEAD")
            elif method == "RANGE":
                outcome = self.ask(blob, byte_range=(first, min(blob.size - 1, first + 4095)))
            else:
                outcome = self.ask(blob)
            self.judge(blob, outcome, method)
            self.since_restart += 1

        @precondition(lambda self: bool(self.cached))
        @rule(i=st.integers(0, len(pool) - 1))
        def purge(self, i: int) -> None:
            blob = pool[i]
            status = admin_purge(self.mirror.root, blob.digest)
            totals["purges"] += 1
            if blob.digest in self.cached:
                assert status == 200, status
                self.cached.discard(blob.digest)
            else:
                assert status == 404, status
            assert not self.mirror.has_blob(blob.digest)

        @precondition(lambda self: self.since_restart >= 3)
        @rule(kill=st.booleans())
        def restart(self, kill: bool) -> None:
            self.since_restart = 0
            if kill:
                self.mirror.kill9()
                totals["kills"] += 1
            else:
                # twistd ends a SIGTERM'd run by re-raising the signal on itself.
                status = self.mirror.stop()
                assert status in (0, -15), f"the mirror did not stop cleanly: {status}"
            totals["restarts"] += 1
            self.mirror.start()

        @invariant()
        def store_is_true_to_the_model(self) -> None:
            assert self.mirror.running, "the mirror crashed"
            assert check_store(self.mirror) == []
            for digest in self.cached:
                assert self.mirror.has_blob(digest), f"{digest} lost"

    run_state_machine_as_test(
        Cache,
        settings=settings(
            max_examples=scale(3, 12),
            stateful_step_count=scale(15, 40),
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    requests = sum(c.tally.requests for c in checkers)
    verified = sum(c.tally.verified for c in checkers)
    unverified = sum(c.tally.unverified_bytes_served for c in checkers)
    assert unverified == 0
    record(
        Figures(
            group="single node",
            fault="random requests, faults, purges and restarts (hypothesis)",
            requests=requests,
            bodies_verified=verified,
            unverified_bytes_served=unverified,
            verified_bytes_lost=0,
            crashes=0,
            notes=", ".join(f"{k} {n}" for k, n in totals.items()),
            seconds=round(time.monotonic() - started, 1),
        )
    )
