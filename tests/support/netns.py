"""Network namespaces that a test makes itself, linked to the root namespace by veth
pairs, for faults that loopback cannot express (one process cut off from one peer
while it still reaches the others).

``NetNs.create()`` adds ``ip netns add rmf<pid><n>`` with its loopback up;
``ns.link(...)`` adds a veth pair, one end in the root namespace and one inside, each with
an address of a private ``/30`` taken from ``subnet()`` (a ``10.x.y.0/24`` that no
interface of this machine uses); ``link.cut()`` sets the inside end down (its route goes
with it: packets to the peer are dropped locally, the peer sees silence, no reset),
``link.heal()`` sets it up again. ``ns.argv(...)`` wraps a command line in
``ip netns exec``, which execs the command itself: the PID is the program's, so it is
stopped by PID like any other. ``delete()`` removes the namespace and with it every veth
pair that has an end inside; it is idempotent, and fixtures call it on failure too.

Needs root (CAP_NET_ADMIN) and iproute2; a missing ``ip`` is a failure, not a skip.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import random
import subprocess

from tests.support.process import require_tool

_COUNTER = itertools.count(1)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("ip"), *args], check=check, capture_output=True, text=True, timeout=20
    )


def subnet() -> ipaddress.IPv4Network:
    """A ``10.x.y.0/24`` no interface here has an address in (x in 200..249)."""
    used = [
        ipaddress.ip_interface(word).network
        for line in ip("-4", "-o", "addr", "show").stdout.splitlines()
        for word in line.split()[3:4]
    ]
    for _ in range(200):
        candidate = ipaddress.IPv4Network(
            f"10.{random.randint(200, 249)}.{random.randint(0, 255)}.0/24"
        )
        if not any(candidate.overlaps(u) for u in used):
            return candidate
    raise RuntimeError("no free 10.x.y.0/24 for a test network")


class Link:
    """A veth pair: ``root_ip`` on the end in the root namespace, ``ns_ip`` inside."""

    def __init__(self, ns: NetNs, host_dev: str, ns_dev: str, root_ip: str, ns_ip: str) -> None:
        self.ns = ns
        self.host_dev = host_dev
        self.ns_dev = ns_dev
        self.root_ip = root_ip
        self.ns_ip = ns_ip

    def cut(self, *, silent: bool = False) -> None:
        """Partition. The inside end goes down: its route with it, so the process inside
        gets an error at once (as when its own interface fails). ``silent``: the root end
        goes down instead; inside, the link only loses its carrier and what is sent is
        dropped without an error (as when the network between drops packets)."""
        if silent:
            ip("link", "set", self.host_dev, "down")
        else:
            ip("-n", self.ns.name, "link", "set", self.ns_dev, "down")

    def heal(self) -> None:
        ip("link", "set", self.host_dev, "up")
        ip("-n", self.ns.name, "link", "set", self.ns_dev, "up")

    @property
    def is_up(self) -> bool:
        out = ip("-n", self.ns.name, "-o", "link", "show", self.ns_dev).stdout
        return ",UP" in out or "<UP" in out


class NetNs:
    def __init__(self, net: ipaddress.IPv4Network | None = None) -> None:
        self.name = f"rmf{os.getpid() % 100000}n{next(_COUNTER)}"
        self.net = net or subnet()
        self._blocks = self.net.subnets(new_prefix=30)
        self._links: list[Link] = []
        self.created = False

    def create(self) -> NetNs:
        ip("netns", "add", self.name)
        self.created = True
        ip("-n", self.name, "link", "set", "lo", "up")
        return self

    def link(self) -> Link:
        """A new veth pair between the root namespace and this one, with addresses."""
        block = next(self._blocks)
        root_ip, ns_ip = (str(a) for a in list(block.hosts())[:2])
        n = len(self._links)
        host_dev, ns_dev = f"{self.name}h{n}"[-15:], f"{self.name}i{n}"[-15:]
        ip("link", "add", host_dev, "type", "veth", "peer", "name", ns_dev, "netns", self.name)
        link = Link(self, host_dev, ns_dev, root_ip, ns_ip)
        self._links.append(link)
        ip("addr", "add", f"{root_ip}/30", "dev", host_dev)
        ip("link", "set", host_dev, "up")
        ip("-n", self.name, "addr", "add", f"{ns_ip}/30", "dev", ns_dev)
        ip("-n", self.name, "link", "set", ns_dev, "up")
        return link

    def argv(self, argv: list[str]) -> list[str]:
        return [require_tool("ip"), "netns", "exec", self.name, *argv]

    def delete(self) -> None:
        """Remove the namespace (its veth ends, and so their peers, go with it)."""
        if self.created:
            ip("netns", "del", self.name, check=False)
            self.created = False
        for link in self._links:  # normally gone with the namespace
            ip("link", "del", link.host_dev, check=False)

    def exists(self) -> bool:
        return self.name in ip("netns", "list").stdout.split()

    def __enter__(self) -> NetNs:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.delete()
