"""The scenarios: one function each, measuring distribution (proxy mode) and regmirror
in the same run, appending ``Row``s to the context.

Measurements alternate the order of the two sides from one repetition to the next,
so that neither always runs first on a noisy machine.
"""

from __future__ import annotations

import math
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
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
    MiB,
    RssMonitor,
    Side,
    TransferWatch,
    random_blob,
    wait_quiet,
)
from bench.report import Row, Target, format_value, rm_at_least, rm_at_most, rm_between
from tests.support.images import DOCKER_MANIFEST, Image, docker_image
from tests.support.rawhttp import request
from tests.support.skopeo import verify_dir

T = TypeVar("T")
MB = 1_000_000


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
            pull_repeats=5,
            blob_size=256 * MiB,
            cold_blob_runs=5,
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
    # Peak RSS (MB) per side key, per phase.
    rss: dict[str, dict[str, float]] = field(default_factory=dict)

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

    def order(self, i: int) -> Sequence[Side]:
        dist, rm = self.env.sides
        return (dist, rm) if i % 2 == 0 else (rm, dist)


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
    """1: skopeo copy of a ~200 MB image in 4 layers, empty caches, plus the direct floor."""
    env, p = ctx.env, ctx.params
    assert env.upstream is not None and env.direct is not None
    direct_times: list[float] = []
    times: dict[str, list[float]] = {"dist": [], "rm": []}
    copies: dict[str, list[float]] = {"dist": [], "rm": []}
    size = 0
    for r in range(p.pull_repeats):
        image = _bench_image(ctx, r)
        size = _image_bytes(image)
        ctx.log(f"1 cold pull {r + 1}/{p.pull_repeats}: pushing {_mib(size)} image")
        env.push_image(image)
        direct_host = env.direct.host
        t = ctx.attempt("direct", "pull", lambda: _pull(ctx, direct_host, image))  # noqa: B023
        if t is not None:
            direct_times.append(t)
            ctx.log(f"  direct {t:.2f} s")
        for side in ctx.order(r):
            before = side.proxy.bytes_down

            def pull(side: Side = side) -> float:
                seconds = _pull(ctx, side.host, image)  # noqa: B023
                env.wait_stored(side, [b.digest for b in image.blobs()])  # noqa: B023
                return seconds

            t = ctx.attempt(side, "cold pull", pull)
            if t is not None:
                times[side.key].append(t)
                copies[side.key].append((side.proxy.bytes_down - before) / size)
                ctx.log(f"  {side.label} {t:.2f} s, {copies[side.key][-1]:.2f}x image upstream")
        ctx.pulled.append(image)
    direct = _med(direct_times)
    dist_t, rm_t = _med(times["dist"]), _med(times["rm"])

    def vs_direct(value: float | None) -> str | None:
        if value is None or direct is None:
            return None
        return f"{value:.2f} s ({value / direct:.2f}x direct)"

    def within_direct(_d: float | None, rm: float | None) -> bool | None:
        return None if rm is None or direct is None else rm <= 1.1 * direct

    scenario = f"1 cold pull, {_mib(size)} in {p.layers} layers"
    n = p.pull_repeats
    direct_text = f"{direct:.2f} s" if direct is not None else "failed"
    ctx.rows.append(
        Row(
            scenario,
            f"wall time, median of {n} (direct from upstream: {direct_text})",
            dist_t,
            rm_t,
            "s",
            dist_text=vs_direct(dist_t),
            rm_text=vs_direct(rm_t),
            target=Target("≤ 1.1x direct", within_direct),
        )
    )
    dist_c, rm_c = _med(copies["dist"]), _med(copies["rm"])
    ctx.rows.append(
        Row(
            scenario,
            "upstream bytes (x image size)",
            dist_c,
            rm_c,
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
    times: dict[str, list[float]] = {"dist": [], "rm": []}
    upstream_requests: dict[str, list[int]] = {"dist": [], "rm": []}
    for i, image in enumerate(images):
        for side in ctx.order(i):
            before = side.proxy.count_requests()
            t = ctx.attempt(side, "warm pull", lambda s=side: _pull(ctx, s.host, image))  # noqa: B023
            if t is not None:
                times[side.key].append(t)
                upstream_requests[side.key].append(side.proxy.count_requests() - before)
                ctx.log(f"2 warm pull: {side.label} {t:.2f} s")
    scenario = f"2 warm pull, {_mib(_image_bytes(images[0]))}"
    ctx.rows.append(
        Row(
            scenario,
            f"wall time, median of {len(images)}",
            _med(times["dist"]),
            _med(times["rm"]),
            "s",
        )
    )
    ctx.rows.append(
        Row(
            scenario,
            "upstream requests per pull",
            _med(upstream_requests["dist"]),
            _med(upstream_requests["rm"]),
            digits=0,
            show_ratio=False,
        )
    )


# --- 3: one big blob -------------------------------------------------------------------


def blob_get(ctx: Context) -> None:
    """3: GET of one 256 MiB blob, cold (a new blob per run) and cached; curl's speed."""
    env, p = ctx.env, ctx.params
    cold: dict[str, list[float]] = {"dist": [], "rm": []}
    copies: dict[str, list[float]] = {"dist": [], "rm": []}
    direct: list[float] = []
    assert env.direct is not None
    first = None
    for i in range(p.cold_blob_runs):
        blob = random_blob(f"bench/blob/{i}", p.blob_size)
        ctx.log(f"3 cold blob GET {i + 1}/{p.cold_blob_runs}: pushing {_mib(blob.size)}")
        env.push_blob(blob)
        digest, size = blob.digest, blob.size
        del blob
        first = first or (digest, size)
        for side in ctx.order(i):
            before = side.proxy.bytes_down

            def get(side: Side = side) -> CurlResult:
                result = curl_get(side.blob_url(BLOB_REPO, digest), expect_size=size)  # noqa: B023
                env.wait_stored(side, [digest])  # noqa: B023
                return result

            result = ctx.attempt(side, "cold blob GET", get)
            if result is not None:
                cold[side.key].append(result.speed / MiB)
                copies[side.key].append((side.proxy.bytes_down - before) / size)
                ctx.log(f"  {side.label} {result.speed / MiB:.1f} MiB/s")
        direct_url = f"{env.direct.url}/v2/{BLOB_REPO}/blobs/{digest}"
        result = ctx.attempt("direct", "blob GET", lambda: curl_get(direct_url, expect_size=size))  # noqa: B023
        if result is not None:
            direct.append(result.speed / MiB)
            ctx.log(f"  direct from upstream {result.speed / MiB:.1f} MiB/s")
    assert first is not None
    ctx.cached_blob = first
    digest, size = first
    cached: dict[str, list[float]] = {"dist": [], "rm": []}
    for j in range(p.cached_blob_runs):
        for side in ctx.order(j):
            url = side.blob_url(BLOB_REPO, digest)
            result = ctx.attempt(
                side, "cached blob GET", lambda u=url: curl_get(u, expect_size=size)
            )
            if result is not None:
                cached[side.key].append(result.speed / MiB)
        ctx.log(f"3 cached blob GET {j + 1}/{p.cached_blob_runs}")
    scenario = f"3 one {_mib(size)} blob, curl"
    ctx.rows.append(
        Row(
            scenario,
            f"cold GET, MiB/s (median of {p.cold_blob_runs}, a new blob each; "
            f"direct from upstream: {format_value(_med(direct), 'MiB/s', 1)})",
            _med(cold["dist"]),
            _med(cold["rm"]),
            "MiB/s",
            digits=1,
            target=Target("≥ 2x distribution", rm_at_least(2.0)),
        )
    )
    ctx.rows.append(
        Row(
            scenario,
            "cold GET: upstream copies of the blob",
            _med(copies["dist"]),
            _med(copies["rm"]),
            "x",
            show_ratio=False,
            target=Target("= 1", rm_between(0.99, 1.01)),
        )
    )
    ctx.rows.append(
        Row(
            scenario,
            f"cached GET, MiB/s (median of {p.cached_blob_runs})",
            _med(cached["dist"]),
            _med(cached["rm"]),
            "MiB/s",
            digits=1,
            target=Target("≥ 1.0x distribution", rm_at_least(1.0)),
        )
    )
    tls_speeds = _cached_blob_over_tls(ctx, size)
    ctx.rows.append(
        Row(
            scenario,
            f"cached GET over TLS, MiB/s (median of {p.cached_blob_runs}; curl --cacert)",
            _med(tls_speeds["dist"]),
            _med(tls_speeds["rm"]),
            "MiB/s",
            digits=1,
            target=Target("≥ 1.0x distribution (TLS)", rm_at_least(1.0)),
        )
    )


def _cached_blob_over_tls(ctx: Context, size: int) -> dict[str, list[float]]:
    """3, over TLS: a TLS regmirror and a TLS distribution proxy (fresh stores), each
    primed with one GET of a new blob of ``size`` bytes, then cached GETs with curl
    verifying the certificate."""
    env, p = ctx.env, ctx.params
    speeds: dict[str, list[float]] = {"dist": [], "rm": []}
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
        sides = (tls.dist, tls.rm)
        for side in sides:
            url = side.blob_url(BLOB_REPO, digest)
            primed = ctx.attempt(
                side,
                "TLS priming GET",
                lambda u=url: curl_get(u, expect_size=size, cacert=cacert),
            )
            if primed is not None:
                env.wait_stored(side, [digest])
        for j in range(p.cached_blob_runs):
            for side in sides if j % 2 == 0 else sides[::-1]:
                url = side.blob_url(BLOB_REPO, digest)
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


def manifests(ctx: Context) -> None:
    """4: manifest GET by digest (wrk) and HEAD by tag (ab -i), cached."""
    env, p = ctx.env, ctx.params
    image = docker_image("bench/small", "v1", seed="bench/small")
    env.push_image(image)
    accept = {"Accept": DOCKER_MANIFEST}
    for side in env.sides:  # prime both caches: tag, digest, blobs
        for ref in (image.tag, image.digest):
            resp = request(side.url, "GET", f"/v2/{image.name}/manifests/{ref}", headers=accept)
            if resp.status != 200:
                ctx.failures.append(f"{side.label}: priming GET manifest {ref}: {resp.status}")
    duration = p.load_duration
    wrk_results: dict[str, object] = {}
    wrk_upstream: dict[str, float] = {}
    for side in ctx.order(0):
        wait_quiet(side.proxy, quiet=0.2)
        before = side.proxy.count_requests()
        url = f"{side.url}/v2/{image.name}/manifests/{image.digest}"
        ctx.log(f"4 manifest GET by digest: wrk {duration:g} s on {side.label}")
        res = ctx.attempt(
            side,
            "wrk GET manifest by digest",
            lambda u=url: run_wrk(u, duration=duration, headers=accept),
        )
        if res is not None:
            wrk_results[side.key] = res
            wrk_upstream[side.key] = side.proxy.count_requests() - before
            ctx.log(f"  {res.rps:,.0f} requests/s, {res.errors} errors")
    ab_results: dict[str, object] = {}
    ab_upstream: dict[str, float] = {}
    for side in ctx.order(1):
        wait_quiet(side.proxy, quiet=0.2)
        before = side.proxy.count_requests()
        url = f"{side.url}/v2/{image.name}/manifests/{image.tag}"
        ctx.log(f"4 manifest HEAD by tag: ab {duration:g} s on {side.label}")
        res2 = ctx.attempt(
            side,
            "ab HEAD manifest by tag",
            lambda u=url: run_ab_head(u, duration=duration, headers=accept),
        )
        if res2 is not None:
            ab_results[side.key] = res2
            ab_upstream[side.key] = side.proxy.count_requests() - before
            ctx.log(f"  {res2.rps:,.0f} requests/s, {res2.errors} errors")

    def rps(results: dict[str, object], key: str) -> float | None:
        r = results.get(key)
        return getattr(r, "rps", None)

    d = f"{duration:g} s"
    s_get = f"4 manifest GET by digest (wrk -t2 -c32 {d})"
    ctx.rows.append(
        Row(
            s_get,
            "requests/s",
            rps(wrk_results, "dist"),
            rps(wrk_results, "rm"),
            digits=0,
            dist_text=_rps_text(wrk_results.get("dist")),
            rm_text=_rps_text(wrk_results.get("rm")),
            target=Target("≥ 10x distribution", rm_at_least(10.0)),
        )
    )
    ctx.rows.append(
        Row(
            s_get,
            "latency p50 / p90 / p99, ms",
            dist_text=_latency_text(wrk_results.get("dist")),
            rm_text=_latency_text(wrk_results.get("rm")),
        )
    )
    ctx.rows.append(
        Row(
            s_get,
            "upstream requests during the run",
            wrk_upstream.get("dist"),
            wrk_upstream.get("rm"),
            digits=0,
            show_ratio=False,
        )
    )
    freshness = _freshness_seconds(env)
    windows = max(1, math.floor(duration / freshness) + 1) if freshness else None
    s_head = f"4 manifest HEAD by tag (ab -k -i -c32 {d})"
    ctx.rows.append(
        Row(
            s_head,
            "requests/s",
            rps(ab_results, "dist"),
            rps(ab_results, "rm"),
            digits=0,
            dist_text=_rps_text(ab_results.get("dist")),
            rm_text=_rps_text(ab_results.get("rm")),
            target=Target("≥ 30x distribution", rm_at_least(30.0)),
        )
    )
    ctx.rows.append(
        Row(
            s_head,
            "latency p50 / p90 / p99, ms (ab: whole ms)",
            dist_text=_latency_text(ab_results.get("dist")),
            rm_text=_latency_text(ab_results.get("rm")),
        )
    )
    fresh_text = f"{freshness:g} s" if freshness is not None else "?"
    ctx.rows.append(
        Row(
            s_head,
            f"upstream requests during the run (tag freshness {fresh_text})",
            ab_upstream.get("dist"),
            ab_upstream.get("rm"),
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


def _peak(ctx: Context, phase: str, key: str, mib: float) -> None:
    phase_peaks = ctx.rss.setdefault(phase, {})
    phase_peaks[key] = max(phase_peaks.get(key, 0.0), mib * MiB / MB)


@dataclass
class _FanOut:
    """One side's run of scenario 5."""

    result: ConcurrentResult
    copies: float  # upstream bytes / blob size
    gets: int  # upstream GET requests for the blob
    first_copy: float | None  # s from the release of the clients to one full upstream copy


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
        env.set_rate(cap)
        runs: dict[str, _FanOut] = {}
        try:
            for side in ctx.order(0 if cap is None else 1):
                ctx.log(f"5 {n} clients, cold {_mib(size)} blob, {label}: {side.label}")
                before_bytes = side.proxy.bytes_down
                before_gets = side.proxy.count_requests("GET", digest)
                assert side.pid is not None
                url = side.blob_url(BLOB_REPO, digest)
                with RssMonitor(side.pid) as monitor, TransferWatch(side.proxy, size) as watch:
                    res = ctx.attempt(
                        side,
                        f"{n} concurrent cold GETs ({label})",
                        lambda u=url: concurrent_curl(u, n, expect_size=size),
                    )
                _peak(ctx, "5", side.key, monitor.peak_mib)
                if res is None:
                    continue
                for error in res.errors[:5]:
                    ctx.failures.append(f"{side.label}: {label}: {error}")
                ctx.attempt(side, "store blob", lambda s=side: env.wait_stored(s, [digest]))  # noqa: B023
                run = _FanOut(
                    res,
                    (side.proxy.bytes_down - before_bytes) / size,
                    side.proxy.count_requests("GET", digest) - before_gets,
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
            env.set_rate(None)
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
    results = {key: run.result for key, run in runs.items()}

    def wall(key: str) -> float | None:
        r = results.get(key)
        return r.wall if r is not None else None

    def attr(key: str, name: str) -> float | None:
        run = runs.get(key)
        return getattr(run, name) if run is not None else None

    if cap is None:
        ctx.rows.append(Row(scenario, "total wall time", wall("dist"), wall("rm"), "s"))
    else:
        one = size / cap
        ctx.rows.append(
            Row(
                scenario,
                f"total wall time (one transfer at the cap: {one:.2f} s)",
                wall("dist"),
                wall("rm"),
                "s",
                target=Target("≤ 1.2x one transfer", rm_at_most(1.2 * one)),
            )
        )
    ctx.rows.append(
        Row(
            scenario,
            "time until one full copy came from upstream",
            attr("dist", "first_copy"),
            attr("rm", "first_copy"),
            "s",
        )
    )

    def ttfb(key: str) -> tuple[float | None, str | None]:
        r = results.get(key)
        if r is None or not r.results:
            return None, None
        values = sorted(x.ttfb for x in r.results)
        med = median(values)
        return med, f"{values[0]:.3f} / {med:.3f} / {values[-1]:.3f}"

    (dm, dt), (rmm, rt) = ttfb("dist"), ttfb("rm")
    ctx.rows.append(
        Row(
            scenario,
            "TTFB per client min / median / max, s",
            dm,
            rmm,
            dist_text=dt,
            rm_text=rt,
            target=Target("median ≤ 0.1 s", rm_at_most(0.1)),
        )
    )
    ctx.rows.append(
        Row(
            scenario,
            "upstream copies of the blob (bytes ÷ size)",
            attr("dist", "copies"),
            attr("rm", "copies"),
            "x",
            show_ratio=False,
            target=Target("exactly 1", rm_between(0.99, 1.01)),
        )
    )
    ctx.rows.append(
        Row(
            scenario,
            "upstream GET requests for the blob",
            attr("dist", "gets"),
            attr("rm", "gets"),
            digits=0,
            show_ratio=False,
        )
    )

    def verified(key: str) -> tuple[float | None, str | None]:
        r = results.get(key)
        if r is None:
            return None, None
        good = sum(1 for x in r.results if x.sha256 == hex_ and x.status == 200)
        return float(good), f"{good}/{n}"

    (dv, dvt), (rv, rvt) = verified("dist"), verified("rm")
    ctx.rows.append(
        Row(
            scenario,
            "bodies with the right sha256",
            dv,
            rv,
            dist_text=dvt,
            rm_text=rvt,
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
        with RssMonitor(side.pid) as monitor:
            res = ctx.attempt(
                side,
                f"{n} concurrent cached GETs",
                lambda u=url: concurrent_curl(u, n, expect_size=size, hash_bodies=False),
            )
        _peak(ctx, "6", side.key, monitor.peak_mib)
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
        Row(
            scenario_cached,
            "aggregate throughput, MiB/s",
            throughput("dist"),
            throughput("rm"),
            "MiB/s",
            digits=0,
        )
    )


def rss_rows(ctx: Context) -> None:
    """The peak-RSS rows of every phase measured so far (5 and/or 6)."""
    n = ctx.params.clients
    phases = {
        "idle": "after start-up (idle)",
        "5": f"during 5 ({n} clients, cold blob, both runs)",
        "6": f"during {n} concurrent cached {_mib(ctx.params.rss_blob_size)} downloads",
    }
    for phase, text in phases.items():
        peaks = ctx.rss.get(phase)
        if not peaks:
            continue
        ctx.rows.append(
            Row(
                "6 peak RSS of the mirror process",
                text,
                peaks.get("dist"),
                peaks.get("rm"),
                "MB",
                digits=1,
                target=Target("≤ 80 MB", rm_at_most(80.0)),
            )
        )


SCENARIOS: dict[str, tuple[str, Callable[[Context], None]]] = {
    "1": ("cold-pull", cold_pull),
    "2": ("warm-pull", warm_pull),
    "3": ("blob", blob_get),
    "4": ("manifest", manifests),
    "5": ("concurrent", concurrent_cold),
    "6": ("rss", rss),
}
