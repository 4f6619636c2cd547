"""A fault-injecting HTTP proxy between the mirror and its upstream, in a background thread.

``CountingProxy`` forwards bytes and ``ReverseProxy`` whole requests; this one forwards
each request to the upstream (a fresh upstream connection per request, answered to the
mirror with ``Connection: close``) and streams the response back, so that it can break
the response the way networks and registries break them. ``set_fault(Fault...)``
chooses what happens to the requests whose target contains ``match`` (``"/blobs/"`` by
default: blob GETs and HEADs; ``""``: every request); the others pass unchanged.

=============  ==========================================================================
``PASS``       forwarded unchanged
``KILL``       the body stops after ``after`` bytes and the connection is closed (FIN):
               an upstream process killed mid-blob
``RESET``      the body stops after ``after`` bytes and the connection is reset (RST)
``TRUNCATE``   ``Content-Length`` rewritten to ``after`` and only that many bytes sent: a
               short body that looks complete
``WRONG``      same length, but every byte from ``after`` on is inverted: wrong bytes
``DRIP``       the body sent at ``rate`` bytes/s (a few KB/s), in small pieces (at
               full speed again once the fault changes)
``STATUS``     answered here with ``status`` (500, 502, 503...) and a JSON error body
``RATE_LIMIT`` answered here with ``429``, ``Retry-After: retry_after`` and Docker Hub's
               ``TOOMANYREQUESTS`` body
``BLACKHOLE``  the request is read and never answered (the connection stays open)
``REFUSE``     the listener is closed: new connections are refused (``connect()`` gets
               ``ECONNREFUSED``); ``heal()`` listens again on the same port
=============  ==========================================================================

``heal()`` returns to ``PASS``. ``requests`` records each request's method, target and
what was done to it; ``count(method, path_substring)`` counts requests that reached the
upstream (the mirror's real fetches).
"""

from __future__ import annotations

import asyncio
import enum
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.support.ports import LOOPBACK
from tests.support.rawhttp import split_base_url

_CHUNK = 64 * 1024
_MAX_HEAD = 64 * 1024


class Fault(enum.Enum):
    PASS = "pass"
    KILL = "kill mid-blob"
    RESET = "connection reset"
    TRUNCATE = "truncated body"
    WRONG = "wrong bytes"
    DRIP = "slow drip"
    STATUS = "error status"
    RATE_LIMIT = "429 Retry-After"
    BLACKHOLE = "black hole"
    REFUSE = "connection refused"


@dataclass(frozen=True)
class FaultPlan:
    fault: Fault = Fault.PASS
    match: str = "/blobs/"
    after: int = 0  # body bytes passed before KILL/RESET/WRONG, the length of TRUNCATE
    rate: float = 4096.0  # DRIP, bytes/s
    status: int = 503  # STATUS
    retry_after: int = 7  # RATE_LIMIT


@dataclass(frozen=True)
class ProxiedRequest:
    method: str
    target: str
    fault: Fault  # what was done to it (PASS: forwarded unchanged)
    upstream: bool  # whether it was sent to the upstream
    time: float = field(compare=False)


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"errors": [{"code": code, "message": message}]}).encode()


class FaultProxy:
    """``start()`` listens on a free 127.0.0.1 port; ``stop()`` ends everything."""

    def __init__(self, target_url: str) -> None:
        self.target_host, self.target_port = split_base_url(target_url)
        self.port = 0
        self.plan = FaultPlan()
        self._lock = threading.Lock()
        self._requests: list[ProxiedRequest] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    # --- lifecycle --------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the fault proxy is already running")
        loop = asyncio.new_event_loop()
        self._loop = loop
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.call_soon(started.set)
            try:
                loop.run_forever()
            finally:
                loop.close()

        self._thread = threading.Thread(target=run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not started.wait(10):
            raise RuntimeError("the fault proxy's event loop did not start")
        self._call(self._listen())

    def _call(self, coro: Any, timeout: float = 10.0) -> Any:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _listen(self) -> None:
        if self._server is not None:
            return
        self._server = await asyncio.start_server(
            self._handle, LOOPBACK, self.port or 0, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _unlisten(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self._abort_all()

    def stop(self) -> None:
        """Close the listener and every connection, end the thread. Idempotent."""
        if self._thread is None or self._loop is None:
            return
        try:
            self._call(self._shutdown())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None
            self._loop = None

    async def _shutdown(self) -> None:
        await self._unlisten()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __enter__(self) -> FaultProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- controls ---------------------------------------------------------------

    def set_fault(self, fault: Fault, **options: Any) -> None:
        """From now on, apply ``fault`` (options: see ``FaultPlan``) to matching requests.
        Connections already held by ``BLACKHOLE`` are cut when the fault changes."""
        plan = FaultPlan(fault, **options)
        with self._lock:
            previous, self.plan = self.plan, plan
        if fault is Fault.REFUSE:
            self._call(self._unlisten())
        elif previous.fault is Fault.REFUSE:
            self._call(self._listen())
        if previous.fault is Fault.BLACKHOLE and fault is not Fault.BLACKHOLE:
            self._call(self._abort_held())

    def heal(self) -> None:
        self.set_fault(Fault.PASS)

    async def _abort_held(self) -> None:
        self._abort_all()

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            if not writer.transport.is_closing():
                writer.transport.abort()

    # --- observations -----------------------------------------------------------

    @property
    def requests(self) -> list[ProxiedRequest]:
        with self._lock:
            return list(self._requests)

    def count(self, method: str | None = None, path_substring: str = "") -> int:
        """Requests that reached the upstream (method ``None``: any)."""
        return sum(
            1
            for r in self.requests
            if r.upstream and (method is None or r.method == method) and path_substring in r.target
        )

    def faulted(self) -> int:
        """Requests a fault was applied to."""
        return sum(1 for r in self.requests if r.fault is not Fault.PASS)

    def _record(self, method: str, target: str, fault: Fault, upstream: bool) -> None:
        with self._lock:
            self._requests.append(ProxiedRequest(method, target, fault, upstream, time.monotonic()))

    # --- one connection from the mirror -------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                head = await self._read_head(reader)
                if head is None:
                    return
                method, target, lines = head
                length = _content_length(lines)
                body = await reader.readexactly(length) if length else b""
                with self._lock:
                    plan = self.plan
                fault = plan.fault if plan.match in target else Fault.PASS
                if fault is Fault.REFUSE:  # a connection accepted before the listener closed
                    fault = Fault.RESET
                    plan = FaultPlan(Fault.RESET, after=0)
                if fault is Fault.BLACKHOLE:
                    self._record(method, target, fault, False)
                    await reader.read()  # until the mirror gives up
                    return
                if fault in (Fault.STATUS, Fault.RATE_LIMIT):
                    self._record(method, target, fault, False)
                    await self._answer_locally(writer, method, plan)
                    continue
                self._record(method, target, fault, True)
                keep = await self._forward(writer, method, target, lines, body, plan, fault)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._writers.discard(writer)
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _read_head(self, reader: asyncio.StreamReader) -> tuple[str, str, list[str]] | None:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        except asyncio.LimitOverrunError:
            return None
        lines = raw.decode("latin-1").split("\r\n")
        while lines and not lines[0]:
            lines.pop(0)
        parts = lines[0].split(" ") if lines else []
        if len(parts) != 3:
            return None
        return parts[0], parts[1], [line for line in lines[1:] if line]

    async def _answer_locally(
        self, writer: asyncio.StreamWriter, method: str, plan: FaultPlan
    ) -> None:
        if plan.fault is Fault.RATE_LIMIT:
            status, reason = 429, "Too Many Requests"
            body = _error_body("TOOMANYREQUESTS", "pull rate limit (regmirror fault proxy)")
            extra = f"Retry-After: {plan.retry_after}\r\n"
        else:
            status, reason = plan.status, "Fault"
            body = _error_body("UNKNOWN", f"injected {plan.status} (regmirror fault proxy)")
            extra = ""
        head = (
            f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        writer.write(head.encode() + (b"" if method == "HEAD" else body))
        await writer.drain()

    async def _forward(
        self,
        writer: asyncio.StreamWriter,
        method: str,
        target: str,
        lines: list[str],
        body: bytes,
        plan: FaultPlan,
        fault: Fault,
    ) -> bool:
        """Send the request upstream and its response back, with ``fault`` applied.
        Returns whether the mirror's connection may carry another request."""
        up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        self._writers.add(up_writer)
        try:
            kept = [
                line
                for line in lines
                if line.split(":", 1)[0].strip().lower() not in ("connection", "keep-alive")
            ]
            request = "\r\n".join([f"{method} {target} HTTP/1.1", *kept, "Connection: close"])
            up_writer.write(request.encode("latin-1") + b"\r\n\r\n" + body)
            await up_writer.drain()
            raw = await up_reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = [x for x in raw.decode("latin-1").split("\r\n") if x]
            status = int(status_line.split(" ")[1])
            headers = [
                h
                for h in header_lines
                if h.split(":", 1)[0].strip().lower() not in ("connection", "keep-alive")
            ]
            length = _content_length(headers)
            has_body = method != "HEAD" and status not in (204, 304) and status >= 200
            if fault is Fault.TRUNCATE and has_body and status == 200 and length > plan.after:
                headers = [
                    h for h in headers if h.split(":", 1)[0].strip().lower() != "content-length"
                ]
                headers.append(f"Content-Length: {plan.after}")
                length = plan.after
            if not has_body or status != 200:
                fault = Fault.PASS  # redirects, errors and HEADs pass unchanged
            out_head = "\r\n".join([status_line, *headers, "Connection: close"]) + "\r\n\r\n"
            writer.write(out_head.encode("latin-1"))
            sent = 0
            limit = length if (fault is Fault.TRUNCATE) else None
            while True:
                data = await up_reader.read(_CHUNK)
                if not data:
                    break
                if limit is not None:
                    data = data[: max(0, limit - sent)]
                if fault in (Fault.KILL, Fault.RESET) and sent + len(data) >= plan.after:
                    data = data[: plan.after - sent]
                    writer.write(data)
                    await writer.drain()
                    if fault is Fault.RESET:
                        _reset(writer)
                    else:
                        writer.close()
                    return False
                if fault is Fault.WRONG:
                    data = _invert_from(data, max(0, plan.after - sent))
                if fault is Fault.DRIP and self.plan.fault is Fault.DRIP:  # until healed
                    await self._drip(writer, data, plan.rate)
                else:
                    writer.write(data)
                    await writer.drain()
                sent += len(data)
                if limit is not None and sent >= limit:
                    break
            writer.close()
            return False
        finally:
            self._writers.discard(up_writer)
            up_writer.transport.abort()

    async def _drip(self, writer: asyncio.StreamWriter, data: bytes, rate: float) -> None:
        piece = max(1, int(rate / 10))
        for i in range(0, len(data), piece):
            part = data[i : i + piece]
            writer.write(part)
            await writer.drain()
            await asyncio.sleep(len(part) / rate)  # the drip's pace, not a wait for something


def _content_length(lines: list[str]) -> int:
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            try:
                return int(value.strip())
            except ValueError:
                return 0
    return 0


def _invert_from(data: bytes, start: int) -> bytes:
    if start >= len(data):
        return data
    return data[:start] + bytes(b ^ 0xFF for b in data[start:])


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER on with a zero timeout, then close."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()
