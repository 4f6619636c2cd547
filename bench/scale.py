"""Scenarios 7 and 8 (issue 11): regmirror as a cluster of replicas, and as workers.

7 ``cluster``: three regmirror replicas over one shared store and one Redis, beside
three distribution proxies over one shared store of their own, each trio behind one
counted door to the upstream; the same concurrent cold pulls through both: three
skopeo pulls of one image at once (one per replica), then 30 curl clients of one cold
blob spread over the three. Upstream bytes per trio, as a multiple of what was pulled.

8 ``workers``: ``regmirror.workers: 2`` against ``workers: 1`` (two fresh mirrors, each
with its own counted door to the upstream): manifest GET by digest under wrk, and 32 clients of one
cold blob.

Everything is started for the scenario (a redis-server from Debian for 7; the parent's
private one for 8) and stopped by PID at its end, also when it fails.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.clients import ConcurrentResult, LoadResult, concurrent_curl, median, run_wrk
from bench.env import BLOB_REPO, Fleet, MiB, UpstreamPath, random_blob, wait_quiet
from bench.env import cluster_connected as _connected
from bench.report import Row, Target, rm_between
from bench.scenarios import Context, _latency_text, _rps_text
from tests.support.images import DOCKER_MANIFEST, Image, docker_image
from tests.support.merge import deep_merge
from tests.support.mirror import Mirror
from tests.support.rawhttp import request
from tests.support.redis import RedisServer
from tests.support.skopeo import verify_dir
from tests.support.upstream import UpstreamRegistry
from tests.support.wait import poll_until

REPLICAS = 3
CLUSTER_CLIENTS = 30
CLUSTER = ("3 distribution proxies", "3 regmirror replicas", "ratio rm/dist")
WORKERS = ("workers: 1", "workers: 2", "ratio 2/1")


def _mirror(ctx: Context, base: Path, upstream: str, extra: dict[str, Any]) -> Mirror:
    """A regmirror for a scenario: ``--regmirror-config`` applies, what the scenario
    sets (the cluster, the workers) wins."""
    config = deep_merge({"regmirror": {"access_log": False}}, ctx.env.regmirror_extra)
    return Mirror(
        base,
        upstream,
        tag_freshness=ctx.env.tag_freshness,
        log_level="info",
        extra=deep_merge(config, extra),
        ready_timeout=60.0,
    )


# --- 7: a cluster ----------------------------------------------------------------------


@dataclass
class _Trio:
    key: str  # "dist" or "rm"
    hosts: list[str]
    proxy: UpstreamPath


def _start_cluster(ctx: Context, base: Path, fleet: Fleet) -> tuple[_Trio, _Trio]:
    env = ctx.env
    assert env.upstream is not None
    redis = fleet.start(RedisServer(base / "redis"))
    dist_proxy = env.fresh_path(fleet)
    dist_store = base / "dist-store"
    dists = []
    for i in range(REPLICAS):
        extra = {
            "proxy": {"remoteurl": dist_proxy.url},
            "storage": {"filesystem": {"rootdirectory": str(dist_store)}},
            "log": {"level": "warn", "accesslog": {"disabled": True}},
        }
        dists.append(fleet.start(UpstreamRegistry(base / f"dist{i}", extra_config=extra)))
    rm_proxy = env.fresh_path(fleet)
    rm_store = base / "rm-store"
    rms = []
    for i in range(REPLICAS):
        extra = {
            "storage": {"filesystem": {"rootdirectory": str(rm_store)}},
            "regmirror": {"cluster": {"redis": redis.url, "replica": f"r{i}"}},
        }
        rms.append(fleet.start(_mirror(ctx, base / f"rm{i}", rm_proxy.url, extra)))
    poll_until(lambda: all(_connected(m) for m in rms), 30, what="the replicas joined Redis")
    return (
        _Trio("dist", [d.host for d in dists], dist_proxy),
        _Trio("rm", [m.host for m in rms], rm_proxy),
    )


def _pull_all(ctx: Context, hosts: Sequence[str], image: Image) -> float:
    """One skopeo pull of ``image`` per host, released together; the wall time of all."""
    from bench.clients import timed_skopeo_pull

    barrier = threading.Barrier(len(hosts))
    errors: list[BaseException] = []
    dests = [Path(tempfile.mkdtemp(prefix="pull-", dir=ctx.tmp)) for _ in hosts]

    def pull(i: int) -> None:
        try:
            barrier.wait(30)
            timed_skopeo_pull(image.ref(hosts[i]), dests[i])
            verify_dir(dests[i], image)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=pull, args=(i,)) for i in range(len(hosts))]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    wall = time.monotonic() - start
    for dest in dests:
        shutil.rmtree(dest, ignore_errors=True)
    if errors:
        raise errors[0]
    return wall


def cluster(ctx: Context) -> None:
    """7: three replicas of each over a shared store, the same concurrent cold pulls."""
    p = ctx.params
    fleet = Fleet()
    base = ctx.tmp / "cluster"
    try:
        ctx.log("7 cluster: starting redis-server, 3 distribution proxies, 3 regmirror replicas")
        trios = _start_cluster(ctx, base, fleet)
        image = docker_image(
            "bench/cluster",
            "v1",
            seed="bench/cluster",
            layer_sizes=(p.layer_size,) * p.layers,
            layer_format="raw",
        )
        size = sum(b.size for b in image.blobs()) + image.manifest.size
        ctx.env.push_image(image)
        blob = random_blob("bench/cluster/blob", p.concurrent_blob_size)
        ctx.env.push_blob(blob)
        digest, hex_, blob_size = blob.digest, blob.hex, blob.size
        del blob
        pulls: dict[str, tuple[float, float]] = {}
        fans: dict[str, tuple[ConcurrentResult, float, int]] = {}
        for trio in trios:
            label = CLUSTER[0] if trio.key == "dist" else CLUSTER[1]
            ctx.log(f"7 cluster: 3 concurrent cold pulls ({size / MiB:.0f} MiB), {label}")
            before = trio.proxy.bytes_down
            wall = ctx.attempt(
                label, "3 concurrent pulls", lambda t=trio: _pull_all(ctx, t.hosts, image)
            )
            wait_quiet(trio.proxy, timeout=300)
            if wall is not None:
                pulls[trio.key] = (wall, (trio.proxy.bytes_down - before) / size)
                ctx.log(f"  {wall:.2f} s, {pulls[trio.key][1]:.2f}x image upstream")
            ctx.log(f"7 cluster: {CLUSTER_CLIENTS} clients of a cold blob over 3, {label}")
            before = trio.proxy.bytes_down
            gets = trio.proxy.count_requests("GET", digest)
            urls = [f"http://{h}/v2/{BLOB_REPO}/blobs/{digest}" for h in trio.hosts]
            res = ctx.attempt(
                label,
                f"{CLUSTER_CLIENTS} cold GETs over 3 replicas",
                lambda u=urls: concurrent_curl(u, CLUSTER_CLIENTS, expect_size=blob_size),
            )
            wait_quiet(trio.proxy, timeout=300)
            if res is not None:
                copies = (trio.proxy.bytes_down - before) / blob_size
                fans[trio.key] = (res, copies, trio.proxy.count_requests("GET", digest) - gets)
                ctx.failures.extend(f"{label}: {e}" for e in res.errors[:5])
                ctx.log(f"  wall {res.wall:.2f} s, {copies:.2f} upstream copies")
        _cluster_rows(ctx, size, blob_size, hex_, pulls, fans)
    finally:
        fleet.stop()


def _cluster_rows(
    ctx: Context,
    size: int,
    blob_size: int,
    hex_: str,
    pulls: dict[str, tuple[float, float]],
    fans: dict[str, tuple[ConcurrentResult, float, int]],
) -> None:
    def pull(key: str, i: int) -> float | None:
        return pulls[key][i] if key in pulls else None

    def fan(key: str, fn: Callable[[tuple[ConcurrentResult, float, int]], float]) -> float | None:
        return fn(fans[key]) if key in fans else None

    s_pull = (
        f"7 cluster: 3 concurrent cold pulls of one {size / MiB:.0f} MiB image, one per replica"
    )
    rows = [
        Row(s_pull, "wall time (all three)", pull("dist", 0), pull("rm", 0), "s"),
        Row(
            s_pull,
            "upstream bytes (x image size)",
            pull("dist", 1),
            pull("rm", 1),
            "x image",
            target=Target("= 1.0x image", rm_between(0.99, 1.01)),
        ),
    ]
    n = CLUSTER_CLIENTS
    s_fan = f"7 cluster: {n} clients of one cold {blob_size / MiB:g} MiB blob, {n // 3} per replica"
    good = lambda f: float(sum(1 for r in f[0].results if r.sha256 == hex_ and r.status == 200))  # noqa: E731
    rows += [
        Row(
            s_fan,
            "total wall time",
            fan("dist", lambda f: f[0].wall),
            fan("rm", lambda f: f[0].wall),
            "s",
        ),
        Row(
            s_fan,
            "upstream copies of the blob (bytes ÷ size)",
            fan("dist", lambda f: f[1]),
            fan("rm", lambda f: f[1]),
            "x",
            show_ratio=False,
            target=Target("exactly 1", rm_between(0.99, 1.01)),
        ),
        Row(
            s_fan,
            "upstream GET requests for the blob",
            fan("dist", lambda f: f[2]),
            fan("rm", lambda f: f[2]),
            digits=0,
            show_ratio=False,
        ),
        _bodies_row(s_fan, n, fan("dist", good), fan("rm", good)),
    ]
    for row in rows:
        row.columns = CLUSTER
    ctx.rows.extend(rows)


def _bodies_row(scenario: str, n: int, left: float | None, right: float | None) -> Row:
    return Row(
        scenario,
        "bodies with the right sha256",
        left,
        right,
        digits=0,
        show_ratio=False,
        target=Target(f"{n}/{n}", rm_between(n, n)),
    )


# --- 8: workers ------------------------------------------------------------------------


def workers(ctx: Context) -> None:
    """8: ``workers: 2`` against ``workers: 1``: manifest GET by digest, 32 clients of a
    cold blob."""
    env, p = ctx.env, ctx.params
    assert env.upstream is not None
    fleet = Fleet()
    base = ctx.tmp / "workers"
    try:
        ctx.log("8 workers: starting regmirror with workers: 1 and with workers: 2")
        sides: dict[int, tuple[Mirror, UpstreamPath]] = {}
        for count in (1, 2):
            proxy = env.fresh_path(fleet)
            extra = {"regmirror": {"workers": count}}
            mirror = fleet.start(_mirror(ctx, base / f"w{count}", proxy.url, extra))
            sides[count] = (mirror, proxy)
        poll_until(lambda: _connected(sides[2][0]), 30, what="the workers joined their Redis")
        image = docker_image("bench/workers", "v1", seed="bench/workers")
        env.push_image(image)
        accept = {"Accept": DOCKER_MANIFEST}
        loads: dict[int, LoadResult] = {}
        for count in (2, 1):
            mirror, proxy = sides[count]
            for ref in (image.tag, image.digest):
                path = f"/v2/{image.name}/manifests/{ref}"
                request(mirror.url, "GET", path, headers=accept)
            url = f"{mirror.url}/v2/{image.name}/manifests/{image.digest}"
            ctx.log(f"8 manifest GET by digest: wrk {p.load_duration:g} s, workers: {count}")
            res = ctx.attempt(
                f"workers: {count}",
                "wrk GET manifest by digest",
                lambda u=url: run_wrk(u, duration=p.load_duration, headers=accept),
            )
            if res is not None:
                loads[count] = res
                ctx.log(f"  {res.rps:,.0f} requests/s, {res.errors} errors")
        fans: dict[int, tuple[ConcurrentResult, float, str]] = {}
        for count in (1, 2):
            mirror, proxy = sides[count]
            blob = random_blob(f"bench/workers/{count}", p.concurrent_blob_size)
            env.push_blob(blob)
            digest, hex_, size = blob.digest, blob.hex, blob.size
            del blob
            ctx.log(f"8 {p.clients} clients of a cold {size / MiB:g} MiB blob, workers: {count}")
            before = proxy.bytes_down
            url = f"{mirror.url}/v2/{BLOB_REPO}/blobs/{digest}"
            fan = ctx.attempt(
                f"workers: {count}",
                f"{p.clients} cold GETs",
                lambda u=url, s=size: concurrent_curl(u, p.clients, expect_size=s),
            )
            wait_quiet(proxy, timeout=300)
            if fan is not None:
                fans[count] = (fan, (proxy.bytes_down - before) / size, hex_)
                ctx.failures.extend(f"workers: {count}: {e}" for e in fan.errors[:5])
                ctx.log(f"  wall {fan.wall:.2f} s, {fans[count][1]:.2f} upstream copies")
        _workers_rows(ctx, loads, fans)
    finally:
        fleet.stop()


def _workers_rows(
    ctx: Context,
    loads: dict[int, LoadResult],
    fans: dict[int, tuple[ConcurrentResult, float, str]],
) -> None:
    p = ctx.params
    s_get = f"8 manifest GET by digest (wrk -t2 -c32 {p.load_duration:g} s)"
    rps = {k: v.rps for k, v in loads.items()}
    rows = [
        Row(
            s_get,
            "requests/s",
            rps.get(1),
            rps.get(2),
            digits=0,
            dist_text=_rps_text(loads.get(1)),
            rm_text=_rps_text(loads.get(2)),
        ),
        Row(
            s_get,
            "latency p50 / p90 / p99, ms",
            dist_text=_latency_text(loads.get(1)),
            rm_text=_latency_text(loads.get(2)),
        ),
    ]
    n = p.clients
    s_fan = f"8 {n} clients, one cold {p.concurrent_blob_size / MiB:g} MiB blob"

    def get(count: int, fn: Callable[[tuple[ConcurrentResult, float, str]], float]) -> float | None:
        return fn(fans[count]) if count in fans else None

    def ttfb(f: tuple[ConcurrentResult, float, str]) -> float:
        return median([r.ttfb for r in f[0].results])

    def good(f: tuple[ConcurrentResult, float, str]) -> float:
        return float(sum(1 for r in f[0].results if r.sha256 == f[2] and r.status == 200))

    rows += [
        Row(
            s_fan, "total wall time", get(1, lambda f: f[0].wall), get(2, lambda f: f[0].wall), "s"
        ),
        Row(s_fan, "TTFB per client, median", get(1, ttfb), get(2, ttfb), "s", digits=3),
        Row(
            s_fan,
            "upstream copies of the blob (bytes ÷ size)",
            get(1, lambda f: f[1]),
            get(2, lambda f: f[1]),
            "x",
            show_ratio=False,
            target=Target("exactly 1", rm_between(0.99, 1.01)),
        ),
        _bodies_row(s_fan, n, get(1, good), get(2, good)),
    ]
    for row in rows:
        row.columns = WORKERS
    ctx.rows.extend(rows)


SCALE_SCENARIOS: dict[str, tuple[str, Callable[[Context], None]]] = {
    "7": ("cluster", cluster),
    "8": ("workers", workers),
}
