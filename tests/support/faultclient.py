"""The fault suite's client and checker: asyncio HTTP/1.1 that verifies every body.

A test knows the bytes of every blob it pushed upstream. ``Checker`` sends requests to
the mirror and classifies each answer:

* ``verified``: a complete ``200`` whose body hashes to the digest asked for (or a
  complete ``206`` equal to that slice of the blob; or a ``HEAD`` announcing the right
  size and digest);
* ``error``: a ``4xx``/``5xx`` with the distribution spec's JSON error body;
* ``broken``: the transfer was cut before it was complete (what a client must see when
  the mirror discovers bad bytes after it has started streaming);
* ``hangup``: the client itself went away on purpose (``hangup_after``);
* ``wrong``: anything else. A complete ``200``/``206`` with bytes that are not the
  blob's counts its size in ``unverified_bytes_served``; an error without a spec body
  or an unexpected status counts in ``unexpected``. Tests assert both are zero.

``Checker.tally`` adds up what a run did, for ``tests.faults.figures``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from tests.support.rawhttp import split_base_url

Kind = Literal["verified", "error", "broken", "hangup", "wrong"]

_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


@dataclass
class Outcome:
    kind: Kind
    status: int | None = None
    size: int = 0  # body bytes received
    code: str = ""  # first error code of an error body
    retry_after: str | None = None
    detail: str = ""


@dataclass
class Tally:
    requests: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    unverified_bytes_served: int = 0
    unexpected: list[str] = field(default_factory=list)

    @property
    def verified(self) -> int:
        return self.kinds["verified"]

    def add(self, outcome: Outcome, what: str) -> None:
        self.requests += 1
        self.kinds[outcome.kind] += 1
        if outcome.status is not None:
            self.statuses[outcome.status] += 1
        if outcome.code:
            self.codes[outcome.code] += 1
        if outcome.kind == "wrong":
            if outcome.status in (200, 206):
                self.unverified_bytes_served += outcome.size
            if len(self.unexpected) < 20:
                self.unexpected.append(f"{what}: {outcome}")

    def summary(self) -> str:
        kinds = ", ".join(f"{k} {n}" for k, n in sorted(self.kinds.items()))
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(self.statuses.items()))
        return f"{self.requests} requests ({kinds}; statuses {statuses})"


class ProtocolError(Exception):
    pass


class _Response:
    def __init__(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self.headers = headers


async def _read_response_head(reader: asyncio.StreamReader) -> _Response:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
        raise ProtocolError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return _Response(int(parts[1]), headers)


class Checker:
    """``await checker.get(target, data=...)`` against the mirror at ``base_url``.

    ``data`` is what the blob (or manifest) must be; ``None`` for requests whose
    answer must be an error (bad requests) or is not checked byte for byte.
    """

    def __init__(self, base_url: str, *, timeout: float = 60.0) -> None:
        self.host, self.port = split_base_url(base_url)
        self.timeout = timeout
        self.tally = Tally()

    async def get(
        self,
        target: str,
        data: bytes | None,
        *,
        method: str = "GET",
        byte_range: tuple[int, int] | None = None,
        hangup_after: int | None = None,
        hangup_at: str | None = None,
        reset: bool = False,
        record: bool = True,
    ) -> Outcome:
        """One request on a new connection. ``hangup_at``: ``"connect"`` (close before
        sending), ``"head"`` (half a request line), ``"sent"`` (after the request,
        before reading); ``hangup_after``: after that many body bytes. ``reset``: the
        hang-up is an RST rather than a FIN."""
        outcome = await asyncio.wait_for(
            self._get(target, data, method, byte_range, hangup_after, hangup_at, reset),
            self.timeout,
        )
        if record:
            self.tally.add(outcome, f"{method} {target}")
        return outcome

    async def _get(
        self,
        target: str,
        data: bytes | None,
        method: str,
        byte_range: tuple[int, int] | None,
        hangup_after: int | None,
        hangup_at: str | None,
        reset: bool,
    ) -> Outcome:
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        except OSError as e:
            return Outcome("broken", detail=f"connect: {e!r}")

        def hang_up() -> Outcome:
            if reset:
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()
            else:
                writer.close()
            return Outcome("hangup")

        try:
            if hangup_at == "connect":
                return hang_up()
            head = f"{method} {target} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            if byte_range is not None:
                head += f"Range: bytes={byte_range[0]}-{byte_range[1]}\r\n"
            head += "Connection: close\r\n\r\n"
            if hangup_at == "head":
                writer.write(head[: len(head) // 3].encode())
                await writer.drain()
                return hang_up()
            writer.write(head.encode())
            await writer.drain()
            if hangup_at == "sent":
                return hang_up()
            try:
                response = await _read_response_head(reader)
            except (asyncio.IncompleteReadError, ConnectionError, ProtocolError) as e:
                return Outcome("broken", detail=f"head: {e!r}")
            body, complete = await self._body(reader, response, method, hangup_after)
            if hangup_after is not None and not complete and hangup_after <= len(body):
                return hang_up()
            return self._judge(response, body, complete, data, method, byte_range)
        except (ConnectionError, OSError) as e:
            return Outcome("broken", detail=repr(e))
        finally:
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _body(
        self,
        reader: asyncio.StreamReader,
        response: _Response,
        method: str,
        hangup_after: int | None,
    ) -> tuple[bytes, bool]:
        if method == "HEAD" or response.status in (204, 304):
            return b"", True
        chunks: list[bytes] = []
        got = 0
        if "chunked" in response.headers.get("transfer-encoding", "").lower():
            try:
                while True:
                    size_line = await reader.readuntil(b"\r\n")
                    size = int(size_line.split(b";")[0], 16)
                    if size == 0:
                        await reader.readuntil(b"\r\n")
                        return b"".join(chunks), True
                    chunk = await reader.readexactly(size + 2)
                    chunks.append(chunk[:-2])
                    got += size
                    if hangup_after is not None and got >= hangup_after:
                        return b"".join(chunks), False
            except (asyncio.IncompleteReadError, ConnectionError, ValueError):
                return b"".join(chunks), False
        length_header = response.headers.get("content-length")
        if length_header is None:  # until EOF: never provably complete
            while data := await reader.read(1 << 16):
                chunks.append(data)
            return b"".join(chunks), False
        length = int(length_header)
        try:
            while got < length:
                want = min(1 << 16, length - got)
                if hangup_after is not None:
                    want = min(want, max(1, hangup_after - got))
                data = await reader.read(want)
                if not data:
                    return b"".join(chunks), False
                chunks.append(data)
                got += len(data)
                if hangup_after is not None and got >= hangup_after and got < length:
                    return b"".join(chunks), False
        except ConnectionError:
            return b"".join(chunks), False
        return b"".join(chunks), True

    def _judge(
        self,
        response: _Response,
        body: bytes,
        complete: bool,
        data: bytes | None,
        method: str,
        byte_range: tuple[int, int] | None,
    ) -> Outcome:
        status = response.status
        size = len(body)
        if not complete:
            return Outcome("broken", status, size)
        if status >= 400:
            try:
                doc = json.loads(body) if method != "HEAD" else {"errors": [{"code": ""}]}
                code = doc["errors"][0]["code"]
            except (ValueError, KeyError, IndexError, TypeError):
                return Outcome("wrong", status, size, detail=f"error body {body[:200]!r}")
            return Outcome("error", status, size, code, response.headers.get("retry-after"))
        if data is None:
            return Outcome("wrong", status, size, detail="a success where an error was due")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if method == "HEAD":
            announced = response.headers.get("content-length")
            ok = status == 200 and announced == str(len(data))
            dcd = response.headers.get("docker-content-digest")
            ok = ok and (dcd is None or dcd == digest)
            return Outcome("verified" if ok else "wrong", status, 0, detail="HEAD")
        if status == 200:
            if hashlib.sha256(body).digest() == hashlib.sha256(data).digest():
                return Outcome("verified", status, size)
            return Outcome("wrong", status, size, detail="200 with bytes that are not the blob")
        if status == 206 and byte_range is not None:
            match = _RANGE.fullmatch(response.headers.get("content-range", ""))
            if match is None:
                return Outcome("wrong", status, size, detail="206 without Content-Range")
            first, last = int(match.group(1)), int(match.group(2))
            if body == data[first : last + 1] and first == byte_range[0]:
                return Outcome("verified", status, size)
            return Outcome("wrong", status, size, detail="206 with the wrong slice")
        return Outcome("wrong", status, size, detail=f"unexpected status {status}")
