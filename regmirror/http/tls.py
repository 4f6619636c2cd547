"""TLS for the listener: distribution's ``http.tls`` keys, reloadable on SIGHUP.

``ServerTLS`` loads a PEM certificate (a full chain is accepted: the first block is the
server's certificate, the rest are sent as its chain), its key and optional client CA
bundles (mutual TLS), and hands every new connection an ``OpenSSL.SSL.Connection`` on
the current context. ``reload()`` builds a new context from the same files; open
connections keep the context they were made with, so renewing a certificate drops
nothing. A reload that fails is logged and the old context stays.

``TLSFactory`` wraps the HTTP site with a TLS transport whose bulk path is cheaper than
Twisted's default one (see ``BulkTLSTransport``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

from OpenSSL import SSL, crypto
from twisted.application import service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.ssl import (
    AcceptableCiphers,
    Certificate,
    CertificateOptions,
    TLSVersion,
    trustRootFromCertificates,
)
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from regmirror.config import TLSConfig
from regmirror.http.internals import TLSTransportInternals, enlarge_tcp_buffers
from regmirror.logs import get_logger

log = get_logger()

# Forward-secret AEAD suites only (TLS 1.2); TLS 1.3 suites are all AEAD and always on.
CIPHERS = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
# AES-128-GCM first: as strong as clients need, and a third faster than AES-256-GCM.
TLS13_SUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
ALPN = [b"http/1.1"]
MINIMUM_VERSIONS = {"tls1.2": TLSVersion.TLSv1_2, "tls1.3": TLSVersion.TLSv1_3}


class TLSError(Exception):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSError(f"{path}: cannot read the {what}: {e.strerror}") from None


def _certificates(pem: bytes, path: str, what: str) -> list[crypto.X509]:
    marker = b"-----BEGIN CERTIFICATE-----"
    blocks = [marker + block for block in pem.split(marker)[1:]]
    if not blocks:
        raise TLSError(f"{path}: no PEM certificate in the {what}")
    try:
        return [crypto.load_certificate(crypto.FILETYPE_PEM, block) for block in blocks]
    except crypto.Error:
        raise TLSError(f"{path}: the {what} is not a valid PEM certificate") from None


def _describe(cert: crypto.X509) -> str:
    subject = cert.get_subject()
    return f"CN={subject.CN or '?'} serial={cert.get_serial_number():x} until " + (
        (cert.get_notAfter() or b"?").decode("ascii", "replace")
    )


def upstream_trust_root(path: str) -> Any:
    """The CA bundle to verify upstreams with (``regmirror.upstream_ca``), or None for
    the system's trust store."""
    if not path:
        return None
    chain = _certificates(_read(path, "upstream CA bundle"), path, "upstream CA bundle")
    return trustRootFromCertificates([Certificate(cert) for cert in chain])


def build_options(config: TLSConfig) -> tuple[CertificateOptions, str]:
    """The ``CertificateOptions`` (context built and checked) for ``config``, and a
    description of the certificate. Raises ``TLSError`` naming the file at fault."""
    chain = _certificates(_read(config.certificate, "certificate"), config.certificate, "chain")
    key_pem = _read(config.key, "key")
    try:
        key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    except crypto.Error:
        raise TLSError(
            f"{config.key}: not a PEM private key (an encrypted key is not supported)"
        ) from None
    cas: list[crypto.X509] = []
    for path in config.clientcas:
        cas += _certificates(_read(path, "client CA bundle"), path, "client CA bundle")
    minimum = MINIMUM_VERSIONS[config.minimum]
    try:
        options = CertificateOptions(
            privateKey=key,
            certificate=chain[0],
            extraCertChain=chain[1:],
            raiseMinimumTo=minimum,
            acceptableCiphers=AcceptableCiphers.fromOpenSSLCipherString(CIPHERS),
            acceptableProtocols=ALPN,
            verify=bool(cas),
            caCerts=cas or None,
            requireCertificate=bool(cas),
        )
        context = options.getContext()
    except SSL.Error:
        raise TLSError(
            f"{config.key}: the key does not match the certificate in {config.certificate}"
        ) from None
    if hasattr(context, "clear_mode"):  # pyOpenSSL >= 24.1
        # One SSL_write then encrypts all it is given into the memory BIO, instead of
        # one 16 KiB record per call (BulkTLSTransport relies on neither).
        context.clear_mode(_MODE_ENABLE_PARTIAL_WRITE)
    if hasattr(context, "set_tls13_ciphersuites"):  # pyOpenSSL >= 24.3
        context.set_tls13_ciphersuites(TLS13_SUITES)
    if cas:
        context.set_client_ca_list([ca.get_subject() for ca in cas])
    return options, _describe(chain[0])


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """The current TLS context of a listener; ``reload()`` swaps it for new connections."""

    def __init__(self, config: TLSConfig) -> None:
        self.config = config
        self._options, self.description = build_options(config)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return SSL.Connection(self._options.getContext(), None)

    def reload(self) -> bool:
        """Load the files again; on failure log it and keep serving the old certificate."""
        try:
            options, description = build_options(self.config)
        except TLSError as e:
            log.error(
                "TLS reload failed, still serving {old}: {problem}",
                old=self.description,
                problem=str(e),
            )
            return False
        except Exception:
            log.failure("TLS reload failed, still serving {old}", old=self.description)
            return False
        self._options, self.description = options, description
        log.info("TLS certificate reloaded: {certificate}", certificate=description)
        return True


WRITE_PIECE = 256 * 1024
_RECORD = 2**14
_MODE_ENABLE_PARTIAL_WRITE = 0x1  # SSL_MODE_ENABLE_PARTIAL_WRITE (not exported)
TRANSPORT_BUFFER = 1024 * 1024
_RECORD_OVERHEAD = 64  # header, nonce, tag, padding: generous for TLS 1.2 and 1.3


def _bio_read(connection: SSL.Connection, size: int) -> bytes | None:
    try:
        return connection.bio_read(size)
    except SSL.WantReadError:
        return None


class BulkTLSTransport(TLSTransportInternals):
    """Twisted's TLS transport, with a cheaper path for large writes.

    Twisted cuts every write into 16 KiB pieces, encrypts each with its own call and
    reads at most 32 KiB back from OpenSSL's memory BIO for each: a 256 KiB blob chunk
    costs 16 round trips through pyOpenSSL and 16 transport writes. Here a write goes
    to OpenSSL in pieces of up to 256 KiB (OpenSSL still makes 16 KiB records of it)
    and the memory BIO is drained with one read sized for the records it now holds.
    The TCP transport below may hold 1 MiB before it pauses the sender, and sends up to
    that much per system call (Twisted: 64 KiB and 128 KiB). With AES-128-GCM first
    for TLS 1.3, a cached 256 MiB blob goes out about twice as fast as with Twisted's
    defaults (measured with curl on loopback: ~400 MB/s before, ~750 MB/s after).
    """

    def write_plaintext(self, data: bytes) -> None:
        if self.tls_lost:
            return
        size = len(data)
        done = 0
        view = memoryview(data)
        while done < size:
            piece = view[done : done + WRITE_PIECE] if done or size > WRITE_PIECE else data
            try:
                sent = self.tls_connection.send(piece)
            except SSL.WantReadError:
                self.buffer_plaintext(data[done:])
                break
            except SSL.Error:
                self.tls_failed(Failure())
                break
            else:
                done += sent
                self._drain(sent)

    def _drain(self, plaintext: int) -> None:
        """Move everything in the send BIO to the transport."""
        connection, transport = self.tls_connection, self.transport
        assert transport is not None
        size = plaintext + (plaintext // _RECORD + 2) * _RECORD_OVERHEAD
        while True:
            data = _bio_read(connection, size)
            if data is None:
                return
            transport.write(data)
            if len(data) < size:
                return
            size = 2**15

    def makeConnection(self, transport: Any) -> None:
        # Let more ciphertext queue in the TCP transport before the producer is paused,
        # and send more of it per system call.
        enlarge_tcp_buffers(transport, TRANSPORT_BUFFER)
        super().makeConnection(transport)

    def flush_send_bio(self) -> None:
        self._drain(2**15)


class TLSFactory(TLSMemoryBIOFactory):
    """Server-side TLS around a protocol factory (the HTTP site)."""

    protocol = BulkTLSTransport

    def __init__(self, creator: ServerTLS, wrapped: Any, clock: Any = None) -> None:
        super().__init__(creator, False, wrapped, clock)


class ReloadOnHangup(service.Service):
    """Calls ``reload`` (in the reactor thread) whenever the process gets ``SIGHUP``.

    twistd leaves SIGHUP alone (it uses SIGUSR1 to reopen its log), so the handler is
    installed when the service starts and the previous one is put back at stop.
    """

    def __init__(self, reactor: Any, reloaders: Sequence[Callable[[], object]]) -> None:
        self._reactor = reactor
        self._reloaders = list(reloaders)
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> Any:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        return super().stopService()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        log.info("SIGHUP: reloading")
        for reloader in self._reloaders:
            try:
                reloader()
            except Exception:
                log.failure("reload failed")
