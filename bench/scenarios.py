"""The scenarios: one function each, measuring the distribution registry (proxy mode),
nginx ``proxy_cache`` and regmirror in the same run, appending ``Row``s to the context.

A scenario function ``fn(ctx: Context) -> None`` receives the ``Context``: ``ctx.env``
(the running servers: the upstream, the three ``Side``s ``dist`` / ``nginx`` / ``rm``
with their counted ``upstream`` paths; ``fresh_mirror`` / ``fresh_nginx`` /
``fresh_distribution`` / ``fresh_path`` start servers of its own into a ``Fleet`` it
stops), ``ctx.params`` (sizes and durations, quick or full), ``ctx.tmp`` (a scratch
directory removed at the end), ``ctx.profiled(side, ...)`` (a py-spy profile of
regmirror with ``--profile``), and appends to ``ctx.rows`` (the table; ``peer_row``
for the three columns), ``ctx.notes`` (lines printed under it), ``ctx.failures`` (a
failed measurement: exit status 1; ``ctx.attempt`` records one and goes on) and
``ctx.rss`` / ``ctx.rss_process`` (peaks for the RSS rows). ``ctx.log`` prints progress.

Measurements rotate the order of the sides from one repetition to the next, so that
none always runs first on a noisy machine.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.clients import (
    ConcurrentResult,
    CurlResult,
    LoadResult,
    concurrent_curl,
    curl_get,
    median,
    run_ab_head,
    run_wrk,
    timed_skopeo_pull,
)
from bench.env import (
    BLOB_REPO,
    BenchEnv,
    Fleet,
    MiB,
    RssMonitor,
    Side,
    TransferWatch,
    cluster_connected,
    random_blob,
    wait_quiet,
)
from bench.profile import profile_name, py_spy_record
from bench.report import (
    Row,
    Target,
    all_of,
    format_value,
    rm_at_least,
    rm_at_least_value,
    rm_at_most,
    rm_at_most_peer,
    rm_between,
)
from bench.storesize import store_size
from tests.support.images import DOCKER_MANIFEST, Image, docker_image
from tests.support.mirror import Mirror
from tests.support.rawhttp import request
from tests.support.skopeo import verify_dir
from tests.support.wait import poll_until

T = TypeVar("T")
MB = 1_000_000
GB = 1_000_000_000
KEYS = ("dist", "nginx", "rm")  # the sides, in the table's column order


@dataclass(frozen=True)
class Params:
    quick: bool
    layer_size: int  # 4 layers of this many random bytes ("raw" layers)
    layers: int
    pull_repeats: int  # cold pulls per side (a new image each)
    blob_size: int  # scenario 3
    cold_blob_runs: int
    cached_blob_runs: int
    load_duration: float  # wrk / ab, seconds
    clients: int  # scenario 5 and 6
    concurrent_blob_size: int  # scenario 5
    wan_rate: float  # bytes/s, the capped run of scenario 5
    rss_blob_size: int  # scenario 6

    @classmethod
    def full(cls, load_duration: float = 10.0, wan_rate: float = 128 * MiB) -> Params:
        return cls(
            quick=False,
            layer_size=50 * MiB,
            layers=4,
            pull_repeats=3,
            blob_size=256 * MiB,
            cold_blob_runs=3,
            cached_blob_runs=5,
            load_duration=load_duration,
            clients=32,
            concurrent_blob_size=64 * MiB,
            wan_rate=wan_rate,
            rss_blob_size=256 * MiB,
        )

    @classmethod
    def quick_run(cls, load_duration: float = 3.0, wan_rate: float = 128 * MiB) -> Params:
        return cls(
            quick=True,
            layer_size=16 * MiB,
            layers=4,
            pull_repeats=1,
            blob_size=32 * MiB,
            cold_blob_runs=3,
            cached_blob_runs=3,
            load_duration=load_duration,
            clients=32,
            concurrent_blob_size=16 * MiB,
            wan_rate=wan_rate,
            rss_blob_size=32 * MiB,
        )


@dataclass
class Context:
    env: BenchEnv
    params: Params
    tmp: Path
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    # Images pulled cold through both sides (scenario 1), for the warm pulls.
    pulled: list[Image] = field(default_factory=list)
    # A blob stored in both caches: (digest, size).
    cached_blob: tuple[str, int] | None = None
    # --profile: where py-spy flame graphs of regmirror's measured runs go.
    profile_dir: Path | None = None
    # Peak RSS (MB) per phase, per side key: of the whole process tree, and of its
    # largest single process (a worker).
    rss: dict[str, dict[str, float]] = field(default_factory=dict)
    rss_process: dict[str, dict[str, float]] = field(default_factory=dict)

    def log(self, message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)

    def attempt(self, side: Side | str, what: str, fn: Callable[[], T]) -> T | None:
        """Run one measurement; on failure record it (the table shows a gap) and go on."""
        label = side if isinstance(side, str) else side.label
        try:
            return fn()
        except Exception as e:
            message = f"{label}: {what} failed: {type(e).__name__}: {e}"
            self.failures.append(message)
            self.log("FAILED " + message)
            traceback.print_exc(file=sys.stderr)
            return None

    @contextmanager
    def profiled(self, side: Side, *what: object) -> Iterator[None]:
        """With ``--profile``: a py-spy flame graph of regmirror (only) while the block
        runs, in ``profile_dir/<what>.svg``; otherwise nothing."""
        if self.profile_dir is None or side.key != "rm" or side.pid is None:
            yield
            return
        out = self.profile_dir / f"{profile_name(*what)}.svg"
        with py_spy_record(side.pid, out):
            yield
        self.log(f"  profile: {out}")

    def order(self, i: int, sides: Sequence[Side] | None = None) -> Sequence[Side]:
        """The sides (by default the three main ones), rotated by ``i``."""
        listed = list(self.env.sides if sides is None else sides)
        k = i % len(listed)
        return listed[k:] + listed[:k]


def per_side() -> dict[str, list[float]]:
    return {key: [] for key in KEYS}


def peer_row(
    scenario: str,
    metric: str,
    values: dict[str, float | None],
    unit: str = "",
    *,
    texts: dict[str, str | None] | None = None,
    **kwargs: object,
) -> Row:
    """A row of the main table from values (and cell texts) keyed by side."""
    texts = texts or {}
    return Row(
        scenario,
        metric,
        values.get("dist"),
        values.get("rm"),
        unit,
        dist_text=texts.get("dist"),
        rm_text=texts.get("rm"),
        nginx=values.get("nginx"),
        nginx_text=texts.get("nginx"),
        **kwargs,  # type: ignore[arg-type]
    )


def medians(values: dict[str, list[float]]) -> dict[str, float | None]:
    return {key: _med(v) for key, v in values.items()}


def _mib(n: float) -> str:
    return f"{n / MiB:.4g} MiB"


def _med(values: Sequence[float]) -> float | None:
    return median(values) if values else None


# --- 1 and 2: skopeo pulls -----------------------------------------------------------


def _bench_image(ctx: Context, index: int) -> Image:
    p = ctx.params
    return docker_image(
        "bench/image",
        f"r{index}",
        seed=f"bench/image/{index}",
        layer_sizes=(p.layer_size,) * p.layers,
        layer_format="raw",
    )


def _image_bytes(image: Image) -> int:
    return sum(b.size for b in image.blobs()) + image.manifest.size


def _pull(ctx: Context, host: str, image: Image) -> float:
    dest = Path(tempfile.mkdtemp(prefix="pull-", dir=ctx.tmp))
    try:
        seconds = timed_skopeo_pull(image.ref(host), dest)
        verify_dir(dest, image)
        return seconds
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def cold_pull(ctx: Context) -> None:
    """1: skopeo copy of a ~200 MB image in 4 layers, empty caches, plus the direct
    pull from the upstream itself (no proxy: the ceiling)."""
    env, p = ctx.env, ctx.params
    assert env.upstream is not None
    direct_times: list[float] = []
    times = per_side()
    copies = per_side()
    size = 0
    for r in range(p.pull_repeats):
        image = _bench_image(ctx, r)
        size = _image_bytes(image)
        ctx.log(f"1 cold pull {r + 1}/{p.pull_repeats}: pushing {_mib(size)} image")
        env.push_image(image)
        direct_host = env.upstream.host
        # The direct pull takes its turn in the rotation too (None: direct).
        turns: list[Side | None] = [None, *env.sides]
        k = r % len(turns)
        for side in turns[k:] + turns[:k]:
            if side is None:
                t = ctx.attempt("direct", "pull", lambda: _pull(ctx, direct_host, image))  # noqa: B023
                if t is not None:
                    direct_times.append(t)
                    ctx.log(f"  direct {t:.2f} s")
                continue
            before = side.upstream.bytes_down

            def pull(side: Side = side) -> float:
                seconds = _pull(ctx, side.host, image)  # noqa: B023
                env.wait_stored(side, [b.digest for b in image.blobs()])  # noqa: B023
                return seconds

            t = ctx.attempt(side, "cold pull", pull)
            if t is not None:
                times[side.key].append(t)
                copies[side.key].append((side.upstream.bytes_down - before) / size)
                ctx.log(f"  {side.label} {t:.2f} s, {copies[side.key][-1]:.2f}x image upstream")
        ctx.pulled.append(image)
    direct = _med(direct_times)
    walls = medians(times)

    def vs_direct(value: float | None) -> str | None:
        if value is None or direct is None:
            return None
        return f"{value:.2f} s ({value / direct:.2f}x direct)"

    def within_direct(v: object) -> bool | None:
        rm = walls["rm"]
        return None if rm is None or direct is None else rm <= 1.1 * direct

    scenario = f"1 cold pull, {_mib(size)} in {p.layers} layers"
    n = p.pull_repeats
    direct_text = f"{direct:.2f} s" if direct is not None else "failed"
    ctx.rows.append(
        peer_row(
            scenario,
            f"wall time, median of {n} (direct from upstream, no proxy: {direct_text})",
            walls,
            "s",
            texts={k: vs_direct(v) for k, v in walls.items()},
            target=Target("≤ 1.1x direct", within_direct),
        )
    )
    ctx.rows.append(
        peer_row(
            scenario,
            "upstream bytes (x image size)",
            medians(copies),
            "x image",
            target=Target("= 1.0x image", rm_between(0.99, 1.01)),
        )
    )


def _ensure_pulled(ctx: Context) -> list[Image]:
    """Images in both caches: those of scenario 1, or one pulled now (untimed)."""
    if ctx.pulled:
        return ctx.pulled
    env = ctx.env
    image = _bench_image(ctx, 0)
    ctx.log(f"2 warm pull: preparing ({_mib(_image_bytes(image))} image, pulled once per side)")
    env.push_image(image)
    for side in env.sides:
        _pull(ctx, side.host, image)
        env.wait_stored(side, [b.digest for b in image.blobs()])
    ctx.pulled.append(image)
    return ctx.pulled


def warm_pull(ctx: Context) -> None:
    """2: the same pulls again, everything cached."""
    images = _ensure_pulled(ctx)
    times = per_side()
    upstream_requests = per_side()
    for i, image in enumerate(images):
        for side in ctx.order(i):
            before = side.upstream.count_requests()
            t = ctx.attempt(side, "warm pull", lambda s=side: _pull(ctx, s.host, image))  # noqa: B023
            if t is not None:
                times[side.key].append(t)
                upstream_requests[side.key].append(side.upstream.count_requests() - before)
                ctx.log(f"2 warm pull: {side.label} {t:.2f} s")
    scenario = f"2 warm pull, {_mib(_image_bytes(images[0]))}"
    ctx.rows.append(peer_row(scenario, f"wall time, median of {len(images)}", medians(times), "s"))
    ctx.rows.append(
        peer_row(
            scenario,
            "upstream requests per pull",
            medians(upstream_requests),
            digits=0,
            show_ratio=False,
        )
    )


# --- 3: one big blob -------------------------------------------------------------------


def blob_get(ctx: Context) -> None:
    """3: GET of one 256 MiB blob, cold (a new blob per run) and cached; curl's speed.
    The direct GET from the upstream: with no proxy (the ceiling), through a
    SpliceProxy and through the asyncio CountingProxy that every side's path went
    through before (what a proxy in the path costs)."""
    env, p = ctx.env, ctx.params
    cold = per_side()
    copies = per_side()
    direct: list[float] = []
    proxied: list[float] = []
    old: list[float] = []
    assert env.direct is not None and env.direct_old is not None and env.upstream is not None
    first = None
    for i in range(p.cold_blob_runs):
        blob = random_blob(f"bench/blob/{i}", p.blob_size)
        ctx.log(f"3 cold blob GET {i + 1}/{p.cold_blob_runs}: pushing {_mib(blob.size)}")
        env.push_blob(blob)
        digest, size = blob.digest, blob.size
        del blob
        first = first or (digest, size)
        for side in ctx.order(i):
            before = side.upstream.bytes_down

            def get(side: Side = side, i: int = i) -> CurlResult:
                with ctx.profiled(side, "3 cold blob get", i + 1):
                    result = curl_get(side.blob_url(BLOB_REPO, digest), expect_size=size)  # noqa: B023
                env.wait_stored(side, [digest])  # noqa: B023
                return result

            result = ctx.attempt(side, "cold blob GET", get)
            if result is not None:
                cold[side.key].append(result.speed / MiB)
                copies[side.key].append((side.upstream.bytes_down - before) / size)
                ctx.log(f"  {side.label} {result.speed / MiB:.1f} MiB/s")
        paths = [
            (direct, env.upstream.url, "no proxy"),
            (proxied, env.direct.url, "SpliceProxy"),
            (old, env.direct_old.url, "CountingProxy (before)"),
        ]
        for speeds, base, what in paths[i % 3 :] + paths[: i % 3]:
            url = f"{base}/v2/{BLOB_REPO}/blobs/{digest}"
            result = ctx.attempt(
                "direct",
                f"blob GET ({what})",
                lambda u=url: curl_get(u, expect_size=size),  # noqa: B023
            )
            if result is not None:
                speeds.append(result.speed / MiB)
                ctx.log(f"  direct from upstream, {what}: {result.speed / MiB:.1f} MiB/s")
    assert first is not None
    ctx.cached_blob = first
    digest, size = first
    cached = per_side()
    for j in range(p.cached_blob_runs):
        for side in ctx.order(j):
            url = side.blob_url(BLOB_REPO, digest)
            with ctx.profiled(side, "3 cached blob get", j + 1):
                result = ctx.attempt(
                    side, "cached blob GET", lambda u=url: curl_get(u, expect_size=size)
                )
            if result is not None:
                cached[side.key].append(result.speed / MiB)
        ctx.log(f"3 cached blob GET {j + 1}/{p.cached_blob_runs}")
    scenario = f"3 one {_mib(size)} blob, curl"
    ceiling = format_value(_med(direct), "MiB/s", 1)
    through = format_value(_med(proxied), "MiB/s", 1)
    before = format_value(_med(old), "MiB/s", 1)
    ctx.rows.append(
        peer_row(
            scenario,
            f"direct GET from the upstream, median: {ceiling} without a proxy (the "
            f"ceiling); {through} through a SpliceProxy; {before} through the asyncio "
            "CountingProxy (every side's path before)",
            {},
        )
    )
    ctx.rows.append(
        peer_row(
            scenario,
            f"cold GET, MiB/s (median of {p.cold_blob_runs}, a new blob each)",
            medians(cold),
            "MiB/s",
            digits=1,
            target=Target(
                "≥ 1.0x distribution and ≥ 1.0x nginx",
                all_of(rm_at_least(1.0), rm_at_least(1.0, "nginx")),
            ),
        )
    )
    ctx.rows.append(
        peer_row(
            scenario,
            "cold GET: upstream copies of the blob",
            medians(copies),
            "x",
            show_ratio=False,
            target=Target("= 1", rm_between(0.99, 1.01)),
        )
    )
    ctx.rows.append(
        peer_row(
            scenario,
            f"cached GET, MiB/s (median of {p.cached_blob_runs})",
            medians(cached),
            "MiB/s",
            digits=1,
            target=Target(
                "≥ 1.0x nginx and ≥ 1.0x distribution",
                all_of(rm_at_least(1.0, "nginx"), rm_at_least(1.0)),
            ),
        )
    )
    tls_speeds = _cached_blob_over_tls(ctx, size)
    gb_in_mib = GB / MiB
    ctx.rows.append(
        peer_row(
            scenario,
            f"cached GET over TLS, MiB/s (median of {p.cached_blob_runs}; curl --cacert)",
            medians(tls_speeds),
            "MiB/s",
            digits=1,
            target=Target(f"≥ 1 GB/s ({gb_in_mib:.0f} MiB/s)", rm_at_least_value(gb_in_mib)),
        )
    )


def _cached_blob_over_tls(ctx: Context, size: int) -> dict[str, list[float]]:
    """3, over TLS: TLS servers of the three (fresh stores), each primed with one GET
    of a new blob of ``size`` bytes, then cached GETs with curl verifying the
    certificate."""
    env, p = ctx.env, ctx.params
    speeds = per_side()
    blob = random_blob("bench/blob/tls", size)
    env.push_blob(blob)
    digest = blob.digest
    del blob
    ctx.log("3 cached blob GET over TLS: starting TLS servers")
    tls = ctx.attempt("TLS", "start TLS servers", env.start_tls)
    if tls is None:
        return speeds
    try:
        cacert = str(tls.ca_path)
        for side in tls.sides:
            url = side.blob_url(BLOB_REPO, digest)
            primed = ctx.attempt(
                side,
                "TLS priming GET",
                lambda u=url: curl_get(u, expect_size=size, cacert=cacert),
            )
            if primed is not None:
                env.wait_stored(side, [digest])
        for j in range(p.cached_blob_runs):
            for side in ctx.order(j, tls.sides):
                url = side.blob_url(BLOB_REPO, digest)
                with ctx.profiled(side, "3 cached blob get tls", j + 1):
                    result = ctx.attempt(
                        side,
                        "cached blob GET over TLS",
                        lambda u=url: curl_get(u, expect_size=size, cacert=cacert),
                    )
                if result is not None:
                    speeds[side.key].append(result.speed / MiB)
            ctx.log(f"3 cached blob GET over TLS {j + 1}/{p.cached_blob_runs}")
    finally:
        tls.stop()
    return speeds


# --- 4: manifests ----------------------------------------------------------------------


def _latency_text(result: object) -> str | None:
    if not isinstance(result, LoadResult):
        return None
    values = [result.pct(q) for q in (50, 90, 99)]
    return " / ".join("—" if v is None else f"{v:g}" for v in values)


def _rps_text(result: object) -> str | None:
    if not isinstance(result, LoadResult):
        return None
    text = f"{result.rps:,.0f}"
    if result.errors:
        text += f" ({result.errors} errors of {result.requests})"
    return text


def _regmirror_workers(env: BenchEnv) -> int:
    value = env.mirror.config().get("regmirror", {}).get("workers", 1)
    return value if isinstance(value, int) else 1


def _manifest_sides(ctx: Context, procs: int, fleet: Fleet) -> list[Side]:
    """The sides of scenario 4 at ``procs`` processes: regmirror with ``workers:
    procs`` and nginx with ``worker_processes procs``, the main ones when they have
    that many, fresh ones (stopped with ``fleet``) otherwise; the distribution proxy
    (one Go process, threads on every core) with the larger count only."""
    env = ctx.env
    assert env.dist is not None and env.nginx is not None and env.rm is not None
    base = ctx.tmp / f"manifest-{procs}"
    sides: list[Side] = []
    if procs == 2:
        sides.append(env.dist)
    if env.nginx_workers == procs:
        sides.append(env.nginx)
    else:
        ctx.log(f"4: starting nginx with worker_processes {procs}")
        sides.append(env.fresh_nginx(fleet, base / "nginx", procs))
    if _regmirror_workers(env) == procs:
        sides.append(env.rm)
    else:
        ctx.log(f"4: starting regmirror with workers: {procs}")
        side = env.fresh_mirror(fleet, base / "regmirror", {"regmirror": {"workers": procs}})
        if procs > 1:
            assert isinstance(side.server, Mirror)
            mirror = side.server
            poll_until(lambda: cluster_connected(mirror), 30, what="the workers joined Redis")
        sides.append(side)
    return sides


def manifests(ctx: Context) -> None:
    """4: manifest GET by digest (wrk) and HEAD by tag (ab -i), cached; with one
    process (regmirror ``workers: 1`` against nginx ``worker_processes 1``) and with
    two (``workers: 2`` against ``worker_processes 2``, and the distribution proxy)."""
    env = ctx.env
    image = docker_image("bench/small", "v1", seed="bench/small")
    env.push_image(image)
    for procs in (1, 2):
        fleet = Fleet()
        try:
            sides = ctx.attempt(
                f"{procs} process(es)",
                "start the servers",
                lambda n=procs, f=fleet: _manifest_sides(ctx, n, f),
            )
            if sides is not None:
                _manifest_load(ctx, image, procs, sides)
        finally:
            fleet.stop()


def _manifest_load(ctx: Context, image: Image, procs: int, sides: Sequence[Side]) -> None:
    env, p = ctx.env, ctx.params
    accept = {"Accept": DOCKER_MANIFEST}
    for side in sides:  # prime the caches: tag, digest
        for ref in (image.tag, image.digest):
            resp = request(side.url, "GET", f"/v2/{image.name}/manifests/{ref}", headers=accept)
            if resp.status != 200:
                ctx.failures.append(f"{side.label}: priming GET manifest {ref}: {resp.status}")
    duration = p.load_duration
    what = f"{procs} process{'es' if procs > 1 else ''}"
    wrk_results: dict[str, LoadResult] = {}
    wrk_upstream: dict[str, float | None] = {}
    for side in ctx.order(procs, sides):
        wait_quiet(side.upstream, quiet=0.2)
        before = side.upstream.count_requests()
        url = f"{side.url}/v2/{image.name}/manifests/{image.digest}"
        ctx.log(f"4 manifest GET by digest, {what}: wrk {duration:g} s on {side.label}")
        with ctx.profiled(side, "4 manifest get by digest", what):
            res = ctx.attempt(
                side,
                "wrk GET manifest by digest",
                lambda u=url: run_wrk(u, duration=duration, headers=accept),
            )
        if res is not None:
            wrk_results[side.key] = res
            wrk_upstream[side.key] = side.upstream.count_requests() - before
            ctx.log(f"  {res.rps:,.0f} requests/s, {res.errors} errors")
    ab_results: dict[str, LoadResult] = {}
    ab_upstream: dict[str, float | None] = {}
    for side in ctx.order(procs + 1, sides):
        wait_quiet(side.upstream, quiet=0.2)
        before = side.upstream.count_requests()
        url = f"{side.url}/v2/{image.name}/manifests/{image.tag}"
        ctx.log(f"4 manifest HEAD by tag, {what}: ab {duration:g} s on {side.label}")
        with ctx.profiled(side, "4 manifest head by tag", what):
            res2 = ctx.attempt(
                side,
                "ab HEAD manifest by tag",
                lambda u=url: run_ab_head(u, duration=duration, headers=accept),
            )
        if res2 is not None:
            ab_results[side.key] = res2
            ab_upstream[side.key] = side.upstream.count_requests() - before
            ctx.log(f"  {res2.rps:,.0f} requests/s, {res2.errors} errors")

    def rps(results: dict[str, LoadResult]) -> dict[str, float | None]:
        return {k: r.rps for k, r in results.items()}

    def texts(results: dict[str, LoadResult], fn: Callable[[object], str | None]) -> dict:
        return {k: fn(r) for k, r in results.items()}

    d = f"{duration:g} s"
    dist_note = "" if procs == 1 else "; distribution: one Go process, all cores"
    s_get = f"4 manifest GET by digest (wrk -t2 -c32 {d}), {what}"
    get_target = Target("≥ 0.4x nginx", rm_at_least(0.4, "nginx"))
    if procs == 2:
        get_target = Target(
            "≥ 0.4x nginx; ≥ 10x distribution",
            all_of(rm_at_least(0.4, "nginx"), rm_at_least(10.0)),
        )
    ctx.rows.append(
        peer_row(
            s_get,
            f"requests/s{dist_note}",
            rps(wrk_results),
            digits=0,
            texts=texts(wrk_results, _rps_text),
            target=get_target,
        )
    )
    ctx.rows.append(
        peer_row(
            s_get,
            "latency p50 / p90 / p99, ms",
            {},
            texts=texts(wrk_results, _latency_text),
        )
    )
    ctx.rows.append(
        peer_row(
            s_get,
            "upstream requests during the run",
            wrk_upstream,
            digits=0,
            show_ratio=False,
        )
    )
    freshness = _freshness_seconds(env)
    windows = max(1, math.floor(duration / freshness) + 1) if freshness else None
    s_head = f"4 manifest HEAD by tag (ab -k -i -c32 {d}), {what}"
    head_target = Target("≥ 0.4x nginx", rm_at_least(0.4, "nginx"))
    if procs == 2:
        head_target = Target(
            "≥ 0.4x nginx; ≥ 30x distribution",
            all_of(rm_at_least(0.4, "nginx"), rm_at_least(30.0)),
        )
    ctx.rows.append(
        peer_row(
            s_head,
            f"requests/s{dist_note}",
            rps(ab_results),
            digits=0,
            texts=texts(ab_results, _rps_text),
            target=head_target,
        )
    )
    ctx.rows.append(
        peer_row(
            s_head,
            "latency p50 / p90 / p99, ms (ab: whole ms)",
            {},
            texts=texts(ab_results, _latency_text),
        )
    )
    fresh_text = f"{freshness:g} s" if freshness is not None else "?"
    ctx.rows.append(
        peer_row(
            s_head,
            f"upstream requests during the run (tag freshness {fresh_text})",
            ab_upstream,
            digits=0,
            show_ratio=False,
            target=Target(
                f"≤ 1 per tag per freshness window (≤ {windows or '?'})",
                rm_at_most(windows) if windows else None,
            ),
        )
    )


def _freshness_seconds(env: BenchEnv) -> float | None:
    from regmirror.config import parse_duration

    value = env.mirror.config().get("regmirror", {}).get("tag_freshness", "30s")
    try:
        return parse_duration(value)
    except ValueError:
        return None


# --- 5 and 6: many clients -------------------------------------------------------------


def _peak(ctx: Context, phase: str, key: str, monitor: RssMonitor) -> None:
    for peaks, mib in (
        (ctx.rss, monitor.peak_mib),
        (ctx.rss_process, monitor.peak_process_mib),
    ):
        phase_peaks = peaks.setdefault(phase, {})
        phase_peaks[key] = max(phase_peaks.get(key, 0.0), mib * MiB / MB)


@dataclass
class _FanOut:
    """One side's run of scenario 5."""

    result: ConcurrentResult
    copies: float  # upstream bytes / blob size
    gets: int  # upstream GET requests for the blob
    first_copy: float | None  # s from the release of the clients to one full upstream copy


def _capped_sides(ctx: Context, fleet: Fleet, cap: float) -> list[Side]:
    """Fresh servers of the three, each reaching the upstream through its own
    counting proxy capped at ``cap`` bytes/s (the main ones have no proxy to cap)."""
    env = ctx.env
    base = ctx.tmp / "capped"
    ctx.log(f"5: starting the three behind proxies capped at {cap / MiB:g} MiB/s")
    return [
        env.fresh_distribution(fleet, base / "distribution", env.fresh_path(fleet, cap)),
        env.fresh_nginx(fleet, base / "nginx", env.nginx_workers, env.fresh_path(fleet, cap)),
        env.fresh_mirror(fleet, base / "regmirror", {}, env.fresh_path(fleet, cap)),
    ]


def concurrent_cold(ctx: Context) -> None:
    """5: 32 clients GET the same cold blob at once, uncapped and capped upstream."""
    env, p = ctx.env, ctx.params
    size = p.concurrent_blob_size
    n = p.clients
    for cap in (None, p.wan_rate):
        label = "uncapped" if cap is None else f"capped at {cap / MiB:g} MiB/s"
        blob = random_blob(f"bench/concurrent/{label}", size)
        env.push_blob(blob)
        digest, hex_ = blob.digest, blob.hex
        del blob
        runs: dict[str, _FanOut] = {}
        fleet = Fleet()
        try:
            if cap is None:
                sides: Sequence[Side] = env.sides
            else:
                started = ctx.attempt(
                    "capped", "start the servers", lambda c=cap, f=fleet: _capped_sides(ctx, f, c)
                )
                if started is None:
                    continue
                sides = started
            for side in ctx.order(0 if cap is None else 1, sides):
                ctx.log(f"5 {n} clients, cold {_mib(size)} blob, {label}: {side.label}")
                before_bytes = side.upstream.bytes_down
                before_gets = side.upstream.count_requests("GET", digest)
                assert side.pid is not None
                url = side.blob_url(BLOB_REPO, digest)
                with (
                    RssMonitor(side.pid) as monitor,
                    TransferWatch(side.upstream, size) as watch,
                    ctx.profiled(side, "5 fan out", label),
                ):
                    res = ctx.attempt(
                        side,
                        f"{n} concurrent cold GETs ({label})",
                        lambda u=url: concurrent_curl(u, n, expect_size=size),
                    )
                _peak(ctx, "5", side.key, monitor)
                if res is None:
                    continue
                for error in res.errors[:5]:
                    ctx.failures.append(f"{side.label}: {label}: {error}")
                ctx.attempt(side, "store blob", lambda s=side: env.wait_stored(s, [digest]))  # noqa: B023
                run = _FanOut(
                    res,
                    (side.upstream.bytes_down - before_bytes) / size,
                    side.upstream.count_requests("GET", digest) - before_gets,
                    watch.done_at - res.started if watch.done_at is not None else None,
                )
                runs[side.key] = run
                ttfbs = [r.ttfb for r in res.results]
                ctx.log(
                    f"  wall {res.wall:.2f} s, TTFB median {_med(ttfbs) or 0:.3f} s, "
                    f"{run.copies:.2f} upstream copies, first copy after "
                    f"{run.first_copy or 0:.2f} s, {len(res.errors)} errors"
                )
        finally:
            fleet.stop()
        _concurrent_rows(ctx, label, cap, size, hex_, runs)


def _concurrent_rows(
    ctx: Context,
    label: str,
    cap: float | None,
    size: int,
    hex_: str,
    runs: dict[str, _FanOut],
) -> None:
    n = ctx.params.clients
    scenario = f"5 {n} clients, one cold {_mib(size)} blob, {label}"

    def each(fn: Callable[[_FanOut], float | None]) -> dict[str, float | None]:
        return {key: fn(run) for key, run in runs.items()}

    walls = each(lambda r: r.result.wall)
    if cap is None:
        ctx.rows.append(peer_row(scenario, "total wall time", walls, "s"))
    else:
        one = size / cap
        ctx.rows.append(
            peer_row(
                scenario,
                f"total wall time (one transfer at the cap: {one:.2f} s)",
                walls,
                "s",
                target=Target("≤ nginx's", rm_at_most_peer(1.0, "nginx")),
            )
        )
    ctx.rows.append(
        peer_row(
            scenario,
            "time until one full copy came from upstream",
            each(lambda r: r.first_copy),
            "s",
        )
    )

    def ttfb(run: _FanOut) -> tuple[float, str] | None:
        if not run.result.results:
            return None
        values = sorted(x.ttfb for x in run.result.results)
        med = median(values)
        return med, f"{values[0]:.3f} / {med:.3f} / {values[-1]:.3f}"

    ttfbs = {key: ttfb(run) for key, run in runs.items()}
    ctx.rows.append(
        peer_row(
            scenario,
            "TTFB per client min / median / max, s",
            {k: v[0] if v else None for k, v in ttfbs.items()},
            texts={k: v[1] if v else None for k, v in ttfbs.items()},
            target=Target("median ≤ 0.1 s", rm_at_most(0.1)),
        )
    )
    ctx.rows.append(
        peer_row(
            scenario,
            "upstream copies of the blob (bytes ÷ size)",
            each(lambda r: r.copies),
            "x",
            show_ratio=False,
            target=Target("exactly 1", rm_between(0.99, 1.01)),
        )
    )
    ctx.rows.append(
        peer_row(
            scenario,
            "upstream GET requests for the blob",
            each(lambda r: r.gets),
            digits=0,
            show_ratio=False,
        )
    )

    def good(run: _FanOut) -> float:
        return float(sum(1 for x in run.result.results if x.sha256 == hex_ and x.status == 200))

    verified = each(good)
    ctx.rows.append(
        peer_row(
            scenario,
            "bodies with the right sha256",
            verified,
            texts={k: f"{v:.0f}/{n}" for k, v in verified.items() if v is not None},
            show_ratio=False,
            target=Target(f"{n}/{n}", rm_between(n, n)),
        )
    )


def _ensure_cached_blob(ctx: Context, size: int) -> tuple[str, int]:
    if ctx.cached_blob is not None and ctx.cached_blob[1] == size:
        return ctx.cached_blob
    env = ctx.env
    blob = random_blob("bench/rss", size)
    ctx.log(f"6: preparing a cached {_mib(size)} blob")
    env.push_blob(blob)
    digest = blob.digest
    del blob
    for side in env.sides:
        curl_get(side.blob_url(BLOB_REPO, digest), expect_size=size)
        env.wait_stored(side, [digest])
    ctx.cached_blob = (digest, size)
    return ctx.cached_blob


def rss(ctx: Context) -> None:
    """6: peak RSS while 32 clients download a cached 256 MiB blob (and during 5)."""
    p = ctx.params
    n = p.clients
    digest, size = _ensure_cached_blob(ctx, p.rss_blob_size)
    walls: dict[str, float] = {}
    for side in ctx.order(0):
        assert side.pid is not None
        ctx.log(f"6 {n} x {_mib(size)} cached downloads: {side.label}")
        url = side.blob_url(BLOB_REPO, digest)
        with RssMonitor(side.pid) as monitor, ctx.profiled(side, "6 cached downloads"):
            res = ctx.attempt(
                side,
                f"{n} concurrent cached GETs",
                lambda u=url: concurrent_curl(u, n, expect_size=size, hash_bodies=False),
            )
        _peak(ctx, "6", side.key, monitor)
        if res is not None:
            for error in res.errors[:5]:
                ctx.failures.append(f"{side.label}: cached downloads: {error}")
            walls[side.key] = res.wall
            ctx.log(f"  wall {res.wall:.2f} s, peak RSS {monitor.peak_mib:.1f} MiB")
    scenario_cached = f"6 {n} concurrent cached {_mib(size)} downloads"

    def throughput(key: str) -> float | None:
        w = walls.get(key)
        return n * size / MiB / w if w else None

    ctx.rows.append(
        peer_row(
            scenario_cached,
            "aggregate throughput, MiB/s",
            {key: throughput(key) for key in walls},
            "MiB/s",
            digits=0,
        )
    )


def rss_rows(ctx: Context) -> None:
    """The peak-RSS rows of every phase measured so far (idle, 5 and/or 6): the largest
    single process (the target is per worker process) and the whole process tree."""
    n = ctx.params.clients
    phases = {
        "idle": "after start-up (idle)",
        "5": f"during 5 ({n} clients, cold blob, both runs)",
        "6": f"during {n} concurrent cached {_mib(ctx.params.rss_blob_size)} downloads",
    }
    for phase, text in phases.items():
        largest = ctx.rss_process.get(phase)
        if largest:
            ctx.rows.append(
                peer_row(
                    "6 peak RSS, largest process (a worker)",
                    text,
                    dict(largest),
                    "MB",
                    digits=1,
                    target=Target("≤ 80 MB per worker process", rm_at_most(80.0)),
                )
            )
    for phase, text in phases.items():
        total = ctx.rss.get(phase)
        if total:
            ctx.rows.append(
                peer_row(
                    "6 peak RSS, all processes (master, workers, helpers)",
                    text,
                    dict(total),
                    "MB",
                    digits=1,
                )
            )


SCENARIOS: dict[str, tuple[str, Callable[[Context], None]]] = {
    "1": ("cold-pull", cold_pull),
    "2": ("warm-pull", warm_pull),
    "3": ("blob", blob_get),
    "4": ("manifest", manifests),
    "5": ("concurrent", concurrent_cold),
    "6": ("rss", rss),
    "9": ("store-size", store_size),
}
