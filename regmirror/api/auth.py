"""Client authentication (``auth.htpasswd``) and repository access rules.

``Htpasswd`` checks ``Authorization: Basic`` credentials against an htpasswd file of
bcrypt entries (``htpasswd -B``, what the distribution registry reads). bcrypt is slow
on purpose (milliseconds to a quarter of a second per check), and a pull sends dozens
to hundreds of requests with the same header, so:

- checks run in a thread (``verify`` is injected: a thread pool in the daemon, inline in
  unit tests) and concurrent checks of the same header share one run;
- a header that verified is remembered (by its SHA-256, never in clear) until the file
  changes, and one that failed is refused without a new bcrypt run for a few seconds;
- the file is looked at (one ``stat``) at most once a second, and re-read when its
  modification time, size or inode changed. A file that cannot be read or parsed at a
  reload is logged and the users loaded before stay.

The user a request authenticated as is kept beside the request (``authenticated_user``),
for the access log. ``behind`` puts a resource's rendering behind the client
authentication: ``/v2/`` and the status page share it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable
from typing import Any
from weakref import WeakKeyDictionary

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.web import server
from twisted.web.http import Request
from twisted.web.server import NOT_DONE_YET

from regmirror.api.responses import gone, render_error, render_failure
from regmirror.domain.errors import Unauthorized
from regmirror.logs import get_logger

log = get_logger()

BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
FAILURE_MEMORY = 5.0  # seconds a failed header is refused without a new bcrypt run
MAX_REMEMBERED = 10_000

# verify(password, bcrypt_hash) -> Deferred[bool], run off the reactor thread.
Verify = Callable[[bytes, bytes], "Deferred[bool]"]


class HtpasswdError(Exception):
    """The htpasswd file cannot be used; the message names the file."""


def check_password(password: bytes, hashed: bytes) -> bool:
    """bcrypt comparison (blocking: call it in a thread)."""
    import bcrypt

    try:
        return bool(bcrypt.checkpw(password, hashed))
    except ValueError:  # longer than 72 bytes, or a malformed hash
        return False


def inline_verify(password: bytes, hashed: bytes) -> Deferred[bool]:
    """``verify`` without a thread (tests)."""
    return succeed(check_password(password, hashed))


def parse_htpasswd(text: str, source: str) -> dict[str, bytes]:
    """``user:$2y$...`` lines; blank lines and ``#`` comments are skipped. Entries that are
    not bcrypt (MD5 ``$apr1$``, SHA1, crypt) are skipped with a warning, as the
    distribution registry does not accept them either."""
    users: dict[str, bytes] = {}
    skipped = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user:
            raise HtpasswdError(f"{source}: line {number}: expected user:hash")
        if not hashed.startswith(BCRYPT_PREFIXES):
            skipped.append(user)
            continue
        users[user] = hashed.encode("ascii", "replace")
    if skipped:
        log.warn(
            "{source}: entries that are not bcrypt are ignored (use htpasswd -B): {users}",
            source=source,
            users=", ".join(skipped),
        )
    return users


def parse_basic(header: bytes | None) -> tuple[str, bytes] | None:
    """(user, password) from ``Authorization: Basic ...``, or None."""
    if not header:
        return None
    scheme, _, value = header.strip().partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    try:
        return user.decode("utf-8"), password
    except UnicodeDecodeError:
        return None


class Htpasswd:
    """The users of an htpasswd file, re-read when it changes."""

    def __init__(
        self,
        path: str,
        clock: Any,  # IReactorTime
        verify: Verify = inline_verify,
        *,
        check_interval: float = 1.0,
    ) -> None:
        self.path = path
        self._clock = clock
        self._verify = verify
        self._check_interval = check_interval
        self._users: dict[str, bytes] = {}
        self._stamp: tuple[int, int, int] | None = None
        self._next_check = 0.0
        self._verified: dict[bytes, str] = {}
        self._failed: dict[bytes, float] = {}
        self._pending: dict[bytes, list[Deferred[str | None]]] = {}
        self._generation = 0

    @property
    def users(self) -> frozenset[str]:
        return frozenset(self._users)

    def load(self) -> None:
        """Read the file now; raises ``HtpasswdError`` (start-up: the file must be usable)."""
        try:
            st = os.stat(self.path)
            with open(self.path, encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError as e:
            raise HtpasswdError(
                f"{self.path}: cannot read the htpasswd file: {e.strerror}"
            ) from None
        users = parse_htpasswd(text, self.path)
        self._users = users
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        self._forget()
        if not users:
            log.warn("{path}: no bcrypt users: every client will be refused", path=self.path)

    def reload(self) -> None:
        """Re-read the file if it changed; keep the old users if it cannot be read."""
        self._next_check = self._clock.seconds() + self._check_interval
        try:
            st = os.stat(self.path)
        except OSError as e:
            log.error(
                "{path}: cannot stat the htpasswd file ({error}); keeping {count} users",
                path=self.path,
                error=e.strerror,
                count=len(self._users),
            )
            return
        if (st.st_mtime_ns, st.st_size, st.st_ino) == self._stamp:
            return
        try:
            self.load()
        except HtpasswdError as e:
            log.error("{problem}; keeping {count} users", problem=str(e), count=len(self._users))
            return
        log.info("{path}: reloaded, {count} users", path=self.path, count=len(self._users))

    def _forget(self) -> None:
        self._verified.clear()
        self._failed.clear()
        self._generation += 1

    def remembered(self, header: bytes | None) -> str | None:
        """The user an ``Authorization`` header is already known to authenticate, or
        None (not known now: ``authenticate`` decides). The file is looked at as in
        ``authenticate``, so a changed file is seen within the same second."""
        if self._clock.seconds() >= self._next_check:
            self.reload()
        if not header:
            return None
        return self._verified.get(hashlib.sha256(header).digest())

    def authenticate(self, header: bytes | None) -> str | Deferred[str | None] | None:
        """The user name for an ``Authorization`` header, or None: at once when the answer
        is known, else a Deferred (a bcrypt check running in a thread)."""
        now = self._clock.seconds()
        if now >= self._next_check:
            self.reload()
        if not header:
            return None
        key = hashlib.sha256(header).digest()
        user = self._verified.get(key)
        if user is not None:
            return user
        until = self._failed.get(key)
        if until is not None:
            if until > now:
                return None
            del self._failed[key]
        waiters = self._pending.get(key)
        if waiters is not None:
            d: Deferred[str | None] = Deferred()
            waiters.append(d)
            return d
        credentials = parse_basic(header)
        if credentials is None:
            return None
        name, password = credentials
        hashed = self._users.get(name)
        if hashed is None:
            if not self._users:
                return None
            # Spend the same time on an unknown user as on a known one.
            hashed, name = next(iter(self._users.values())), ""
        waiters = self._pending[key] = []
        result: Deferred[str | None] = Deferred()
        waiters.append(result)
        generation = self._generation

        def done(ok: object) -> None:
            pending = self._pending.pop(key, [])
            user = name if ok is True and name else None
            if generation == self._generation:
                self._remember(key, user)
            for waiter in pending:
                waiter.callback(user)

        self._verify(password, hashed).addBoth(done)
        return result

    def _remember(self, key: bytes, user: str | None) -> None:
        if len(self._verified) + len(self._failed) > MAX_REMEMBERED:
            self._verified.clear()
            self._failed.clear()
        if user is not None:
            self._verified[key] = user
        else:
            self._failed[key] = self._clock.seconds() + FAILURE_MEMORY


@attrs.frozen
class ClientAuth:
    """What the API asks of a request before anything else."""

    htpasswd: Htpasswd
    realm: str
    anonymous_read: bool = False

    def challenge(self) -> Unauthorized:
        error = Unauthorized("authentication required")
        realm = self.realm.replace("\\", "\\\\").replace('"', '\\"')
        error.headers[b"www-authenticate"] = f'Basic realm="{realm}"'.encode()
        return error


_users: WeakKeyDictionary[Request, str] = WeakKeyDictionary()


def authenticated_as(request: Request, user: str) -> None:
    """Record that ``request`` authenticated as ``user``."""
    _users[request] = user


def authenticated_user(request: Request) -> str | None:
    """The user ``request`` authenticated as, or None."""
    return _users.get(request)


Render = Callable[[server.Request], "bytes | int"]


def behind(auth: ClientAuth | None, request: server.Request, render: Render) -> bytes | int:
    """``render(request)`` if the client may go on (authenticated, or a read without
    credentials where ``auth.anonymous: read`` allows it), else the ``401`` challenge.
    ``NOT_DONE_YET`` while a bcrypt check runs; the answer is written when it is done."""
    if auth is None:
        return render(request)
    user = auth.htpasswd.authenticate(request.getHeader(b"authorization"))
    if isinstance(user, Deferred):
        user.addCallback(_authenticated, auth, request, render)
        user.addErrback(render_failure, request)
        return NOT_DONE_YET
    return _answer(auth, request, render, user)


def _answer(
    auth: ClientAuth, request: server.Request, render: Render, user: str | None
) -> bytes | int:
    if user is not None:
        authenticated_as(request, user)
        return render(request)
    anonymous = (
        auth.anonymous_read
        and request.method in (b"GET", b"HEAD")
        and not request.getHeader(b"authorization")
    )
    return render(request) if anonymous else render_error(request, auth.challenge())


def _authenticated(
    user: str | None, auth: ClientAuth, request: server.Request, render: Render
) -> None:
    if gone(request):
        return
    body = _answer(auth, request, render, user)
    if body is not NOT_DONE_YET:
        assert isinstance(body, bytes)
        request.write(body)
        request.finish()
