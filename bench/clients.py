"""The load generators: curl, wrk, ab and skopeo as subprocesses, and their output parsers.

Every call has a deadline (``--max-time``, ``-d``, ``-t`` and a subprocess timeout), so
a mirror that hangs fails the measurement instead of hanging the benchmark.
"""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.skopeo import skopeo_copy


class ClientError(RuntimeError):
    """A load generator failed or saw a wrong answer."""


def _header_args(headers: Mapping[str, str] | None) -> list[str]:
    args: list[str] = []
    for name, value in (headers or {}).items():
        args += ["-H", f"{name}: {value}"]
    return args


# --- curl ----------------------------------------------------------------------------

_CURL_FORMAT = "%{http_code} %{size_download} %{speed_download} %{time_starttransfer} %{time_total}"


@dataclass(frozen=True)
class CurlResult:
    status: int
    size: int
    speed: float  # bytes/s, as curl computes it (size / total time)
    ttfb: float  # seconds from curl's start to the first response byte
    total: float  # seconds
    sha256: str | None = None
    ended: float = 0.0  # time.monotonic() when the client process ended


def parse_curl_writeout(text: str) -> tuple[int, int, float, float, float]:
    """Parse the last line ``curl -w _CURL_FORMAT`` wrote."""
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        raise ClientError(f"no curl write-out in {text!r}")
    fields = lines[-1].split()
    if len(fields) != 5:
        raise ClientError(f"unexpected curl write-out {lines[-1]!r}")
    code, size, speed, ttfb, total = fields
    return int(code), int(float(size)), float(speed), float(ttfb), float(total)


def curl_get(
    url: str,
    *,
    headers: Mapping[str, str] | None = None,
    expect_size: int | None = None,
    max_time: float = 300.0,
    cacert: str | None = None,
) -> CurlResult:
    """``curl -s -o /dev/null -w ...``: one GET, body discarded (``cacert``: the CA that
    signed an https server's certificate, verified)."""
    argv = ["curl", "-sS", "-o", "/dev/null", "-w", _CURL_FORMAT, "--max-time", f"{max_time:g}"]
    if cacert is not None:
        argv += ["--cacert", cacert]
    argv += [*_header_args(headers), url]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=max_time + 10, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise ClientError(f"curl {url} exited with {proc.returncode}: {proc.stderr.strip()}")
    status, size, speed, ttfb, total = parse_curl_writeout(proc.stdout)
    result = CurlResult(status, size, speed, ttfb, total, ended=time.monotonic())
    _check_curl(url, result, expect_size)
    return result


def _check_curl(url: str, result: CurlResult, expect_size: int | None) -> None:
    if result.status != 200:
        raise ClientError(f"GET {url}: HTTP {result.status}")
    if expect_size is not None and result.size != expect_size:
        raise ClientError(f"GET {url}: {result.size} bytes, expected {expect_size}")


@dataclass(frozen=True)
class ConcurrentResult:
    results: list[CurlResult]
    wall: float  # from the release of the first client to the end of the last
    errors: list[str]
    started: float  # time.monotonic() when the clients were released


def concurrent_curl(
    url: str | Sequence[str],
    clients: int,
    *,
    expect_size: int | None = None,
    hash_bodies: bool = True,
    max_time: float = 300.0,
) -> ConcurrentResult:
    """Run ``clients`` curl processes on ``url`` at once (several URLs: client ``i``
    asks the ``i``-th, round robin).

    Each curl is started behind a gate (``sh -c 'read _ && exec curl ...'``), so that
    process start-up does not spread the requests out: all gates are opened together
    once every process exists. With ``hash_bodies`` each body is piped into its own
    ``sha256sum``; otherwise it goes to ``/dev/null``.
    """
    write_out = "%{stderr}" + _CURL_FORMAT + "\\n"
    urls = [url] if isinstance(url, str) else list(url)
    base = ["curl", "-sS", "-w", write_out, "--max-time", f"{max_time:g}", "-o"]
    base.append("-" if hash_bodies else "/dev/null")
    gates: list[subprocess.Popen[bytes]] = []
    hashers: list[subprocess.Popen[bytes] | None] = []
    try:
        for i in range(clients):
            argv = [*base, urls[i % len(urls)]]
            gate = subprocess.Popen(
                ["sh", "-c", 'read _ && exec "$@"', "sh", *argv],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if hash_bodies else subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            gates.append(gate)
            if hash_bodies:
                assert gate.stdout is not None
                hasher = subprocess.Popen(["sha256sum"], stdin=gate.stdout, stdout=subprocess.PIPE)
                gate.stdout.close()  # sha256sum holds the only reading end now
                hashers.append(hasher)
            else:
                hashers.append(None)
        outputs: list[tuple[bytes, bytes, float]] = [(b"", b"", 0.0)] * clients

        def wait(i: int) -> None:
            proc = gates[i]
            assert proc.stderr is not None
            err = proc.stderr.read()
            proc.wait()
            ended = time.monotonic()
            hasher = hashers[i]
            out = hasher.communicate()[0] if hasher is not None else b""
            outputs[i] = (err, out, ended)

        threads = [threading.Thread(target=wait, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        start = time.monotonic()
        for gate in gates:
            assert gate.stdin is not None
            gate.stdin.write(b"go\n")
            gate.stdin.close()
        deadline = start + max_time + 20
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in threads):
            raise ClientError(f"{clients} concurrent GETs of {urls} did not end in {max_time:g}s")
    finally:
        for proc in [*gates, *(h for h in hashers if h is not None)]:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
    results: list[CurlResult] = []
    errors: list[str] = []
    for i, (err, out, ended) in enumerate(outputs):
        rc = gates[i].returncode
        text = err.decode(errors="replace")
        try:
            status, size, speed, ttfb, total = parse_curl_writeout(text)
        except ClientError as e:
            errors.append(f"client {i}: exit {rc}: {e}")
            continue
        sha = out.decode().split()[0] if out.strip() else None
        result = CurlResult(status, size, speed, ttfb, total, sha, ended)
        if rc != 0:
            errors.append(f"client {i}: curl exited with {rc}: {text.strip()[:300]}")
        else:
            try:
                _check_curl(urls[i % len(urls)], result, expect_size)
            except ClientError as e:
                errors.append(f"client {i}: {e}")
        results.append(result)
    wall = max((r.ended for r in results), default=start) - start
    return ConcurrentResult(results, wall, errors, start)


# --- wrk -------------------------------------------------------------------------------

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text.strip())
    if match is None:
        raise ClientError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


@dataclass(frozen=True)
class LoadResult:
    """What wrk or ab reported: throughput, latency percentiles (ms), errors."""

    tool: str
    requests: int
    rps: float
    percentiles: dict[int, float]  # 50, 90, 99 (and whatever else the tool prints)
    errors: int  # failed requests, non-2xx, socket errors
    output: str

    def pct(self, p: int) -> float | None:
        return self.percentiles.get(p)


def parse_wrk(output: str) -> LoadResult:
    rps_match = re.search(r"Requests/sec:\s*([\d.]+)", output)
    count_match = re.search(r"(\d+) requests in ", output)
    if rps_match is None or count_match is None:
        raise ClientError(f"could not parse wrk output:\n{output}")
    percentiles: dict[int, float] = {}
    dist = output.partition("Latency Distribution")[2]
    for p, value in re.findall(r"^\s*(\d+)%\s+(\S+)", dist, re.MULTILINE):
        percentiles[int(p)] = _ms(value)
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sock = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    if sock:
        errors += sum(int(x) for x in sock.groups())
    return LoadResult(
        "wrk", int(count_match.group(1)), float(rps_match.group(1)), percentiles, errors, output
    )


def run_wrk(
    url: str,
    *,
    duration: float,
    threads: int = 2,
    connections: int = 32,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{max(1, round(duration))}s"]
    argv += ["--latency", "--timeout", "10s", *_header_args(headers), url]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + 60, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise ClientError(f"wrk exited with {proc.returncode}: {proc.stderr}{proc.stdout}")
    return parse_wrk(proc.stdout)


# --- ab --------------------------------------------------------------------------------


def parse_ab(output: str) -> LoadResult:
    rps_match = re.search(r"Requests per second:\s*([\d.]+)", output)
    complete = re.search(r"Complete requests:\s*(\d+)", output)
    if rps_match is None or complete is None:
        raise ClientError(f"could not parse ab output:\n{output}")
    percentiles: dict[int, float] = {}
    table = output.partition("Percentage of the requests served within")[2]
    for p, value in re.findall(r"^\s*(\d+)%\s+(\d+)", table, re.MULTILINE):
        percentiles[int(p)] = float(value)
    errors = 0
    for pattern in (r"Failed requests:\s*(\d+)", r"Non-2xx responses:\s*(\d+)"):
        match = re.search(pattern, output)
        if match:
            errors += int(match.group(1))
    return LoadResult(
        "ab", int(complete.group(1)), float(rps_match.group(1)), percentiles, errors, output
    )


def run_ab_head(
    url: str,
    *,
    duration: float,
    concurrency: int = 32,
    max_requests: int = 5_000_000,
    headers: Mapping[str, str] | None = None,
) -> LoadResult:
    """``ab -k -i``: HEAD requests with keep-alive for ``duration`` seconds
    (``-t`` first: it resets ``-n`` to 50000, the ``-n`` after it raises the cap)."""
    argv = ["ab", "-q", "-k", "-i", "-s", "10", "-t", f"{max(1, round(duration))}"]
    argv += ["-n", str(max_requests), "-c", str(concurrency), *_header_args(headers), url]
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=duration + 60, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise ClientError(f"ab exited with {proc.returncode}: {proc.stderr}{proc.stdout}")
    return parse_ab(proc.stdout)


# --- skopeo ----------------------------------------------------------------------------


def timed_skopeo_pull(ref: str, dest: Path, timeout: float = 600.0) -> float:
    """``skopeo copy docker://REF dir:DEST`` (TLS verification off); wall seconds."""
    start = time.monotonic()
    skopeo_copy(ref, dest, tls_verify=False, timeout=timeout)
    return time.monotonic() - start


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median of nothing")
    mid = n // 2
    return ordered[mid] if n % 2 else (ordered[mid - 1] + ordered[mid]) / 2
