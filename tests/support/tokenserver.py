"""A Docker token server (the ``realm`` of ``WWW-Authenticate: Bearer``) for the tests.

``TokenServer(base_dir)`` makes a test CA and a signing certificate under it, writes
the CA to ``base_dir/token-ca.pem``, and serves ``GET /token?service=S&scope=...`` on
a loopback port from a thread. ``registry_config()`` is the ``auth: token:`` section
that makes distribution trust it (realm, service, issuer, rootcertbundle).

Tokens are JWTs signed ES256 with the signing key; the header carries the signing
certificate in ``x5c``, which distribution 2.8 verifies against its rootcertbundle
(chained to the CA, key usage digital signature). Claims: ``iss``, ``sub``, ``aud``
(the service), ``exp``/``nbf``/``iat``, ``jti`` and ``access`` (one entry per
requested scope: ``{"type", "name", "actions"}``). Note that distribution accepts a
token up to 60 s after its ``exp`` (``Leeway``): a test of token renewal must count
token requests, not rely on the registry refusing an expired token.

Who gets what:

* Basic credentials present: they must match ``users`` (else ``401``); the user gets
  every action asked for.
* none: ``401`` unless ``anonymous``; anonymous callers get ``pull`` actions only.

Every GET is recorded (``requests``: scopes, user, whether an ``Authorization``
header came, the answer), and every token issued (``issued``), so tests can count
token requests per scope and search logs for the tokens. ``expires_in`` may be changed
while the server runs.
"""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from tests.support.httpserver import LoopbackHTTPServer, QuietHandler
from tests.support.ports import LOOPBACK

DEFAULT_SERVICE = "regmirror-test-registry"
DEFAULT_ISSUER = "regmirror-test-token-issuer"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass
class SigningKey:
    """An EC P-256 key and its certificate: the token signer. ``ca_pem`` is the
    certificate a registry must trust (``rootcertbundle``)."""

    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    ca_certificate: x509.Certificate

    @classmethod
    def generate(cls, name: str = "regmirror test token signer") -> SigningKey:
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = (
            x509.CertificateBuilder()
            .subject_name(_name(name + " CA"))
            .issuer_name(_name(name + " CA"))
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        return cls(key, leaf, ca)

    @property
    def ca_pem(self) -> bytes:
        return self.ca_certificate.public_bytes(serialization.Encoding.PEM)

    def sign_jwt(self, claims: Mapping[str, Any]) -> str:
        """A compact JWS (ES256, ``x5c`` = the signing certificate) of ``claims``."""
        der = self.certificate.public_bytes(serialization.Encoding.DER)
        header = {"typ": "JWT", "alg": "ES256", "x5c": [base64.b64encode(der).decode()]}
        signing_input = (
            _b64url(json.dumps(header, separators=(",", ":")).encode())
            + "."
            + _b64url(json.dumps(claims, separators=(",", ":")).encode())
        )
        r, s = decode_dss_signature(
            self.key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
        )
        return signing_input + "." + _b64url(r.to_bytes(32, "big") + s.to_bytes(32, "big"))


def parse_scope(scope: str) -> dict[str, Any] | None:
    """``repository:owner/img:pull,push`` -> an ``access`` entry (``None`` if malformed).

    The name may itself contain ``:`` (``repository:host:5000/img:pull``): type is the
    first field, actions the last."""
    kind, sep, rest = scope.partition(":")
    name, sep2, actions = rest.rpartition(":")
    if not (sep and sep2 and kind and name):
        return None
    return {"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]}


def _scope_key(scope: str) -> tuple[str, str, frozenset[str]] | str:
    entry = parse_scope(scope)
    if entry is None:
        return scope
    return entry["type"], entry["name"], frozenset(entry["actions"])


def decode_jwt_claims(token: str) -> dict[str, Any]:
    """The claims of a JWT, unverified (for assertions on what was issued)."""
    payload = token.split(".")[1]
    claims: dict[str, Any] = json.loads(
        base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
    )
    return claims


@dataclass(frozen=True)
class TokenRequest:
    """One request the token server answered."""

    method: str
    path: str
    service: str | None
    scopes: tuple[str, ...]
    account: str | None
    user: str | None  # the authenticated user; None: anonymous or refused
    had_authorization: bool
    status: int
    token: str | None = field(repr=False)
    time: float  # time.monotonic()
    headers: Mapping[str, str] = field(repr=False)


@dataclass(frozen=True)
class IssuedToken:
    token: str = field(repr=False)
    access: tuple[tuple[str, str, tuple[str, ...]], ...]  # (type, name, actions)
    user: str | None
    expires_in: int
    expires_at: float  # time.monotonic() when the token's lifetime is over


class _TokenHandler(QuietHandler):
    def do_GET(self) -> None:
        self.owner._handle(self)

    def do_HEAD(self) -> None:
        self.owner._handle(self)

    def do_POST(self) -> None:
        # The OAuth2 form (refresh tokens) is not implemented: what clients do without
        # an identity token is the GET above.
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        self.owner._refuse(self, 404, "unsupported", "POST is not implemented here")


class TokenServer(LoopbackHTTPServer):
    """``start()``, ``stop()``; ``realm``; ``registry_config()``; ``requests``; ``issued``."""

    handler_class = _TokenHandler
    thread_name = "token-server"

    def __init__(
        self,
        base_dir: Path,
        *,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        users: Mapping[str, str] | None = None,
        anonymous: bool = True,
        expires_in: int | None = 300,
        host: str = LOOPBACK,
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self.base_dir = Path(base_dir)
        self.service = service
        self.issuer = issuer
        self.users = dict(users or {})
        self.anonymous = anonymous
        self.expires_in = expires_in  # None: answer without expires_in (clients assume 60 s)
        self.signing_key = SigningKey.generate()
        self.ca_path = self.base_dir / "token-ca.pem"
        self._lock = threading.Lock()
        self._requests: list[TokenRequest] = []
        self._issued: list[IssuedToken] = []

    # --- configuration ----------------------------------------------------------

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def registry_config(self) -> dict[str, Any]:
        """distribution's ``auth: token:`` section; writes the CA file. Call after
        ``start()`` (the realm names the port)."""
        if not self.running:
            raise RuntimeError("start the token server first: the realm names its port")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.ca_path.write_bytes(self.signing_key.ca_pem)
        return {
            "auth": {
                "token": {
                    "realm": self.realm,
                    "service": self.service,
                    "issuer": self.issuer,
                    "rootcertbundle": str(self.ca_path),
                }
            }
        }

    # --- observations -----------------------------------------------------------

    @property
    def requests(self) -> list[TokenRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def issued(self) -> list[IssuedToken]:
        with self._lock:
            return list(self._issued)

    def tokens(self) -> list[str]:
        """Every token issued so far."""
        return [t.token for t in self.issued]

    def count_requests(self, scope: str | None = None, *, granted_only: bool = True) -> int:
        """Token requests (``granted_only``: answered 200) asking for ``scope``
        (``None``: any), e.g. ``"repository:owner/img:pull"``. Actions compare as a set:
        distribution's challenges say ``pull,push`` or ``push,pull`` at random."""
        wanted = _scope_key(scope) if scope is not None else None
        return sum(
            1
            for r in self.requests
            if (not granted_only or r.status == 200)
            and (wanted is None or wanted in {_scope_key(s) for s in r.scopes})
        )

    def reset(self) -> None:
        with self._lock:
            self._requests.clear()
            self._issued.clear()

    # --- issuing ----------------------------------------------------------------

    def mint(
        self,
        access: Iterable[Mapping[str, Any]] = (),
        *,
        subject: str = "",
        expires_in: int = 300,
        signing_key: SigningKey | None = None,
        audience: str | None = None,
        issuer: str | None = None,
        record: bool = True,
    ) -> str:
        """A signed token for ``access`` entries (``{"type", "name", "actions"}``), made
        directly (no HTTP). ``signing_key``, ``audience`` or ``issuer`` other than this
        server's make tokens the registry must refuse."""
        now = int(time.time())
        access_list = [dict(a) for a in access]
        claims = {
            "iss": issuer or self.issuer,
            "sub": subject,
            "aud": audience or self.service,
            "exp": now + expires_in,
            "nbf": now - 5,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access_list,
        }
        token = (signing_key or self.signing_key).sign_jwt(claims)
        if record:
            entry = IssuedToken(
                token,
                tuple((a["type"], a["name"], tuple(a["actions"])) for a in access_list),
                subject or None,
                expires_in,
                time.monotonic() + expires_in,
            )
            with self._lock:
                self._issued.append(entry)
        return token

    def push_token(self, names: Sequence[str], expires_in: int = 300) -> str:
        """A token with pull and push on each repository of ``names``."""
        return self.mint(
            [{"type": "repository", "name": n, "actions": ["pull", "push"]} for n in names],
            subject="test-pusher",
            expires_in=expires_in,
        )

    # --- HTTP -------------------------------------------------------------------

    def _authenticate(self, authorization: str | None) -> tuple[bool, str | None]:
        """``(allowed, user)``."""
        if not authorization:
            return self.anonymous, None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except ValueError:
            return False, None
        if user in self.users and self.users[user] == password:
            return True, user
        return False, None

    @staticmethod
    def _error(status: int, code: str, message: str) -> tuple[int, bytes, dict[str, str]]:
        body = json.dumps({"errors": [{"code": code, "message": message}]}).encode()
        headers = {}
        if status == 401:
            headers["WWW-Authenticate"] = 'Basic realm="regmirror-test-token-server"'
        return status, body, headers

    def _refuse(self, handler: QuietHandler, status: int, code: str, message: str) -> None:
        handler.send_body(*self._error(status, code, message))

    def _handle(self, handler: QuietHandler) -> None:
        url = urlsplit(handler.path)
        query = parse_qs(url.query, keep_blank_values=True)
        scopes = tuple(s for value in query.get("scope", []) for s in value.split(" ") if s)
        headers = handler.request_headers()
        authorization = headers.get("authorization")
        service = query.get("service", [None])[0]
        token, user = None, None
        allowed, user = self._authenticate(authorization)
        if url.path != "/token":
            answer = self._error(404, "NOT_FOUND", f"no such endpoint {url.path}")
        elif service is not None and service != self.service:
            answer = self._error(400, "invalid_request", f"unknown service {service!r}")
        elif not allowed:
            answer = self._error(401, "UNAUTHORIZED", "authentication required")
        else:
            access = []
            for scope in scopes:
                entry = parse_scope(scope)
                if entry is None:
                    continue
                if user is None:  # anonymous: pull only
                    entry["actions"] = [a for a in entry["actions"] if a == "pull"]
                access.append(entry)
            expires_in = self.expires_in
            token = self.mint(access, subject=user or "", expires_in=expires_in or 60)
            doc: dict[str, Any] = {
                "token": token,
                "access_token": token,
                "issued_at": datetime.datetime.now(datetime.UTC).isoformat(),
            }
            if expires_in is not None:
                doc["expires_in"] = expires_in
            answer = (200, json.dumps(doc).encode(), {})
        # Recorded before answering: once a client has its answer, the test sees it.
        record = TokenRequest(
            method=handler.command,
            path=url.path,
            service=service,
            scopes=scopes,
            account=query.get("account", [None])[0],
            user=user if answer[0] == 200 else None,
            had_authorization=authorization is not None,
            status=answer[0],
            token=token,
            time=time.monotonic(),
            headers=headers,
        )
        with self._lock:
            self._requests.append(record)
        handler.send_body(*answer)
