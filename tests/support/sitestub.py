"""An in-memory treq client of a given ``Site``: treq's ``StubTreq``, but against the
production site, request and channel classes rather than a plain ``Site`` it builds
itself.

Each request is a real HTTP exchange over ``twisted.test.iosim`` transports: the client
is twisted.web's ``Agent`` (through treq), the server the site's own channel.
"""

from __future__ import annotations

from typing import Any

from treq.client import HTTPClient
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.testing import MemoryReactorClock
from twisted.test import iosim
from twisted.web.client import URI, Agent
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from twisted.web.server import Site
from zope.interface import implementer


@implementer(IAgentEndpointFactory)
class _Endpoints:
    def __init__(self, reactor: MemoryReactorClock) -> None:
        self._reactor = reactor

    def endpointForURI(self, uri: URI) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self._reactor, "127.0.0.1", uri.port)


@implementer(IAgent)
class SiteAgent:
    """An ``IAgent`` whose every connection is an in-memory one to ``site``."""

    def __init__(self, site: Site) -> None:
        self._reactor = MemoryReactorClock()
        self._agent = Agent.usingEndpointFactory(self._reactor, _Endpoints(self._reactor))
        self._site = site
        self._pumps: set[iosim.IOPump] = set()

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Any = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        connections = len(self._reactor.tcpClients)
        response = self._agent.request(method, uri, headers, bodyProducer)
        if len(self._reactor.tcpClients) == connections:
            return response  # failed before connecting
        factory = self._reactor.tcpClients[-1][2]
        server_address = IPv4Address("TCP", "127.0.0.1", self._reactor.tcpClients[-1][1])
        client_address = IPv4Address("TCP", "127.0.0.1", 31337)
        server = self._site.buildProtocol(client_address)
        client = factory.buildProtocol(None)
        pump = iosim.connect(
            server,
            iosim.FakeTransport(
                server, isServer=True, hostAddress=server_address, peerAddress=client_address
            ),
            client,
            iosim.FakeTransport(
                client, isServer=False, hostAddress=client_address, peerAddress=server_address
            ),
        )
        self._pumps.add(pump)
        return response

    def flush(self) -> None:
        """Move what is pending between every client and the site."""
        pumps, self._pumps = self._pumps, set()
        for pump in pumps:
            pump.flush()
            if not (pump.clientIO.disconnected and pump.serverIO.disconnected):
                self._pumps.add(pump)


class StubSite(HTTPClient):
    """A treq ``HTTPClient`` of ``site``, in memory; ``flush()`` moves the bytes."""

    def __init__(self, site: Site) -> None:
        self._site_agent = SiteAgent(site)
        super().__init__(self._site_agent)

    def flush(self) -> None:
        self._site_agent.flush()
